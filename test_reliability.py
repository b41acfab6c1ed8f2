"""Failure modes of fg.py: input validation, data faults, non-finite values, interruption.

Training runs use the synthetic dataset at width 4 on one CPU thread, so the file takes about a
minute. The real Fashion-MNIST files serve only as sources for corrupt copies.

    python -m pytest -q test_reliability.py
"""

import contextlib
import gzip
import io
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import example, given
from hypothesis import strategies as st

import fg

# fg.py silences this warning at import, but pytest restores the warning filters for each test.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

# -------------------------------------------------------------------------------------------------
# Helpers

def small_run(*extra, subset=128):
    """Arguments of a quick run: `subset` synthetic examples in steps of 32, on the CPU."""
    return ["--dataset", "synthetic", "--width", "4", "--batch-size", "32",
            "--train-subset", str(subset), "--device", "cpu", "--lr-step", "1",
            "--lr-decay", "0.5", *extra]


@pytest.fixture(autouse=True)
def single_thread():
    """Run torch on one thread: faster on a shared machine, and one fixed reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parse_failure(argv):
    """Return (exit status, stderr) of parse_args(argv), which must exit."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        fg.parse_args(argv)
    return exit_info.value.code, stderr.getvalue()


# -------------------------------------------------------------------------------------------------
# Input validation

INVALID_NUMBERS = [
    # (flag, argument, the value as parsed, the valid range as the message states it)
    ("--epochs", "-1", "-1", "an integer >= 0"),
    ("--batch-size", "0", "0", "an integer >= 2"),
    ("--batch-size", "1", "1", "an integer >= 2"),
    ("--width", "0", "0", "an integer >= 1"),
    ("--width", "-4", "-4", "an integer >= 1"),
    ("--lr", "0", "0.0", "a finite number > 0"),
    ("--lr", "-0.1", "-0.1", "a finite number > 0"),
    ("--lr", "nan", "nan", "a finite number > 0"),
    ("--lr", "inf", "inf", "a finite number > 0"),
    ("--momentum", "1", "1.0", "a number in [0, 1)"),
    ("--weight-decay", "inf", "inf", "a finite number >= 0"),
    ("--lr-step", "0", "0", "an integer >= 1"),
    ("--lr-decay", "0", "0.0", "a number in (0, 1]"),
    ("--max-grad-norm", "-1", "-1.0", "a finite number >= 0 (0: no clipping)"),
    ("--train-subset", "1", "1", "0 (all examples) or an integer >= 2"),
    ("--seed", "-1", "-1", "an integer in [0, 4294967295]"),
    ("--log-alignment", "-1", "-1", "an integer >= 0"),
    ("--bn-recalibration", "-1", "-1", "an integer >= 0 (0: off)"),
]


@pytest.mark.parametrize("flag, argument, value, valid", INVALID_NUMBERS)
def test_parse_args_rejects_number_out_of_range(flag, argument, value, valid):
    status, stderr = parse_failure(["--checkpoint", "none", flag, argument])
    assert status == 2
    assert f"invalid value for {flag}: {value}; expected {valid}" in stderr


@pytest.mark.parametrize("flag, value, choices", [
    ("--blocks", "12", ["8", "16"]),
    ("--dataset", "mnist", ["cifar10", "fashion-mnist", "imagenet32", "synthetic"]),
    ("--guess", "backprop", ["random", "ntk", "fixed-ntk", "aux", "above", "global"]),
])
def test_parse_args_rejects_unknown_choice(flag, value, choices):
    status, stderr = parse_failure([flag, value])
    message = stderr.strip().splitlines()[-1]
    assert status == 2
    assert f"argument {flag}: invalid choice: " in message
    assert value in message
    for choice in choices:
        assert choice in message


def test_parse_args_rejects_non_integer():
    status, stderr = parse_failure(["--epochs", "ten"])
    assert status == 2
    assert "argument --epochs: invalid int value: 'ten'" in stderr


@pytest.mark.parametrize("device", ["gpu", "cudax", "cpu:1", "cuda:x"])
def test_parse_args_rejects_unknown_device(device):
    status, stderr = parse_failure(["--checkpoint", "none", "--device", device])
    assert status == 2
    assert f"invalid value for --device: {device}; expected auto, cpu, cuda or cuda:N" in stderr


def test_parse_args_rejects_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, stderr = parse_failure(["--checkpoint", "none", "--device", "cuda"])
    assert status == 2
    assert ("invalid value for --device: cuda; CUDA is not available here, use --device cpu"
            in stderr)


def test_parse_args_rejects_missing_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    status, stderr = parse_failure(["--checkpoint", "none", "--device", "cuda:2"])
    assert status == 2
    assert ("invalid value for --device: cuda:2; expected cuda:0 to cuda:1, the CUDA devices of "
            "this machine") in stderr


def integer_settings():
    """An integer flag, its valid predicate, and a value from around and far beyond its bounds."""
    rules = [("--epochs", lambda n: n >= 0), ("--batch-size", lambda n: n >= 2),
             ("--width", lambda n: n >= 1), ("--lr-step", lambda n: n >= 1),
             ("--train-subset", lambda n: n == 0 or n >= 2),
             ("--seed", lambda n: 0 <= n < 2**32)]
    values = st.integers(-3, 3) | st.integers(-2**70, 2**70)
    return st.tuples(st.sampled_from(rules), values)


@given(integer_settings())
@example((("--seed", lambda n: 0 <= n < 2**32), 2**32))
def test_parse_args_accepts_exactly_valid_integers(setting):
    (flag, valid), value = setting
    argv = ["--checkpoint", "none", flag, str(value)]
    if valid(value):
        assert getattr(fg.parse_args(argv), flag[2:].replace("-", "_")) == value
    else:
        status, stderr = parse_failure(argv)
        assert status == 2
        assert f"invalid value for {flag}: {value}; expected" in stderr


