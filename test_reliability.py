"""Failure modes of fg.py: input validation, data faults, non-finite values, interruption.

Training runs use the synthetic dataset at width 4 on one CPU thread, so the file takes about a
minute. The real Fashion-MNIST files serve only as sources for corrupt copies.

    python -m pytest -q test_reliability.py
"""

import contextlib
import io
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import fg

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
    assert "invalid value for --device: cuda; CUDA is not available here, use --device cpu" in stderr


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