def test_parse_args_rejects_data_dir_that_is_file(tmp_path):
    path = tmp_path / "data.tar"
    path.write_bytes(b"")
    status, stderr = parse_failure(["--checkpoint", "none", "--data-dir", str(path)])
    assert status == 2
    assert f"invalid value for --data-dir: {path} is a file; expected a folder" in stderr


@pytest.mark.parametrize("flag", ["--out", "--checkpoint"])
def test_parse_args_rejects_output_that_is_folder(flag, tmp_path):
    status, stderr = parse_failure(["--checkpoint", "none", flag, str(tmp_path)])
    assert status == 2
    assert f"invalid value for {flag}: {tmp_path} is a folder; expected a file name" in stderr


@pytest.mark.parametrize("flag", ["--out", "--checkpoint"])
def test_parse_args_rejects_non_regular_output(flag, tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    argv = ["--checkpoint", "none", flag, str(pipe)] if flag == "--out" else [flag, str(pipe)]
    status, stderr = parse_failure(argv)
    assert status == 2
    assert f"invalid value for {flag}: {pipe} is not a regular file; expected a file name" in stderr


@pytest.mark.parametrize("flag", ["--out", "--checkpoint"])
def test_parse_args_rejects_unusable_file_names(flag, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    inside_file = blocker / "sub" / "run.json"
    other = ["--checkpoint", "none"] if flag == "--out" else []
    status, stderr = parse_failure([*other, flag, str(inside_file)])
    assert status == 2
    assert (f"invalid value for {flag}: {inside_file} cannot be created because {blocker} is a "
            "file, not a folder; choose a path in a folder") in stderr
    folder_name = f"{tmp_path}/new/"
    status, stderr = parse_failure([*other, flag, folder_name])
    assert status == 2
    assert f"invalid value for {flag}: {folder_name} is a folder; expected a file name" in stderr


def test_parse_args_rejects_empty_checkpoint_and_benchmark_out():
    status, stderr = parse_failure(["--checkpoint", ""])
    assert status == 2
    assert "invalid value for --checkpoint: an empty name; expected a file name, auto or none" \
        in stderr
    status, stderr = parse_failure(["--benchmark", "--checkpoint", "none", "--out", "b.json"])
    assert status == 2
    assert "--out b.json does not apply to --benchmark, which prints its table; remove --out" \
        in stderr


@pytest.mark.parametrize("argv, message", [
    (["--benchmark-steps", "3"],
     "--benchmark-steps 3 applies only to --benchmark; add --benchmark or remove --benchmark-steps"),
    (["--benchmark-configs", "main"], "--benchmark-configs main applies only to --benchmark; "
     "add --benchmark or remove --benchmark-configs"),
    (["--benchmark", "--resume"],
     "--resume does not apply to --benchmark, which trains no model; remove --resume"),
    (["--benchmark", "--log-alignment", "5"], "--log-alignment 5 does not apply to --benchmark, "
     "which trains no model; remove --log-alignment"),
    (["--benchmark", "--bn-recalibration", "20"], "--bn-recalibration 20 does not apply to "
     "--benchmark, which trains no model; remove --bn-recalibration"),
])
def test_parse_args_rejects_benchmark_mismatch(argv, message):
    status, stderr = parse_failure(argv)
    assert status == 2
    assert message in stderr


def test_parse_args_rejects_out_equal_to_checkpoint(tmp_path):
    path = tmp_path / "run.json"
    status, stderr = parse_failure(["--out", str(path), "--checkpoint", str(path)])
    assert status == 2
    assert (f"invalid value for --out: {path} is also the checkpoint file; choose different "
            "files for --out and --checkpoint") in stderr


def test_parse_args_accepts_data_dir_file_for_synthetic(tmp_path):
    path = tmp_path / "data.tar"
    path.write_bytes(b"")
    cfg = fg.parse_args(["--dataset", "synthetic", "--checkpoint", "none",
                         "--data-dir", str(path)])
    assert cfg.data_dir == str(path)


def test_auto_checkpoint_name_separates_fixed_settings():
    def name(*argv):
        return fg.checkpoint_path(fg.parse_args(["--dataset", "synthetic", *argv]))
    assert name() != name("--lr", "0.1")
    assert name() != name("--train-subset", "100")
    assert name() == name("--epochs", "7", "--out", "other.json")


@pytest.mark.parametrize("flag, value", [("--noise", "rademacher"),
                                         ("--random-estimator", "projection")])
def test_parse_args_rejects_random_setting_without_random_guess(flag, value):
    status, stderr = parse_failure(["--checkpoint", "none", "--guess", "aux", flag, value])
    assert status == 2
    assert (f"{flag} {value} applies only to --guess random, not --guess aux; remove {flag} or "
            "pass --guess random") in stderr
    assert fg.parse_args(["--checkpoint", "none", "--guess", "random", flag, value])


def test_parse_args_rejects_resume_without_checkpoint():
    status, stderr = parse_failure(["--checkpoint", "none", "--resume"])
    assert status == 2
    assert "--resume needs a checkpoint file; remove --checkpoint none" in stderr


def test_parse_args_rejects_existing_checkpoint_without_resume(tmp_path):
    path = tmp_path / "run.pt"
    path.write_bytes(b"an earlier run")
    status, stderr = parse_failure(["--checkpoint", str(path)])
    assert status == 2
    assert f"--checkpoint {path} already exists; pass --resume" in stderr
    assert path.read_bytes() == b"an earlier run"


def test_main_rejects_train_subset_larger_than_data(capsys):
    status = fg.main(small_run("--checkpoint", "none", subset=5000))
    stderr = capsys.readouterr().err
    assert status == 2
    assert ("invalid value for --train-subset: 5000; expected 0 (all examples) or an integer "
            "in [2, 1024]") in stderr


# -------------------------------------------------------------------------------------------------
# Data faults

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST), reason="needs Debian's dataset-fashion-mnist package")


def load_error(dataset, folder):
    """Return the message of the DataError that loading `dataset` from folder raises."""
    cfg = fg.parse_args(["--dataset", dataset, "--data-dir", str(folder), "--checkpoint", "none",
                         "--device", "cpu"])
    with pytest.raises(fg.DataError) as error:
        fg.load_data(cfg)
    return str(error.value)


def fashion_mnist_folder(tmp_path, replace=()):
    """A folder linking the real Fashion-MNIST files, except the stems in `replace`."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for stem in FASHION_FILES:
        if stem not in replace:
            os.symlink(os.path.join(FASHION_MNIST, stem + ".gz"), folder / (stem + ".gz"))
    return folder


def write_idx(path, array):
    """Write a uint8 array as an idx file, uncompressed."""
    dims = b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + dims + array.astype(np.uint8).tobytes())


def real_gzip(stem):
    with open(os.path.join(FASHION_MNIST, stem + ".gz"), "rb") as f:
        return f.read()


def test_fashion_mnist_missing_folder_names_files(tmp_path, capsys):
    folder = tmp_path / "absent"
    status = fg.main(["--dataset", "fashion-mnist", "--data-dir", str(folder),
                      "--checkpoint", "none", "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert status == 1
    assert f"error: --data-dir {folder} does not exist; pass the folder that holds " in stderr
    assert ("; Debian's dataset-fashion-mnist package installs them in "
            "/usr/share/datasets/fashion-mnist\n") in stderr
    for stem in FASHION_FILES:
        assert stem in stderr
    assert not folder.exists()


def test_fashion_mnist_missing_files_not_downloaded(tmp_path, monkeypatch):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(3))

    def no_network(*args):
        raise AssertionError("the loader opened a network connection")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    message = load_error("fashion-mnist", folder)
    assert message.startswith(f"Fashion-MNIST files missing in {folder}: train-images-idx3-ubyte, "
                              "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; copy ")
    assert f"into {folder}, for example from /usr/share/datasets/fashion-mnist" in message
    assert sorted(os.listdir(folder)) == ["train-labels-idx1-ubyte"]


def cut_in_half(data):
    return data[:len(data) // 2]


def flip_middle_bytes(data):
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]


def break_gzip_header(data):
    return b"PK" + data[2:]


@needs_fashion_mnist
@pytest.mark.parametrize("damage", [cut_in_half, flip_middle_bytes, break_gzip_header])
def test_fashion_mnist_corrupt_gzip_names_file(damage, tmp_path):
    folder = fashion_mnist_folder(tmp_path, replace=["t10k-labels-idx1-ubyte"])
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(damage(real_gzip("t10k-labels-idx1-ubyte")))
    message = load_error("fashion-mnist", folder)
    assert message.startswith(f"{path}: the gzip data is truncated or corrupt (")
    assert message.endswith("replace the file with an intact copy")


@pytest.mark.parametrize("content, problem", [
    (bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 7]), "the magic number is 0x00000c01, expected 0x000008"),
    (b"", "the magic number is 0x, expected 0x000008"),
    (bytes([0, 0, 8, 3, 0, 0]), "the idx header of 3 dimensions is cut off after 6 bytes"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]),
     "header declares shape (5,) (5 bytes) but the file holds 2; the file is truncated"),
])
def test_read_idx_malformed_file_names_problem(content, problem, tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(fg.DataError) as error:
        fg.read_idx(str(path))
    assert str(error.value).startswith(f"{path}: ")
    assert problem in str(error.value)


@needs_fashion_mnist
def test_fashion_mnist_wrong_image_size_names_file(tmp_path):
    folder = fashion_mnist_folder(tmp_path, replace=["t10k-images-idx3-ubyte"])
    path = folder / "t10k-images-idx3-ubyte"
    write_idx(path, np.zeros((10000, 32, 32)))
    message = load_error("fashion-mnist", folder)
    assert message == (f"{path}: images of shape (32, 32), expected (28, 28); the file is not "
                       "Fashion-MNIST images")


@needs_fashion_mnist
def test_fashion_mnist_label_count_mismatch_names_files(tmp_path):
    folder = fashion_mnist_folder(tmp_path, replace=["t10k-labels-idx1-ubyte"])
    path = folder / "t10k-labels-idx1-ubyte"
    write_idx(path, np.zeros(9999))
    message = load_error("fashion-mnist", folder)
    assert message == (f"{path}: labels of shape (9999,) for the 10000 images in "
                       f"{folder / 't10k-images-idx3-ubyte.gz'}; expected one label per image")


@needs_fashion_mnist
def test_fashion_mnist_label_out_of_range_names_file(tmp_path):
    folder = fashion_mnist_folder(tmp_path, replace=["t10k-labels-idx1-ubyte"])
    path = folder / "t10k-labels-idx1-ubyte"
    labels = np.frombuffer(gzip.decompress(real_gzip("t10k-labels-idx1-ubyte")), np.uint8, -1, 8)
    write_idx(path, np.where(np.arange(len(labels)) == 17, 10, labels))
    message = load_error("fashion-mnist", folder)
    assert message == f"{path}: labels range over [0, 10], expected [0, 9] for fashion-mnist"


@needs_fashion_mnist
def test_fashion_mnist_real_files_load(tmp_path):
    folder = tmp_path / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for stem in FASHION_FILES:
        os.symlink(os.path.join(FASHION_MNIST, stem + ".gz"), folder / (stem + ".gz"))
    cfg = fg.parse_args(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path),
                         "--checkpoint", "none"])
    data = fg.load_data(cfg)
    assert data.train_x.shape == (60000, 1, 28, 28)
    assert data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_y.bincount().tolist() == [6000] * 10
    assert data.test_y.bincount().tolist() == [1000] * 10


@needs_fashion_mnist
def test_main_data_error_prints_one_line(tmp_path, capsys):
    folder = fashion_mnist_folder(tmp_path, replace=["train-labels-idx1-ubyte"])
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(cut_in_half(real_gzip("train-labels-idx1-ubyte")))
    status = fg.main(["--dataset", "fashion-mnist", "--data-dir", str(folder),
                      "--checkpoint", "none", "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert status == 1
    assert stderr.startswith(f"error: {path}: the gzip data is truncated or corrupt")
    assert stderr.count("\n") == 1


def test_cifar10_download_failure_names_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    message = load_error("cifar10", tmp_path)
    assert message.startswith(f"CIFAR-10 is missing or damaged in {tmp_path} and could not be "
                              "downloaded (URLError: ")
    assert f"cifar-10-batches-py in {tmp_path}" in message


def imagenet32_batch(images=4, labels=None, shape=(3072,)):
    """A pickled batch as downsampled ImageNet ships it: uint8 rows and labels 1..1000."""
    data = np.arange(images * math.prod(shape), dtype=np.int64).reshape(images, *shape) % 256
    labels = list(range(1, images + 1)) if labels is None else labels
    return {"data": data.astype(np.uint8), "labels": labels, "mean": np.zeros(3072)}


def imagenet32_folder(tmp_path, faulty=None, protocol=2):
    """Ten train batches and val_data; `faulty` maps a file name to the bytes it holds."""
    folder = tmp_path / "imagenet32"
    folder.mkdir()
    names = [f"train_data_batch_{i}" for i in range(1, 11)] + ["val_data"]
    for name in names:
        content = pickle.dumps(imagenet32_batch(), protocol=protocol)
        (folder / name).write_bytes((faulty or {}).get(name, content))
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_imagenet32_valid_batches_load(protocol, tmp_path):
    folder = imagenet32_folder(tmp_path, protocol=protocol)
    cfg = fg.parse_args(["--dataset", "imagenet32", "--data-dir", str(folder),
                         "--checkpoint", "none"])
    data = fg.load_data(cfg)
    expected = torch.arange(4 * 3072).view(4, 3, 32, 32) % 256
    assert data.train_x.shape == (40, 3, 32, 32)
    assert torch.equal(data.test_x, expected.to(torch.uint8))
    assert data.test_y.tolist() == [0, 1, 2, 3]


def test_imagenet32_missing_files_named(tmp_path):
    folder = imagenet32_folder(tmp_path)
    os.remove(folder / "train_data_batch_7")
    os.remove(folder / "val_data")
    message = load_error("imagenet32", folder)
    assert message.startswith(f"ImageNet32 files missing in {folder}: train_data_batch_7, "
                              "val_data; copy train_data_batch_1 to train_data_batch_10 and "
                              f"val_data")


class Reduced:
    """An object that pickles as an arbitrary call: callable(*args), then state if given."""

    def __init__(self, callable, args, state=None):
        self.reduced = (callable, args) if state is None else (callable, args, state)

    def __reduce__(self):
        return self.reduced


def damaged_dtype_batch():
    """A batch whose uint8 dtype header has flags 3, as if it held Python objects: numpy 2.4
    unpickles it into a SystemError."""
    dtype = Reduced(np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 3))
    array = Reduced(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                    (1, (4, 3072), dtype, False, bytes(4 * 3072)))
    return {"data": array, "labels": [1, 2, 3, 4]}


@pytest.mark.parametrize("batch, problem", [
    (imagenet32_batch(shape=(1024,)), "'data' is uint8 of shape (4, 1024); expected N images of "
                                      "3x32x32 pixels as integers 0..255 of shape (N, 3072)"),
    (dict(imagenet32_batch(), data=np.full((4, 3072), 0.5)), "'data' is float64 of shape"),
    (dict(imagenet32_batch(), data=np.full((4, 3072), 256)), "'data' is int64 of shape"),
    (imagenet32_batch(labels=[1, 2, 3]), "'labels' is int64 of shape (3,); expected 4 integers"),
    (imagenet32_batch(labels=["a", "b", "c", "d"]), "'labels' is <U1 of shape (4,)"),
    (imagenet32_batch(labels=[0, 1, 2, 3]), "labels range over [0, 3]; expected [1, 1000]"),
    (imagenet32_batch(labels=[1, 2, 3, 1001]), "labels range over [1, 1001]; expected [1, 1000]"),
    ({"labels": [1, 2, 3, 4]}, "not a readable ImageNet32 batch (KeyError: 'data')"),
    ([1, 2], "not a readable ImageNet32 batch (TypeError: "),
    (damaged_dtype_batch(), "(UnpicklingError: damaged header of dtype u1)"),
])
def test_imagenet32_malformed_batch_names_file(batch, problem, tmp_path):
    folder = imagenet32_folder(tmp_path, {"train_data_batch_3": pickle.dumps(batch, protocol=2)})
    message = load_error("imagenet32", folder)
    assert message.startswith(f"{folder / 'train_data_batch_3'}: ")
    assert problem in message


def test_imagenet32_foreign_pickle_not_run(tmp_path):
    marker = tmp_path / "created-by-pickle"
    batch = {"data": Reduced(os.mkdir, (str(marker),)), "labels": []}
    folder = imagenet32_folder(tmp_path, {"val_data": pickle.dumps(batch, protocol=2)})
    message = load_error("imagenet32", folder)
    assert message.startswith(f"{folder / 'val_data'}: not a readable ImageNet32 batch ")
    assert "the pickle refers to posix.mkdir, which no ImageNet32 batch does" in message
    assert not marker.exists()


VALID_BATCH = pickle.dumps(imagenet32_batch(), protocol=2)


def load_batch_bytes(content, tmp_path_factory):
    """Load one batch from bytes: (images, labels), or the DataError it raises."""
    path = tmp_path_factory.mktemp("batch") / "val_data"
    path.write_bytes(content)
    try:
        return fg.load_imagenet32_file(str(path))
    except fg.DataError as error:
        return error


@given(length=st.integers(0, len(VALID_BATCH) - 1))
@example(length=len(VALID_BATCH) - 1)
def test_imagenet32_truncated_pickle_raises_data_error(length, tmp_path_factory):
    result = load_batch_bytes(VALID_BATCH[:length], tmp_path_factory)
    assert isinstance(result, fg.DataError)


def header_damage():
    """A position in the first 400 bytes, where the dict, dtype and shape of a batch lie, and
    a byte to write there."""
    return st.tuples(st.integers(0, 399), st.integers(0, 255))


@given(damage=st.lists(header_damage(), min_size=1, max_size=4))
def test_imagenet32_damaged_header_never_crashes(damage, tmp_path_factory):
    content = bytearray(VALID_BATCH)
    for position, value in damage:
        content[position] = value
    result = load_batch_bytes(bytes(content), tmp_path_factory)
    if not isinstance(result, fg.DataError):
        images, labels = result
        assert images.shape[1:] == (3, 32, 32)
        assert len(labels) == len(images)
        assert 0 <= labels.min() <= labels.max() <= 999


# -------------------------------------------------------------------------------------------------
# Numerical faults

EPS = torch.finfo(torch.float32).eps


def test_project_zero_guess_gets_zero_coefficient():
    G = torch.randn(5, 3, 4, dtype=torch.float64)  # (B, *parameter shape)
    G[1] = 0
    G[3] = 0
    u, zeros = fg.unit_guess({"weight": G})
    # A jvp through train-mode BatchNorm can give a nonzero dot for a zero guess.
    dots = torch.randn(5, dtype=torch.float64)
    update = fg.project(None, u, {"weight": dots})
    kept = [0, 2, 4]
    expected = sum(dots[i] / G[i].norm() * G[i] for i in kept)
    assert zeros == 2
    assert torch.isfinite(update["weight"]).all()
    torch.testing.assert_close(update["weight"], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, magnitude", [
    (torch.float32, 1e-25), (torch.float32, 1e-44), (torch.float32, 1e30),
    (torch.float64, 1e-170), (torch.float64, 1e-320), (torch.float64, 1e300),
])
def test_unit_guess_extreme_magnitudes(dtype, magnitude):
    """Squares of these entries underflow to 0 or overflow to inf, yet the guesses are nonzero."""
    G = torch.tensor([[1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    u, zeros = fg.unit_guess((G * magnitude).to(dtype))
    assert zeros == 1
    # the largest entry divides exactly and 4 squares of +-1 sum to 4, so u_0 = +-0.5 to 1 ulp
    torch.testing.assert_close(u[0], (G[0] / 2).to(dtype), rtol=2 * torch.finfo(dtype).eps,
                               atol=0)
    assert torch.equal(u[1], torch.zeros_like(u[1]))


@given(st.lists(st.integers(-45, 37), min_size=1, max_size=4), st.integers(0, 2**16))
# most squares underflow, yet the direct norm would be nonzero and lose digits
@example([-19], 1)
def test_unit_guess_float32_matches_float64(exponents, seed):
    """Each float32 unit row is within a few float32 eps of the float64 one, whether the norm is
    taken directly or after rescaling. The rows spread over 10 orders of magnitude below 10^e,
    for e anywhere in float32's range."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(50, generator=g, dtype=torch.float64)
            * 10.0 ** (e - 10 * torch.rand(50, generator=g, dtype=torch.float64)) for e in exponents]
    G = torch.stack(rows).float()
    u, zeros = fg.unit_guess(G)
    nonzero = G.abs().amax(dim=1) > 0
    expected = G.double() / G.double().norm(dim=1, keepdim=True).clamp_min(1e-300)
    assert zeros == int((~nonzero).sum())
    # each entry, the norm and the division round once, so 4 eps covers them
    torch.testing.assert_close(u[nonzero].double(), expected[nonzero], rtol=0, atol=4 * EPS)


def test_unit_guess_empty_batch():
    u, zeros = fg.unit_guess(torch.zeros(0, 5))
    assert u.shape == (0, 5)
    assert zeros == 0


def test_unit_guess_float16_large_norm_exact():
    """1 / 40000 is subnormal in float16, so the guess is rescaled first and comes out exact."""
    u, _ = fg.unit_guess(torch.tensor([[40000.0], [-30000.0]], dtype=torch.float16))
    assert u.flatten().tolist() == [1.0, -1.0]
    u, _ = fg.unit_guess(torch.full((1, 4), 30000.0, dtype=torch.float16))
    assert u.flatten().tolist() == [0.5] * 4


def test_train_step_dead_relu_block_gives_zero_guesses():
    torch.manual_seed(0)
    cfg = fg.parse_args(["--blocks", "16", "--width", "4", "--space", "weight",
                         "--checkpoint", "none"])
    model = fg.BlockwiseResNet(16, 4, 3, 10, "cnn")
    dead = 5
    bn = model.blocks[dead][1]  # conv, BatchNorm, ReLU
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.fill_(-1)
    B, J = 8, 16
    x, y = torch.randn(B, 3, 32, 32), torch.arange(B) % 10
    result = fg.train_step(model, x, y, cfg)
    # Block 5 outputs exact zeros. So does every later block at initialization, because
    # BatchNorm turns a zero input into its bias, 0, and ReLU passes no gradient at 0. Each of
    # these blocks has 3 parameter tensors (conv, BatchNorm weight and bias) with B zero
    # guesses each. The last block is trained exactly and has no guess.
    assert result.zero_guesses == 3 * B * (J - 1 - dead)
    assert math.isfinite(result.loss)
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    for p in model.blocks[dead].parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


def silence_aux_nets(model):
    """Multiply each auxiliary net's logits by 0, so that its gradient vanishes exactly."""
    for aux in model.aux:
        aux.register_forward_hook(lambda module, inputs, output: output * 0)


def test_run_vanishing_aux_gradient_counts_zero_guesses(tmp_path, capsys):
    argv = small_run("--epochs", "1", "--weight-decay", "0", "--checkpoint", "none")
    run = fg.Run(fg.parse_args(argv))
    silence_aux_nets(run.model)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert run.train() == 0
    stdout = capsys.readouterr().out
    J = len(run.model.blocks)
    # every one of the 128 examples has a zero guess in each of the J - 1 estimated blocks
    assert f"| zero guesses {128 * (J - 1)}\n" in stdout
    assert run.history[0]["zero_guesses"] == 128 * (J - 1)
    assert math.isfinite(run.history[0]["train_loss"])
    for name, value in run.model.state_dict().items():
        assert torch.isfinite(value.float()).all(), name
        if name.startswith("blocks.") and not name.startswith(f"blocks.{J - 1}."):
            if "running" not in name and "num_batches" not in name:
                assert torch.equal(value, before[name]), name


def poison_block_at_step(monkeypatch, block, step):
    """Make train_step's update of `block` NaN at its `step`-th call (1-based)."""
    real_train_step, calls = fg.train_step, []

    def poisoned(model, x, y, cfg, measure=False):
        calls.append(1)
        if len(calls) != step:
            return real_train_step(model, x, y, cfg, measure)

        def make_gradient_nan(module, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda grad: grad * math.nan)
        handle = model.blocks[block].register_forward_hook(make_gradient_nan)
        try:
            return real_train_step(model, x, y, cfg, measure)
        finally:
            handle.remove()
    monkeypatch.setattr(fg, "train_step", poisoned)


def test_run_non_finite_update_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    checkpoint, out = tmp_path / "run.pt", tmp_path / "results.json"
    argv = small_run("--checkpoint", str(checkpoint), "--out", str(out))
    assert fg.main(argv + ["--epochs", "1"]) == 0
    after_epoch_1 = checkpoint.read_bytes()
    poison_block_at_step(monkeypatch, block=3, step=2)
    status = fg.main(argv + ["--epochs", "2", "--resume"])
    stderr = capsys.readouterr().err
    message = "non-finite update in block 3 at epoch 2, step 2"
    assert status == 1
    assert stderr == (f"error: {message}; {checkpoint} keeps the last good state, at the end of "
                      "epoch 1; lower --lr or set --max-grad-norm and start a new run with "
                      f"another --checkpoint or after deleting {checkpoint}\n")
    assert checkpoint.read_bytes() == after_epoch_1
    results = json.loads(out.read_text())
    assert results["status"] == "diverged"
    assert results["error"] == message
    assert len(results["epochs"]) == 1


def test_run_non_finite_loss_names_block(capsys):
    status = fg.main(small_run("--epochs", "1", "--lr", "1e30", "--checkpoint", "none"))
    stderr = capsys.readouterr().err
    assert status == 1
    assert stderr.startswith("error: non-finite loss nan at epoch 1, step 2, first in the output "
                             "of block 0; lower --lr")


def test_run_weight_overflow_names_net(capsys):
    status = fg.main(small_run("--epochs", "1", "--lr", "3e38", "--momentum", "0",
                               "--checkpoint", "none"))
    stderr = capsys.readouterr().err
    assert status == 1
    assert stderr.startswith("error: non-finite weights in ")
    assert "after the update at epoch 1, step 1; lower --lr" in stderr


def first_batch(run):
    data = run.data
    order = fg.epoch_order(len(data.train_x), run.cfg.seed, 0)[:run.cfg.batch_size]
    return fg.prepare_batch(data, data.train_x[order], data.train_y[order], run.device, False)


def update_norms(max_grad_norm):
    """Return (norm of the gradients SGD applies, norm of the weight change) for one step at
    learning rate 1 without momentum or weight decay, and the norm of the weights before it."""
    run = fg.Run(fg.parse_args(small_run(
        "--lr", "1", "--momentum", "0", "--weight-decay", "0", "--checkpoint", "none",
        "--max-grad-norm", str(max_grad_norm))))
    before = [p.detach().double().clone() for p in run.model.parameters()]
    run.train_batch(*first_batch(run), False)
    params = list(run.model.parameters())
    grad_norm = torch.cat([p.grad.double().flatten() for p in params if p.grad is not None]).norm()
    change = torch.cat([(p.double() - b).flatten() for p, b in zip(params, before)]).norm()
    weight_norm = torch.cat([b.flatten() for b in before]).norm()
    return grad_norm.item(), change.item(), weight_norm.item()


def test_max_grad_norm_bounds_applied_update():
    max_norm = 0.01
    unclipped, _, _ = update_norms(0)
    grad_norm, change, weight_norm = update_norms(max_norm)
    assert unclipped > 10 * max_norm
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6), rounded to float32
    assert grad_norm <= max_norm * (1 + 4 * EPS)
    assert grad_norm >= max_norm * unclipped / (unclipped + 1e-6) * (1 - 4 * EPS)
    # w - g is rounded to float32, an error of at most EPS / 2 of each weight
    assert abs(change - grad_norm) <= EPS * weight_norm


# -------------------------------------------------------------------------------------------------
# Interruption, checkpoints and determinism

def stop_after_steps(run, steps, signum=signal.SIGTERM):
    """Deliver `signum` to run's handler right after its `steps`-th training step."""
    real_train_batch, calls = run.train_batch, []

    def counted(*args):
        result = real_train_batch(*args)
        calls.append(1)
        if len(calls) == steps:
            run.request_stop(signum, None)
        return result
    run.train_batch = counted


def load_checkpoint_file(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a, b):
    """Assert bitwise equal weights, buffers and momentum, and the same epoch history."""
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    momentum_a = [s.get("momentum_buffer") for s in a["optimizer"]["state"].values()]
    momentum_b = [s.get("momentum_buffer") for s in b["optimizer"]["state"].values()]
    assert len(momentum_a) == len(momentum_b)
    for m_a, m_b in zip(momentum_a, momentum_b):
        assert torch.equal(m_a, m_b)
    timing = {"seconds", "images_per_second"}
    history_a, history_b = (
        [{k: v for k, v in epoch.items() if k not in timing} for epoch in c["history"]]
        for c in (a, b))
    assert history_a == history_b
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])


RESUME_CASES = [
    # (estimator settings, training steps before the stop; 4 steps per epoch)
    (["--augment", "on"], 3),
    (["--guess", "random", "--space", "weight", "--noise", "rademacher"], 6),
]


@pytest.mark.parametrize("estimator, stop_step", RESUME_CASES)
def test_run_resume_after_stop_equals_uninterrupted(estimator, stop_step, tmp_path, capsys):
    whole, parts = tmp_path / "whole.pt", tmp_path / "parts.pt"
    argv = small_run("--epochs", "2", *estimator)
    assert fg.Run(fg.parse_args(argv + ["--checkpoint", str(whole)])).train() == 0

    run = fg.Run(fg.parse_args(argv + ["--checkpoint", str(parts)]))
    stop_after_steps(run, stop_step)
    assert run.train() == 128 + signal.SIGTERM
    stopped = load_checkpoint_file(parts)
    assert (stopped["epoch"], stopped["step"]) == divmod(stop_step, 4)
    assert fg.Run(fg.parse_args(argv + ["--checkpoint", str(parts), "--resume"])).train() == 0
    stdout = capsys.readouterr().out
    epoch, step = divmod(stop_step, 4)
    assert f"interrupted after step {step} of epoch {epoch + 1}; resume with --resume" in stdout
    assert f"resumed from {parts} after step {step} of epoch {epoch + 1}" in stdout
    assert_same_training_state(load_checkpoint_file(parts), load_checkpoint_file(whole))


def test_run_same_seed_same_weights(tmp_path):
    states = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        path = tmp_path / f"{name}.pt"
        argv = small_run("--epochs", "1", "--augment", "on", "--seed", seed,
                         "--checkpoint", str(path))
        assert fg.Run(fg.parse_args(argv)).train() == 0
        states.append(load_checkpoint_file(path))
    assert_same_training_state(states[0], states[1])
    assert not torch.equal(states[0]["model"]["blocks.0.0.0.weight"],
                           states[2]["model"]["blocks.0.0.0.weight"])


def run_fg(argv, cwd, **popen):
    """Start fg.py on one CPU thread in a subprocess with its output in a pipe."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fg.py")
    return subprocess.Popen([sys.executable, script, *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_cli_sigterm_then_resume_equals_uninterrupted(tmp_path):
    # 8 steps per epoch, so that the stop falls inside the first epoch
    argv = small_run("--epochs", "2", "--log-steps", "1", "--augment", "on", subset=256)
    whole = run_fg(argv + ["--checkpoint", "whole.pt", "--out", "whole.json"], tmp_path)

    parts = run_fg(argv + ["--checkpoint", "parts.pt", "--out", "parts.json"], tmp_path)
    lines = []
    for line in parts.stdout:
        lines.append(line)
        if line.startswith("epoch 1 step 2/8 "):
            parts.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + parts.communicate(timeout=240)[0]
    assert parts.returncode == 128 + signal.SIGTERM, output
    assert "received SIGTERM: stopping after this step" in output
    stopped = load_checkpoint_file(tmp_path / "parts.pt")
    assert stopped["epoch"] == 0
    assert 2 <= stopped["step"] < 8
    assert (f"interrupted after step {stopped['step']} of epoch 1; resume with --resume "
            "--checkpoint parts.pt") in output
    results = json.loads((tmp_path / "parts.json").read_text())
    assert results["status"] == "interrupted"

    resumed = run_fg(argv + ["--checkpoint", "parts.pt", "--out", "parts.json", "--resume"],
                     tmp_path)
    output = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, output
    assert whole.communicate(timeout=240)[0]
    assert whole.returncode == 0
    assert_same_training_state(load_checkpoint_file(tmp_path / "parts.pt"),
                               load_checkpoint_file(tmp_path / "whole.pt"))
    assert json.loads((tmp_path / "parts.json").read_text())["status"] == "complete"
    assert sorted(os.listdir(tmp_path)) == ["parts.json", "parts.pt", "whole.json", "whole.pt"]


def test_main_second_signal_stops_at_once(tmp_path, monkeypatch, capsys):
    checkpoint, out = tmp_path / "run.pt", tmp_path / "run.json"
    argv = small_run("--epochs", "2", "--checkpoint", str(checkpoint), "--out", str(out))
    real_train_step, calls = fg.train_step, []

    def interrupted_twice(*args):
        calls.append(1)
        if len(calls) == 5:  # the first step of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_train_step(*args)
    monkeypatch.setattr(fg, "train_step", interrupted_twice)
    status = fg.main(argv)
    stderr = capsys.readouterr().err
    assert status == 128 + signal.SIGINT
    assert stderr == (f"error: stopped at once by SIGINT; {checkpoint} contains the state at "
                      "the end of epoch 1\n")
    saved = load_checkpoint_file(checkpoint)
    assert (saved["epoch"], saved["step"]) == (1, 0)
    results = json.loads(out.read_text())
    assert results["status"] == "interrupted"
    assert len(results["epochs"]) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_main_resume_rejects_changed_settings(tmp_path, capsys):
    checkpoint = tmp_path / "run.pt"
    assert fg.main(small_run("--epochs", "0", "--checkpoint", str(checkpoint))) == 0
    status = fg.main(small_run("--epochs", "1", "--lr", "0.1", "--resume",
                               "--checkpoint", str(checkpoint)))
    stderr = capsys.readouterr().err
    assert status == 2
    assert stderr == (f"error: {checkpoint} was written with --lr 0.05 (now 0.1); resume with "
                      "the same settings or choose another --checkpoint\n")


@pytest.mark.parametrize("content, problem", [
    ({"weights": torch.zeros(3)}, "not a checkpoint of fg.py, it lacks alignment, config, "
                                  "cuda_rng, epoch, history, model, optimizer, rng, scheduler, "
                                  "step, totals; choose another --checkpoint"),
    (b"PK\x03\x04 cut off", "cannot load the checkpoint ("),
    (b"not a zip or a pickle", "cannot load the checkpoint (UnpicklingError: "),
])
def test_main_resume_rejects_unreadable_checkpoint(content, problem, tmp_path, capsys):
    checkpoint = tmp_path / "run.pt"
    if isinstance(content, bytes):
        checkpoint.write_bytes(content)
    else:
        torch.save(content, checkpoint)
    status = fg.main(small_run("--epochs", "1", "--resume", "--checkpoint", str(checkpoint)))
    stderr = capsys.readouterr().err
    assert status == 1
    assert stderr.startswith(f"error: {checkpoint}: {problem}")
    assert stderr.count("\n") == 1


@pytest.mark.parametrize("damage, problem", [
    (lambda state: state.pop("scheduler"), "not a checkpoint of fg.py, it lacks scheduler"),
    (lambda state: state.update(epoch="one"), "its position, epoch 'one' and step 0, is not "
                                              "two integers >= 0"),
    (lambda state: state.update(step=-3), "its position, epoch 0 and step -3, is not two "
                                          "integers >= 0"),
    (lambda state: state.update(step=99), "it was saved after step 99 of an epoch, but the "
                                          "training set in --data-dir data has 4 steps per "
                                          "epoch; resume with the data the run started with"),
    (lambda state: state.update(config=[1, 2]), "its config is of type list, not dict"),
    (lambda state: state.update(history=5), "its history is of type int, not list"),
    (lambda state: state.update(rng=torch.zeros(3)), "the saved state does not fit this run "
                                                     "(TypeError: RNG state must be"),
])
def test_main_resume_rejects_damaged_checkpoint(damage, problem, tmp_path, capsys):
    checkpoint = tmp_path / "run.pt"
    assert fg.main(small_run("--epochs", "0", "--checkpoint", str(checkpoint))) == 0
    state = load_checkpoint_file(checkpoint)
    damage(state)
    torch.save(state, checkpoint)
    capsys.readouterr()
    status = fg.main(small_run("--epochs", "1", "--resume", "--checkpoint", str(checkpoint)))
    stderr = capsys.readouterr().err
    assert status == 1
    assert stderr.startswith(f"error: {checkpoint}: {problem}")
    assert stderr.count("\n") == 1


def test_main_out_of_memory_prints_one_line(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "run.pt"

    def exhausted(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 360000000000 bytes.")
    monkeypatch.setattr(fg, "train_step", exhausted)
    status = fg.main(small_run("--epochs", "1", "--checkpoint", str(checkpoint)))
    stderr = capsys.readouterr().err
    assert status == 1
    assert stderr.startswith("error: out of memory on cpu ([enforce fail at alloc_cpu.cpp:117] ")
    assert stderr.endswith(f"lower --width or --batch-size; {checkpoint} contains "
                           "the state before the first step\n")
    assert stderr.count("\n") == 1


def test_main_unwritable_out_fails_before_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results.json"

    def denied(*args, **kwargs):  # as for a read-only folder, which root could still write
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(fg.tempfile, "mkstemp", denied)
    status = fg.main(small_run("--epochs", "1", "--checkpoint", "none", "--out", str(out)))
    captured = capsys.readouterr()
    assert status == 1
    assert captured.err == (f"error: {out}: cannot create a file in {tmp_path} (Permission "
                            "denied)\n")
    assert "epoch " not in captured.out


def test_main_disk_full_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "run.pt"
    real_fdopen, opened = os.fdopen, []

    class FullDisk(io.RawIOBase):
        """A file that fails like a full disk once 1000 bytes are written."""

        def __init__(self, file):
            self.file, self.size = file, 0

        def writable(self):
            return True

        def write(self, data):
            self.size += len(data)
            if self.size > 1000:
                raise OSError(28, "No space left on device")
            return self.file.write(data)

        def close(self):
            self.file.close()
            super().close()

    def full_after_first_file(fd, mode):
        opened.append(fd)
        file = real_fdopen(fd, mode)
        return file if len(opened) == 1 else FullDisk(file)
    monkeypatch.setattr(os, "fdopen", full_after_first_file)
    status = fg.main(small_run("--epochs", "1", "--checkpoint", str(checkpoint)))
    stderr = capsys.readouterr().err
    assert status == 1
    assert stderr == (f"error: {checkpoint}: cannot write the file (No space left on device); its "
                      f"previous version, if any, is unchanged; {checkpoint} contains the state "
                      "before the first step; resume with --resume once it can be written\n")
    saved = load_checkpoint_file(checkpoint)
    assert (saved["epoch"], saved["step"]) == (0, 0)
    assert os.listdir(tmp_path) == ["run.pt"]


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("previous")

    def write_half_then_fail(f):
        f.write(b"{half")
        raise OSError(28, "No space left on device")
    with pytest.raises(fg.WriteError) as error:
        fg.atomic_write(str(path), write_half_then_fail)
    assert str(error.value) == (f"{path}: cannot write the file (No space left on device); its "
                                "previous version, if any, is unchanged")
    assert path.read_text() == "previous"
    assert os.listdir(tmp_path) == ["results.json"]


def test_atomic_write_interrupt_keeps_previous_file(tmp_path):
    path = tmp_path / "run.pt"
    path.write_text("previous")

    def write_half_then_interrupt(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fg.atomic_write(str(path), write_half_then_interrupt)
    assert path.read_text() == "previous"
    assert os.listdir(tmp_path) == ["run.pt"]


def test_atomic_write_new_file_has_umask_mode(tmp_path):
    path = tmp_path / "results.json"
    fg.atomic_write(str(path), lambda f: f.write(b"{}"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b"{}"
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
