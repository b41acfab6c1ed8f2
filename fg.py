"""Forward-gradient training of a blockwise ResNet-18.

A reproduction of Fournier, Rivaud, Belilovsky, Eickenberg and Oyallon, "Can Forward Gradient
Match Backpropagation?" (ICML 2023, arXiv 2306.06968). The network is split into J blocks, and
every block but the last has a small auxiliary classifier. Block j is trained with the projection
of a gradient target G onto a gradient guess G~, done per example:

    g_hat_i = <G_i, G~_i> / ||G~_i||^2 * G~_i,        update = sum_i g_hat_i

where <G_i, G~_i> is a directional derivative computed in forward mode (torch.func.jvp) and G~ is
a cheap local gradient, such as that of the block's auxiliary loss. The last block and the
auxiliary nets receive their exact gradients.

    python fg.py --target global --guess aux --space activation     # the paper's main method
    python fg.py --target global --guess global                     # backprop
    python fg.py --target local --guess aux                         # greedy local learning

The estimator functions (BlockPass, unit_guess, target_dots, project, ...) take plain
modules and tensors and work on other models; README.md shows how.
"""

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import pickle
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
import types
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.func import jvp, vmap

# torch 2.14 builds its forward-mode decompositions with torch.jit.script on the first jvp, which
# prints one deprecation warning per decomposition.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

# -------------------------------------------------------------------------------------------------
# Configuration

TARGETS = ("global", "local", "above")
GUESSES = ("random", "ntk", "fixed-ntk", "aux", "above", "global")
DATASETS = ("cifar10", "fashion-mnist", "imagenet32", "synthetic")

# The loss whose gradient each guess is; random guesses come from no loss.
GUESS_LOSS = {"aux": "local", "ntk": "local", "fixed-ntk": "local", "above": "above",
              "global": "global", "random": None}


@dataclass
class Config:
    # data
    dataset: str = field(default="cifar10", metadata={"choices": DATASETS, "help": "dataset"})
    data_dir: str = field(default="data", metadata={
        "help": "folder with the dataset files (CIFAR-10 is downloaded here when a network is "
                "reachable)"})
    train_subset: int = field(default=0, metadata={
        "help": "train on this many examples drawn at random by --seed (0: all)"})
    augment: str = field(default="auto", metadata={
        "choices": ("auto", "on", "off"),
        "help": "random crop (padding 4) and horizontal flip; auto: on for cifar10 and imagenet32"})
    # model
    blocks: int = field(default=8, metadata={"choices": (8, 16),
                                             "help": "8: one BasicBlock each; 16: one conv each"})
    width: int = field(default=64, metadata={
        "help": "channels of the first stage; later stages and auxiliary nets scale with it"})
    aux: str = field(default="cnn", metadata={"choices": ("linear", "mlp", "cnn"),
                                              "help": "auxiliary net after each block but the last"})
    # estimator
    target: str = field(default="global", metadata={
        "choices": TARGETS, "help": "gradient to estimate for each block but the last"})
    guess: str = field(default="aux", metadata={
        "choices": GUESSES, "help": "direction the target is projected onto"})
    space: str = field(default="activation", metadata={
        "choices": ("weight", "activation"),
        "help": "project per parameter tensor (weight) or at the block output (activation)"})
    engine: str = field(default="jvp", metadata={
        "choices": ("jvp", "autograd"),
        "help": "<G, G~> by forward mode (jvp) or by exact reverse mode (autograd)"})
    noise: str = field(default="gaussian", metadata={
        "choices": ("gaussian", "rademacher"), "help": "distribution of random guesses"})
    random_estimator: str = field(default="unbiased", metadata={
        "choices": ("unbiased", "projection"),
        "help": "random guesses: <G,v> v (unbiased) or <G,v> / ||v||^2 v (projection)"})
    # optimization
    epochs: int = field(default=100, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "examples per step"})
    lr: float = field(default=0.05, metadata={"help": "SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    lr_step: int = field(default=30, metadata={"help": "epochs between learning-rate decays"})
    lr_decay: float = field(default=0.2, metadata={"help": "learning-rate factor at each decay"})
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "clip the norm of the update of all parameters together to this value, before "
                "momentum and weight decay (0: no clipping)"})
    bn_recalibration: int = field(default=0, metadata={
        "help": "before each test pass, replace the BatchNorm running statistics by their average "
                "over this many training batches (0: keep the running averages, as the paper "
                "does). Weight-space estimators move the statistics faster than the running "
                "averages follow"})
    # run
    seed: int = field(default=0, metadata={"help": "seed for weights, data order and noise"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu, "
                                                          "cuda or cuda:N"})
    out: str = field(default="", metadata={"help": "write the results JSON to this file"})
    checkpoint: str = field(default="auto", metadata={
        "help": "checkpoint file, written every epoch and on interruption; auto: "
                "checkpoints/<settings>.pt; none: no checkpoint"})
    resume: bool = field(default=False, metadata={
        "help": "continue from --checkpoint when it exists, else start from scratch"})
    log_alignment: int = field(default=0, metadata={
        "help": "every N steps, record per block the cosine and norm ratio between the update "
                "and the true end-to-end gradient (0: off)"})
    log_steps: int = field(default=0, metadata={
        "help": "also print the running train loss every N steps (0: once per epoch)"})
    benchmark: bool = field(default=False, metadata={
        "help": "time every estimator on the same batches and print a table, then exit"})
    benchmark_steps: int = field(default=5, metadata={
        "help": "timing rounds; each round times one step of every configuration"})
    benchmark_configs: str = field(default="all", metadata={
        "choices": ("all", "main"),
        "help": "all: every target, guess, space and engine; main: backprop, local learning and "
                "the global target with random, ntk and aux guesses"})


def build_parser():
    parser = argparse.ArgumentParser(
        description="Forward-gradient training of a blockwise ResNet-18.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float, "str": str}[getattr(f.type, "__name__", f.type)]
        parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"],
                            choices=f.metadata.get("choices"))
    return parser


def number_problem(cfg):
    """Return a message naming the first numeric setting out of its range, or None."""
    checks = [
        ("--epochs", cfg.epochs, cfg.epochs >= 0, "an integer >= 0"),
        # train-mode BatchNorm needs two examples per batch to compute a variance
        ("--batch-size", cfg.batch_size, cfg.batch_size >= 2, "an integer >= 2"),
        ("--width", cfg.width, cfg.width >= 1, "an integer >= 1"),
        ("--lr", cfg.lr, 0 < cfg.lr < math.inf, "a finite number > 0"),
        ("--momentum", cfg.momentum, 0 <= cfg.momentum < 1, "a number in [0, 1)"),
        ("--weight-decay", cfg.weight_decay, 0 <= cfg.weight_decay < math.inf,
         "a finite number >= 0"),
        ("--lr-step", cfg.lr_step, cfg.lr_step >= 1, "an integer >= 1"),
        ("--lr-decay", cfg.lr_decay, 0 < cfg.lr_decay <= 1, "a number in (0, 1]"),
        ("--max-grad-norm", cfg.max_grad_norm, 0 <= cfg.max_grad_norm < math.inf,
         "a finite number >= 0 (0: no clipping)"),
        ("--train-subset", cfg.train_subset, cfg.train_subset == 0 or cfg.train_subset >= 2,
         "0 (all examples) or an integer >= 2"),
        # epoch_order seeds a generator with seed * 100003 + epoch, which must stay below 2**64
        ("--seed", cfg.seed, 0 <= cfg.seed < 2**32, "an integer in [0, 4294967295]"),
        ("--bn-recalibration", cfg.bn_recalibration, cfg.bn_recalibration >= 0,
         "an integer >= 0 (0: off)"),
        ("--log-alignment", cfg.log_alignment, cfg.log_alignment >= 0, "an integer >= 0"),
        ("--log-steps", cfg.log_steps, cfg.log_steps >= 0, "an integer >= 0"),
        ("--benchmark-steps", cfg.benchmark_steps, cfg.benchmark_steps >= 1, "an integer >= 1"),
    ]
    for flag, value, ok, valid in checks:
        if not ok:
            return f"invalid value for {flag}: {value}; expected {valid}"
    return None


def device_problem(name):
    """Return a message if --device names no device of this machine, or None."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", name):
        return f"invalid value for --device: {name}; expected auto, cpu, cuda or cuda:N"
    if not name.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return f"invalid value for --device: {name}; CUDA is not available here, use --device cpu"
    count = torch.cuda.device_count()
    if int(name.partition(":")[2] or 0) >= count:
        return (f"invalid value for --device: {name}; expected cuda:0 to cuda:{count - 1}, "
                "the CUDA devices of this machine")
    return None


def existing_ancestor(path):
    """Return the nearest existing path above `path`. The loop ends at the root at the latest."""
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    return above


def path_problem(cfg):
    """Return a message if a file or folder setting cannot work, or None."""
    if cfg.dataset != "synthetic" and os.path.isfile(cfg.data_dir):
        return f"invalid value for --data-dir: {cfg.data_dir} is a file; expected a folder"
    if cfg.checkpoint == "":
        return "invalid value for --checkpoint: an empty name; expected a file name, auto or none"
    checkpoint = checkpoint_path(cfg)
    for flag, path in (("--out", cfg.out), ("--checkpoint", checkpoint)):
        if path and (os.path.isdir(path) or path.endswith(os.sep)):
            return f"invalid value for {flag}: {path} is a folder; expected a file name"
        above = path and existing_ancestor(path)
        if above and not os.path.isdir(above):
            return (f"invalid value for {flag}: {path} cannot be created because {above} is a "
                    "file, not a folder; choose a path in a folder")
        # a rename would replace a device, a pipe or a socket at that path with a plain file
        if path and os.path.exists(path) and not os.path.isfile(path):
            return (f"invalid value for {flag}: {path} is not a regular file; expected a file "
                    "name")
    if cfg.out and checkpoint and os.path.realpath(cfg.out) == os.path.realpath(checkpoint):
        return (f"invalid value for --out: {cfg.out} is also the checkpoint file; choose "
                "different files for --out and --checkpoint")
    if cfg.resume and checkpoint is None:
        return "--resume needs a checkpoint file; remove --checkpoint none"
    # Starting over would replace the checkpoint of an earlier run after one epoch.
    if checkpoint and not cfg.resume and not cfg.benchmark and os.path.exists(checkpoint):
        return (f"--checkpoint {checkpoint} already exists; pass --resume to continue that run, "
                "or delete the file or choose another --checkpoint to start over")
    return None


def changed_setting(cfg, names):
    """Return (flag, flag with its value) for the first of the Config fields `names` that differs
    from its default, or None. A switch is named by its flag alone."""
    for name in names:
        value = getattr(cfg, name)
        if value != Config.__dataclass_fields__[name].default:
            flag = "--" + name.replace("_", "-")
            return flag, flag if isinstance(value, bool) else f"{flag} {value}"
    return None


def combination_problem(cfg):
    """Return a message if a setting would be ignored by the chosen guess or mode, or None. The
    benchmark runs random guesses whatever --guess is, so it takes the random-guess settings as
    given."""
    if cfg.benchmark and cfg.out:
        return (f"--out {cfg.out} does not apply to --benchmark, which prints its table; remove "
                "--out")
    if cfg.benchmark:
        changed = changed_setting(cfg, ("resume", "log_alignment", "log_steps", "bn_recalibration"))
        if changed:
            return (f"{changed[1]} does not apply to --benchmark, which trains no model; "
                    f"remove {changed[0]}")
        return None
    changed = changed_setting(cfg, ("benchmark_steps", "benchmark_configs"))
    if changed:
        return f"{changed[1]} applies only to --benchmark; add --benchmark or remove {changed[0]}"
    changed = None if cfg.guess == "random" else changed_setting(cfg, ("noise", "random_estimator"))
    if changed:
        return (f"{changed[1]} applies only to --guess random, not --guess {cfg.guess}; "
                f"remove {changed[0]} or pass --guess random")
    return None


def parse_args(argv=None):
    """Parse the command line into a Config; invalid values exit with status 2 naming the flag."""
    parser = build_parser()
    cfg = Config(**vars(parser.parse_args(argv)))
    problem = (number_problem(cfg) or combination_problem(cfg) or device_problem(cfg.device)
               or path_problem(cfg))
    if problem:
        parser.error(problem)
    return cfg


class DataError(Exception):
    """A dataset file is missing, corrupt or not of the expected form."""


class UsageError(DataError):
    """A command-line value is invalid for the data or files at hand."""


# -------------------------------------------------------------------------------------------------
# Data: every dataset becomes uint8 images (N, C, H, W) and int64 labels held in memory.

DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"

# The files each dataset needs in --data-dir, as error messages name them.
EXPECTED_FILES = {
    "fashion-mnist": "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
                     "and t10k-labels-idx1-ubyte, each gzipped (.gz) or not",
    "imagenet32": "train_data_batch_1 to train_data_batch_10 and val_data, the unpacked pickles "
                  "of downsampled ImageNet 32x32",
}


def read_idx(path):
    """Read an idx file (the MNIST format), gzipped or not, into a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    # gzip raises EOFError for a cut-off file, BadGzipFile for a bad header or checksum and
    # zlib.error for a damaged compressed stream.
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: the gzip data is truncated or corrupt ({e}); replace the file "
                        "with an intact copy") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes: the magic number is "
                        f"0x{raw[:4].hex()}, expected 0x000008 followed by the number of "
                        "dimensions; replace the file with an intact copy")
    ndim, start = raw[3], 4 + 4 * raw[3]
    if len(raw) < start:
        raise DataError(f"{path}: the idx header of {ndim} dimensions is cut off after "
                        f"{len(raw)} bytes; the file is truncated")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - start != math.prod(shape):
        raise DataError(f"{path}: header declares shape {shape} ({math.prod(shape)} bytes) "
                        f"but the file holds {len(raw) - start}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape)


def find_idx(folder, stem):
    for sub in ("", "FashionMNIST/raw", "raw"):
        for suffix in (".gz", ""):
            path = os.path.join(folder, sub, stem + suffix)
            if os.path.isfile(path):
                return path
    return None


def load_fashion_mnist(folder):
    """Read the four idx files from folder or its FashionMNIST/raw. Nothing is downloaded, so an
    offline machine gets the list of files to copy instead of a network error."""
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [find_idx(folder, s) for s in stems]
    if None in paths:
        missing = [s for s, p in zip(stems, paths) if p is None]
        raise DataError(
            f"Fashion-MNIST files missing in {folder}: {', '.join(missing)}; copy "
            f"{EXPECTED_FILES['fashion-mnist']} into {folder}, for example from "
            f"{DEBIAN_FASHION}, where Debian's dataset-fashion-mnist package installs them")
    arrays = [read_idx(p) for p in paths]
    for (images, labels), (pi, pl) in zip((arrays[:2], arrays[2:]), (paths[:2], paths[2:])):
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{pi}: images of shape {images.shape[1:]}, expected (28, 28); "
                            "the file is not Fashion-MNIST images")
        if labels.shape != (len(images),):
            raise DataError(f"{pl}: labels of shape {labels.shape} for the {len(images)} images "
                            f"in {pi}; expected one label per image")
    images = [torch.from_numpy(a.copy())[:, None] for a in arrays[0::2]]
    labels = [torch.from_numpy(a.astype(np.int64)) for a in arrays[1::2]]
    return images[0], labels[0], images[1], labels[1], paths[1::2]


def load_cifar10(folder):
    try:
        sets = [torchvision.datasets.CIFAR10(folder, train=t, download=True) for t in (True, False)]
    except Exception as e:  # offline, or a corrupt archive that fails the checksum
        raise DataError(
            f"CIFAR-10 is missing or damaged in {folder} and could not be downloaded "
            f"({type(e).__name__}: {e}); put cifar-10-python.tar.gz or its extracted folder "
            f"cifar-10-batches-py in {folder} (from https://www.cs.toronto.edu/~kriz/cifar.html)"
        ) from None
    out = []
    for s in sets:
        out += [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(s.targets, dtype=torch.int64)]
    return (*out, [os.path.join(folder, "cifar-10-batches-py")] * 2)


# Numpy arrays in a pickle are rebuilt by the stand-ins below, not by numpy: numpy's own
# __setstate__ trusts the pickled dtype header, and damaged headers made numpy 2.4 raise
# SystemError or crash the interpreter.

class PickledDtype:
    """A dtype read from a pickle: a plain number type code such as 'u1' and its byte order."""

    def __init__(self, code, align=False, copy=True):
        if not (isinstance(code, str) and re.fullmatch(r"[biuf][1248]", code)):
            raise pickle.UnpicklingError(f"dtype {code!r} is not a plain number type")
        self.code, self.byteorder = code, "|"

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 8 and state[1] in ("<", ">", "|", "=")
                and state[2:5] == (None, None, None) and state[7] == 0):
            raise pickle.UnpicklingError(f"damaged header of dtype {self.code}")
        self.byteorder = state[1]


def pickled_array(raw, dtype, shape, order="C"):
    """Build an array from the parts a pickle stores, after checking that they agree. The
    arguments are those of numpy's _frombuffer."""
    if not (isinstance(dtype, PickledDtype) and isinstance(shape, tuple)
            and all(isinstance(n, int) and n >= 0 for n in shape) and order in ("C", "F")):
        raise pickle.UnpicklingError("damaged array header")
    # Python 2 pickles store the bytes as a string, which encoding="latin1" decodes one to one.
    raw = raw.encode("latin1") if isinstance(raw, str) else raw
    dtype = np.dtype(dtype.code).newbyteorder(dtype.byteorder)
    size = memoryview(raw).nbytes
    if size != math.prod(shape) * dtype.itemsize:
        raise pickle.UnpicklingError(f"array of shape {shape} and type {dtype} stored in {size} "
                                     "bytes")
    return np.frombuffer(raw, dtype).reshape(shape, order=order)


class PickledArray:
    """An array that pickle protocols 2 to 4 create empty, then fill by __setstate__."""

    def __init__(self, *args):
        self.array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("damaged array state")
        _, shape, dtype, fortran, raw = state
        self.array = pickled_array(raw, dtype, shape, "F" if fortran else "C")


def latin1_bytes(text, encoding):
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}")
    return text.encode("latin1")


# The globals a pickled ImageNet32 batch may name, under the module names of numpy 1 and 2.
PICKLE_GLOBALS = {("numpy", "dtype"): PickledDtype, ("numpy", "ndarray"): PickledArray,
                  ("_codecs", "encode"): latin1_bytes}
for numpy_core in ("numpy.core", "numpy._core"):
    PICKLE_GLOBALS[numpy_core + ".multiarray", "_reconstruct"] = PickledArray
    PICKLE_GLOBALS[numpy_core + ".multiarray", "scalar"] = (
        lambda dtype, raw: pickled_array(raw, dtype, ())[()])
    PICKLE_GLOBALS[numpy_core + ".numeric", "_frombuffer"] = pickled_array


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain Python values only, so that a corrupt or
    foreign file can neither run code nor reach numpy's unchecked array constructors."""

    def find_class(self, module, name):
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"the pickle refers to {module}.{name}, which no "
                                         "ImageNet32 batch does")
        return PICKLE_GLOBALS[module, name]


def unpickled_array(value):
    return np.asarray(value.array if isinstance(value, PickledArray) else value)


def load_imagenet32_file(path):
    """Read one pickled batch into uint8 images (N, 3, 32, 32) and labels 0..999."""
    try:
        with open(path, "rb") as f:
            # latin1 decodes the byte strings in numpy arrays pickled by Python 2
            batch = BatchUnpickler(f, encoding="latin1").load()
        data, labels = unpickled_array(batch["data"]), unpickled_array(batch["labels"])
    # A damaged pickle stream fails in the unpickler's stack or memo with any of these.
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, IndexError, TypeError,
            ValueError, AttributeError, OverflowError, MemoryError) as e:
        raise DataError(f"{path}: not a readable ImageNet32 batch ({type(e).__name__}: {e}); "
                        "expected a pickled dict with 'data' and 'labels'; replace the file "
                        "with an intact copy") from None
    not_bytes = data.dtype.kind not in "ui" or (
        data.dtype != np.uint8 and data.size > 0 and (data.min() < 0 or data.max() > 255))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or not_bytes:
        raise DataError(f"{path}: 'data' is {data.dtype} of shape {data.shape}; expected "
                        "N images of 3x32x32 pixels as integers 0..255 of shape (N, 3072)")
    if labels.shape != (len(data),) or labels.dtype.kind not in "ui":
        raise DataError(f"{path}: 'labels' is {labels.dtype} of shape {labels.shape}; expected "
                        f"{len(data)} integers, one per image")
    if len(labels) and (labels.min() < 1 or labels.max() > 1000):
        raise DataError(f"{path}: labels range over [{labels.min()}, {labels.max()}]; expected "
                        "[1, 1000], the ImageNet classes")
    images = torch.from_numpy(data.astype(np.uint8)).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels.astype(np.int64) - 1)


def load_imagenet32(folder):
    train_paths = [os.path.join(folder, f"train_data_batch_{i}") for i in range(1, 11)]
    test_path = os.path.join(folder, "val_data")
    missing = [p for p in train_paths + [test_path] if not os.path.isfile(p)]
    if missing:
        raise DataError(f"ImageNet32 files missing in {folder}: "
                        f"{', '.join(os.path.basename(p) for p in missing)}; copy "
                        f"{EXPECTED_FILES['imagenet32']} into {folder}")
    train = [load_imagenet32_file(p) for p in train_paths]
    test_x, test_y = load_imagenet32_file(test_path)
    train_x, train_y = torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train])
    return train_x, train_y, test_x, test_y, [folder + "/train_data_batch_*", test_path]


def make_synthetic(seed, train_size=1024, test_size=256, shape=(3, 32, 32), classes=10):
    """Images of 10 classes, each a fixed smooth random pattern plus noise, learnable in an epoch."""
    g = torch.Generator().manual_seed(seed + 12345)
    coarse = torch.rand(classes, shape[0], 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    out = []
    for n in (train_size, test_size):
        y = torch.randint(classes, (n,), generator=g)
        x = 0.6 * patterns[y] + 0.4 * torch.rand(n, *shape, generator=g)
        out += [(x * 255).round().to(torch.uint8), y]
    return (*out, ["synthetic"] * 2)


@dataclass
class Data:
    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor  # (C,) per-channel mean of the training images, in [0, 1]
    std: torch.Tensor
    classes: int
    augment: bool


def load_data(cfg):
    """Load cfg.dataset into memory, validated; raises DataError naming the file at fault."""
    if cfg.dataset == "synthetic":
        parts = make_synthetic(cfg.seed)
    else:
        if not os.path.isdir(cfg.data_dir) and cfg.dataset != "cifar10":
            hint = (f"; Debian's dataset-fashion-mnist package installs them in {DEBIAN_FASHION}"
                    if cfg.dataset == "fashion-mnist" else "")
            raise DataError(f"--data-dir {cfg.data_dir} does not exist; pass the folder that "
                            f"holds {EXPECTED_FILES[cfg.dataset]}{hint}")
        loader = {"cifar10": load_cifar10, "fashion-mnist": load_fashion_mnist,
                  "imagenet32": load_imagenet32}[cfg.dataset]
        parts = loader(cfg.data_dir)
    train_x, train_y, test_x, test_y, (train_file, test_file) = parts
    classes = {"cifar10": 10, "fashion-mnist": 10, "imagenet32": 1000, "synthetic": 10}[cfg.dataset]
    for name, x, y in ((train_file, train_x, train_y), (test_file, test_x, test_y)):
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise DataError(f"{name}: labels range over [{y.min()}, {y.max()}], expected "
                            f"[0, {classes - 1}] for {cfg.dataset}")
    if len(train_x) < 2 or len(test_x) < 1:
        raise DataError(f"{train_file}: {len(train_x)} training and {len(test_x)} test examples; "
                        "expected at least 2 and 1")
    if test_x.shape[1:] != train_x.shape[1:]:
        raise DataError(f"{test_file}: images of shape {tuple(test_x.shape[1:])} differ from the "
                        f"training images' {tuple(train_x.shape[1:])}")
    if cfg.train_subset:
        if cfg.train_subset > len(train_x):
            raise UsageError(f"invalid value for --train-subset: {cfg.train_subset}; expected 0 "
                             f"(all examples) or an integer in [2, {len(train_x)}], the number "
                             f"of {cfg.dataset} training examples")
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed))
        keep = keep[:cfg.train_subset]
        train_x, train_y = train_x[keep], train_y[keep]
    # per-channel statistics from at most 50,000 images keep this quick on ImageNet32
    sample = train_x[:50000].double() / 255
    mean, std = sample.mean((0, 2, 3)).float(), sample.std((0, 2, 3)).float().clamp_min(1e-3)
    augment = cfg.augment == "on" or (cfg.augment == "auto" and cfg.dataset in
                                      ("cifar10", "imagenet32"))
    return Data(train_x, train_y, test_x, test_y, mean, std, classes, augment)


def prepare_batch(data, x, y, device, augment):
    """Move a uint8 batch to the device, augment it if asked, and normalize it per channel."""
    x = x.to(device, non_blocking=True).float() / 255
    if augment:
        B, C, H, W = x.shape
        padded = F.pad(x, (4, 4, 4, 4))  # zero padding, as torchvision's RandomCrop(padding=4)
        dy, dx = (torch.randint(0, 9, (2, B), device=device))
        rows = (dy[:, None] + torch.arange(H, device=device))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(W, device=device))[:, None, :]  # (B, 1, W)
        x = padded.permute(0, 2, 3, 1)[torch.arange(B, device=device)[:, None, None], rows, cols]
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        flip = torch.rand(B, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    mean, std = data.mean.to(device), data.std.to(device)
    return (x - mean[:, None, None]) / std[:, None, None], y.to(device, non_blocking=True)


def epoch_order(n, seed, epoch):
    """The data order of one epoch, a function of seed and epoch alone so that resuming is exact."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


# -------------------------------------------------------------------------------------------------
# Model: ResNet-18 split into blocks, each block but the last followed by an auxiliary net.

def conv_bn_relu(c_in, c_out, stride=1, kernel=3):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = conv_bn_relu(c_in, c_out, stride)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


def classifier_head(channels, classes):
    return nn.Sequential(nn.BatchNorm2d(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, classes))


def make_blocks(blocks, width, in_channels, classes):
    """Return the blocks and each block's output channels; the last block ends in the classifier."""
    stage_widths = [width, 2 * width, 4 * width, 8 * width]
    if blocks == 8:
        # one BasicBlock each; stride 2 and a projection shortcut where a stage starts
        widths = [w for w in stage_widths for _ in range(2)]
        layers = [nn.Sequential(conv_bn_relu(in_channels, width), BasicBlock(width, width, 1))]
        for j in range(1, 8):
            layers.append(BasicBlock(widths[j - 1], widths[j], 2 if j % 2 == 0 else 1))
    else:
        # one conv each, no residual connections; block 0 also holds the stem conv
        widths = [w for w in stage_widths for _ in range(4)]
        layers = [nn.Sequential(conv_bn_relu(in_channels, width), conv_bn_relu(width, width))]
        for j in range(1, 16):
            layers.append(conv_bn_relu(widths[j - 1], widths[j], 2 if j % 4 == 0 else 1))
    layers[-1] = nn.Sequential(layers[-1], classifier_head(widths[-1], classes))
    return layers, widths


def make_aux(kind, channels, classes, hidden):
    """An auxiliary classifier for a block output of the given channels."""
    if kind == "linear":
        return nn.Sequential(nn.BatchNorm2d(channels), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(4 * channels, classes))
    if kind == "mlp":
        layers, size = [nn.AdaptiveAvgPool2d(2), nn.Flatten()], 4 * channels
        for _ in range(3):
            layers += [nn.Linear(size, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()]
            size = hidden
        return nn.Sequential(*layers, nn.Linear(hidden, classes))
    return nn.Sequential(conv_bn_relu(channels, hidden, kernel=1),
                         *[conv_bn_relu(hidden, hidden, stride=2) for _ in range(3)],
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * hidden, classes))


class BlockwiseResNet(nn.Module):
    def __init__(self, blocks=8, width=64, in_channels=3, classes=10, aux="cnn"):
        super().__init__()
        layers, widths = make_blocks(blocks, width, in_channels, classes)
        self.blocks = nn.ModuleList(layers)
        # auxiliary widths at width 64: MLP 1024 (8 blocks) or 512 (16); CNN 32 or 16
        base = {"mlp": 1024, "cnn": 32, "linear": 0}[aux] // (1 if blocks == 8 else 2)
        hidden = max(1, base * width // 64)
        self.aux = nn.ModuleList(make_aux(aux, widths[j], classes, hidden)
                                 for j in range(blocks - 1))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def loss_logits(self, j, h, kind):
        """Logits of the loss `kind` (local, above or global) as a function of block j's output h."""
        last = len(self.blocks) - 1
        if kind == "local":
            return self.aux[j](h)
        if kind == "above":
            h = self.blocks[j + 1](h)
            return h if j + 1 == last else self.aux[j + 1](h)
        for block in self.blocks[j + 1:]:
            h = block(h)
        return h


def count_flops(module, x):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


@torch.no_grad()
def block_flops(model, image_shape):
    """FLOPs (conv and linear) per example of each block and of each auxiliary net."""
    was_training = model.training
    model.eval()  # BatchNorm in train mode needs more than one example
    x = torch.zeros(1, *image_shape, device=next(model.parameters()).device)
    blocks, aux = [], []
    for j, block in enumerate(model.blocks):
        blocks.append(count_flops(block, x))
        x = block(x)
        aux.append(count_flops(model.aux[j], x) if j < len(model.aux) else 0)
    model.train(was_training)
    return blocks, aux


def aux_flop_shares(model, image_shape):
    """Each auxiliary net's FLOPs as a fraction of its block's."""
    blocks, aux = block_flops(model, image_shape)
    return [a / b for a, b in zip(aux[:-1], blocks)]


# -------------------------------------------------------------------------------------------------
# Estimators. Notation: G is the target gradient, G~ the guess, B the batch size. A "slice" G_i is
# example i's share of the gradient of the batch mean loss, so that sum_i G_i = G.

def unit_guess(G_guess):
    """Return (u, zero count): u_i = G~_i / ||G~_i|| per example (per tensor in weight space),
    and u_i = 0 where G~_i = 0, which the count reports.

    The projection estimator is g_hat_i = <G_i, G~_i> / ||G~_i||^2 G~_i = <G_i, u_i> u_i. It is
    never an ascent direction, <g_hat_i, G_i> = <G_i, u_i>^2 >= 0, it is biased towards G~, and
    scaling G~_i by any nonzero constant leaves it unchanged. Computing <G_i, u_i> by forward mode
    on unit tangents keeps the error of one jvp under BatchNorm (see jvp_per_example) from being
    divided by a small ||G~_i||.
    """
    if isinstance(G_guess, dict):
        units = {n: unit_guess(G) for n, G in G_guess.items()}
        return {n: u for n, (u, _) in units.items()}, sum(z for _, z in units.values())
    shape = (-1, *[1] * (G_guess.dim() - 1))
    norms = torch.linalg.vector_norm(G_guess.flatten(1), dim=1)
    # One division by the norm is accurate unless squares underflow or overflow. Squares below
    # the smallest normal number (tiny) lose digits, but d of them sum to less than d * tiny, a
    # relative error of at most eps where norm^2 >= d * tiny / eps. An overflow makes it inf.
    # 1 / norm must also stay a normal number, which fails for float16 norms above 16384.
    info = torch.finfo(G_guess.dtype)
    smallest = math.sqrt(G_guess.flatten(1).shape[1] * info.tiny / info.eps)
    accurate = (norms >= smallest) & (norms * info.tiny <= 1) & norms.isfinite()
    if bool(accurate.all()):
        return G_guess * (1 / norms).view(shape), 0
    # dividing by the largest entry first keeps the squares of tiny or huge guesses finite and
    # nonzero, so only a guess that is exactly 0 counts as zero
    largest = G_guess.flatten(1).abs().amax(dim=1)
    zero = largest == 0
    scaled = G_guess / torch.where(zero, 1, largest).view(shape)
    norms = torch.linalg.vector_norm(scaled.flatten(1), dim=1)
    scale = torch.where(zero, torch.zeros_like(norms), 1 / torch.where(zero, 1, norms))
    return scaled * scale.view(shape), int(zero.sum())


def random_guess(shape, noise, like):
    """Noise v with E[v v^T] = I: Gaussian, or Rademacher (+-1 with equal odds).

    With v as the guess, <G, v> v is an unbiased estimate of G whose variance per coordinate k is
    ||G||^2 + G_k^2 (Gaussian) or ||G||^2 - G_k^2 (Rademacher), so it grows with the dimension.
    The projection form <G, v> / ||v||^2 v has mean G / d for d coordinates, a bias by a factor
    of 1/d: E[v v^T / ||v||^2] = I / d, by symmetry for Gaussian noise and because ||v||^2 = d
    for Rademacher noise.
    """
    if noise == "rademacher":
        return torch.randint(0, 2, shape, device=like.device).to(like.dtype) * 2 - 1
    return torch.randn(shape, device=like.device, dtype=like.dtype)


@contextlib.contextmanager
def frozen_bn_stats(*modules):
    """Keep the BatchNorm layers of `modules` from updating their running statistics while the
    with-statement runs; train-mode layers still normalize with the batch statistics.

    torch.func.jvp rejects the in-place update of a captured buffer (pytorch issue 85533), so the
    jvp calls run with tracking off and the statistics are updated by the ordinary forward pass.
    """
    layers = dict.fromkeys(m for module in modules for m in module.modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm)
                           and m.track_running_stats)
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class BatchNormJvp(torch.autograd.Function):
    """Train-mode batch normalization, y = w * x^ + b with x^ = (x - mean) / sqrt(var + eps)
    over the batch (and spatial) dimensions, with a forward-mode rule and no backward.

    The tangent, with s = w / sqrt(var + eps) and means over the batch and spatial dimensions,
        dy = s * (dx - mean(dx) - x^ * mean(x^ * dx)) + x^ * dw + db,
    takes two reductions over dx and two fused multiply-adds of its size. Under vmap a global/aux
    weight-space step takes about 0.75 of its time with torch's rule for native_batch_norm
    (torch 2.14.1, 2-core CPU, width 16, batch 128).
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, _ = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_forward(x, weight, mean, invstd)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _):
        x, weight, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        if dx is None:
            dy = torch.zeros_like(x_hat)
        else:
            scale = invstd.view(shape) if weight is None else (invstd * weight).view(shape)
            mean_dx = dx.mean(dims, keepdim=True)
            mean_x_hat_dx = (x_hat * dx).mean(dims, keepdim=True)
            # the constant and x^ terms first, then dx: two passes over a tensor of dx's size
            dy = torch.addcmul(torch.addcmul(-mean_dx * scale, x_hat, -mean_x_hat_dx * scale),
                               dx, scale)
        if dweight is not None:
            dy = torch.addcmul(dy, x_hat, dweight.view(shape))
        if dbias is not None:
            dy = dy + dbias.view(shape)
        return dy, None, None


def batch_norm_for_jvp(bn, x):
    """Normalize x with its batch statistics for bn inside forward_mode_bn: through BatchNormJvp
    where autograd is off, and through torch's own rule where it is on."""
    if torch.is_grad_enabled() or not bn.training:
        return type(bn).forward(bn, x)
    bn._check_input_dim(x)
    if x.numel() <= x.shape[1]:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{tuple(x.shape)}")
    return BatchNormJvp.apply(x, bn.weight, bn.bias, bn.eps)[0]


@contextlib.contextmanager
def forward_mode_bn(*modules):
    """Prepare the BatchNorm layers of `modules` for torch.func.jvp while the with-statement
    runs: running statistics stay frozen (see frozen_bn_stats), and train-mode layers run without
    autograd (as in jvp_per_example) through BatchNormJvp's cheaper tangent rule."""
    # each layer once, though modules overlap; subclasses with their own forward keep it
    layers = dict.fromkeys(m for module in modules for m in module.modules()
                           if type(m).forward is nn.modules.batchnorm._BatchNorm.forward
                           and m.training and "forward" not in vars(m))
    with frozen_bn_stats(*modules):
        for m in layers:
            m.forward = types.MethodType(batch_norm_for_jvp, m)
        try:
            yield
        finally:
            for m in layers:
                del m.forward


def jvp_per_example(loss_fn, primals, tangents, exact=False):
    """Return <G_i, t_i> for every example i by forward mode, where G is the gradient of
    loss_fn(*primals).mean() with respect to the primals and loss_fn returns one loss per example.
    primals and tangents are tuples of tensors whose first dimension is the batch.

    One jvp of the per-example loss vector gives, for example i, sum_k <d loss_i / d x_k, t_k> / B:
    example i's own loss along every example's tangent. The exact value is
    sum_k <d loss_k / d x_i, t_i> / B: the whole batch's loss along example i's tangent. Both sums
    over i are the same double sum, so the batch total is exact; each value is exact only where no
    operation mixes examples (d loss_i / d x_k = 0 for k != i). Train-mode BatchNorm mixes them.
    exact=True runs one jvp per example with the tangents masked to that example (vmapped, B times
    the tangent cost), which is exact.
    Run it inside forward_mode_bn for models with train-mode BatchNorm.
    """
    B = primals[0].shape[0]
    with torch.no_grad():
        if not exact:
            return jvp(loss_fn, primals, tangents)[1] / B

        def masked(i):
            masks = [F.one_hot(i, B).to(t.dtype).view(B, *[1] * (t.dim() - 1)) for t in tangents]
            return jvp(lambda *p: loss_fn(*p).mean(), primals,
                       tuple(t * m for t, m in zip(tangents, masks)))[1]
        return vmap(masked)(torch.arange(B, device=primals[0].device))


PARAMETRIC_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


def normalized_input(bn, x):
    """The normalized input x^ of a BatchNorm layer, with batch or running statistics as it uses."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    if bn.training or bn.running_mean is None:
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (x - mean) * torch.rsqrt(var + bn.eps)


def patches_are_faster(conv, x):
    """Return whether per-example products of a Conv2d run faster as batched matrix products over
    unfolded input patches than as one grouped convolution with the batch as groups. The patches
    win where each example's patch (in channels times kernel area) has at least 16 times as many
    entries as there are output positions: deep, narrow feature maps.
    NOTE: the crossover was measured on a 2-core CPU (torch 2.14.1, oneDNN) at batch 64 and 128,
    channels 16 to 256 and 4x4 to 28x28 outputs, not on CUDA."""
    if conv.groups != 1:
        return False
    positions = 1
    for n, k, s, p, d in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation):
        positions *= (n + 2 * p - d * (k - 1) - 1) // s + 1
    return conv.weight[0].numel() >= 16 * positions


def conv_patches(conv, x):
    """Unfold x into the conv's input patches, (B, C * kernel area, output positions)."""
    return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)


def per_example_conv_grads(conv, x, g):
    """Return the per-example weight gradients of a Conv2d, (B, *weight.shape), from its input x
    and the gradient g at its output. They come from one grouped convolution that treats the batch
    as groups (faster on CPU than vmapping the weight gradient), or from a batched matrix product
    over the input patches where patches_are_faster."""
    B, C = x.shape[:2]
    if patches_are_faster(conv, x):
        return torch.bmm(g.flatten(2), conv_patches(conv, x).transpose(1, 2)).view(
            B, *conv.weight.shape)
    O = conv.weight.shape[0]
    shape = (B * O, *conv.weight.shape[1:])
    w = torch.nn.grad.conv2d_weight(x.reshape(1, B * C, *x.shape[2:]), shape,
                                    g.reshape(1, B * O, *g.shape[2:]), conv.stride, conv.padding,
                                    conv.dilation, B * conv.groups)
    return w.view(B, *conv.weight.shape)


def per_example_conv(conv, x, V, out_shape):
    """Return conv(x_i, V_i) for every example i with its own weight V_i, of shape out_shape, by
    one grouped convolution or a batched matrix product over the input patches."""
    B, C = x.shape[:2]
    if patches_are_faster(conv, x):
        return torch.bmm(V.flatten(2), conv_patches(conv, x)).view(out_shape)
    out = F.conv2d(x.reshape(1, B * C, *x.shape[2:]), V.reshape(-1, *V.shape[2:]), None,
                   conv.stride, conv.padding, conv.dilation, B * conv.groups)
    return out.view(out_shape)


class BlockPass:
    """One forward pass of a block that keeps what the estimators need: the input, the output with
    its autograd graph, and the input and output of every leaf module that holds parameters.

    Supported leaves: Conv2d (zero padding), Linear, BatchNorm1d and BatchNorm2d; each must run
    once per pass. Activation-space estimators need only the input and output.
    """

    def __init__(self, block, x, record_leaves=True):
        self.block, self.input = block, x
        self.params = dict(block.named_parameters())
        self.leaf_of = {}  # parameter name -> (leaf module, its own name for the parameter)
        self.leaves = {}  # leaf module -> (input, output)
        self.normalized = {}  # BatchNorm leaf -> its normalized input, computed when first needed
        hooks = []
        if record_leaves:
            for prefix, module in block.named_modules():
                own = list(module.named_parameters(recurse=False))
                if not own:
                    continue
                padding = getattr(module, "padding", ())
                if (not isinstance(module, PARAMETRIC_LEAVES)
                        or getattr(module, "padding_mode", "zeros") != "zeros"
                        or isinstance(padding, str)):
                    where = prefix or "the block itself"
                    raise TypeError(f"weight-space estimators do not support {where} "
                                    f"({type(module).__name__}); supported leaves: Conv2d with "
                                    "numeric zero padding, Linear, BatchNorm1d and BatchNorm2d. "
                                    "For activation space alone, pass record_leaves=False")
                for local, _ in own:
                    self.leaf_of[f"{prefix}.{local}" if prefix else local] = (module, local)
                hooks.append(module.register_forward_hook(self._record))
        try:
            self.output = block(x)
        finally:
            for h in hooks:
                h.remove()
        idle = sorted({n for n, (m, _) in self.leaf_of.items() if m not in self.leaves})
        if idle:
            raise RuntimeError(f"{', '.join(idle)} did not take part in the block's forward pass; "
                               "weight-space estimators need each parametrized leaf to run once")

    def _record(self, module, inputs, output):
        if module in self.leaves:
            raise RuntimeError(f"{type(module).__name__} ran twice in one pass of the block; "
                               "weight-space estimators need each parametrized leaf to run once")
        self.leaves[module] = (inputs[0].detach(), output)

    def normalized_input(self, bn):
        if bn not in self.normalized:
            self.normalized[bn] = normalized_input(bn, self.leaves[bn][0])
        return self.normalized[bn]

    def backward(self, cotangent):
        """Return {name: gradient} of the block parameters for the cotangent at the output."""
        grads = torch.autograd.grad(self.output, list(self.params.values()), cotangent,
                                    retain_graph=True, allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g
                for (n, p), g in zip(self.params.items(), grads)}

    def leaf_gradients(self, cotangent):
        """Return {leaf module: gradient at its output} for the cotangent at the block output."""
        modules = list(self.leaves)
        grads = torch.autograd.grad(self.output, [self.leaves[m][1] for m in modules], cotangent,
                                    retain_graph=True)
        return dict(zip(modules, grads))

    def weight_slices(self, cotangent):
        """Return {name: (B, *shape)}: each example's slice of the parameter gradient, from the
        cotangent at the block output (the gradient of the batch mean loss there)."""
        grad_of = self.leaf_gradients(cotangent)
        slices = {}
        for name, (m, local) in self.leaf_of.items():
            x, g = self.leaves[m][0], grad_of[m]
            if isinstance(m, nn.Linear):
                slices[name] = (torch.einsum("b...o,b...i->boi", g, x) if local == "weight"
                                else torch.einsum("b...o->bo", g))
            elif isinstance(m, nn.Conv2d) and local == "weight":
                slices[name] = per_example_conv_grads(m, x, g)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and local == "weight":
                slices[name] = torch.einsum("bc...->bc", g * self.normalized_input(m))
            else:  # a bias of a conv or a BatchNorm layer: channels in dimension 1
                slices[name] = torch.einsum("bc...->bc", g)
        return slices

    def weight_tangent(self, name, V):
        """The tangent at the output of the leaf holding parameter `name` when that parameter
        moves along V_i for example i alone, V of shape (B, *shape)."""
        m, local = self.leaf_of[name]
        x, out = self.leaves[m]
        shape = [x.shape[0], -1] + [1] * (out.dim() - 2)
        if isinstance(m, nn.Linear):
            if local == "bias":
                return V.view(x.shape[0], *[1] * (out.dim() - 2), -1).expand(out.shape)
            return torch.einsum("b...i,boi->b...o", x, V)
        if local == "bias":
            return V.view(shape).expand(out.shape)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return self.normalized_input(m) * V.view(shape)
        return per_example_conv(m, x, V, out.shape)

    def perturbed(self, loss_fn):
        """Return (deltas, f) where f(*deltas) = loss_fn(block output with deltas[k] added to the
        output of leaf k): the function whose jvp gives weight-space directional derivatives.
        deltas are zeros, one per leaf in self.leaves order."""
        modules = list(self.leaves)
        deltas = tuple(torch.zeros_like(self.leaves[m][1]) for m in modules)

        def loss_with(*delta):
            hooks = [m.register_forward_hook(lambda mod, i, o, d=d: o + d)
                     for m, d in zip(modules, delta)]
            try:
                return loss_fn(self.block(self.input.detach()))
            finally:
                for h in hooks:
                    h.remove()
        return deltas, loss_with


def weight_space_jvp_dots(bp, G_guess, loss_fn, exact=False):
    """Return {name: <G_i, G~_i>} for every parameter tensor of the block, by forward mode.

    Each tensor is one tangent stream, injected at its leaf's output; the streams are vmapped,
    so the primal forward runs once for all of them.
    """
    names = list(G_guess)
    modules = list(bp.leaves)
    deltas, loss_with = bp.perturbed(loss_fn)
    streams = []  # per leaf: (streams, B, ...) tangents, zero in the streams of other tensors
    for m, delta in zip(modules, deltas):
        rows = [bp.weight_tangent(n, G_guess[n]) if bp.leaf_of[n][0] is m else delta
                for n in names]  # delta is zero
        streams.append(torch.stack(rows))
    dots = vmap(lambda *t: jvp_per_example(loss_with, deltas, t, exact))(*streams)
    return dict(zip(names, dots))


def target_dots(bp, G_guess, space, engine, loss_fn=None, cotangent=None, exact=False):
    """Return <G_i, G~_i> per example: a (B,) tensor in activation space, {name: (B,)} in weight
    space. engine "jvp" differentiates loss_fn (block output -> per-example loss) in forward mode;
    "autograd" uses `cotangent`, the gradient of the batch mean loss at the block output."""
    if space == "activation":
        if engine == "autograd":
            return (cotangent * G_guess).flatten(1).sum(1)
        return jvp_per_example(loss_fn, (bp.output.detach(),), (G_guess,), exact)
    if engine == "autograd":
        # <G_i, G~_i> = <g_i, t_i>, g the gradient at the leaf's output and t_i the output
        # tangent of G~_i: one grouped forward convolution instead of per-example gradients
        grads = bp.leaf_gradients(cotangent)
        return {n: (grads[bp.leaf_of[n][0]] * bp.weight_tangent(n, G_guess[n])).flatten(1).sum(1)
                for n in G_guess}
    return weight_space_jvp_dots(bp, G_guess, loss_fn, exact)


def project(bp, direction, dots):
    """Return {name: update} with update = sum_i dots_i direction_i: the projection estimator
    for unit guesses (dots_i = <G_i, u_i>), or <G_i, v_i> v_i for raw random guesses v."""
    if isinstance(direction, dict):
        return {n: torch.einsum("b,b...->...", dots[n], d) for n, d in direction.items()}
    return bp.backward(dots.view(-1, *[1] * (direction.dim() - 1)) * direction)


# -------------------------------------------------------------------------------------------------
# Training step

class NonFiniteError(Exception):
    """A loss or an update is NaN or infinite."""


def reset_parameters(module):
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g


def check_finite(model, loss):
    """Raise NonFiniteError naming the loss or the first net whose update is NaN or infinite.
    All gradients are tested in one reduction, so a GPU synchronizes once."""
    groups = [(f"block {j}", b) for j, b in enumerate(model.blocks)]
    groups += [(f"auxiliary net {j}", a) for j, a in enumerate(model.aux)]
    finite = [torch.isfinite(loss)] + [torch.isfinite(p.grad).all() for _, g in groups
                                       for p in g.parameters() if p.grad is not None]
    if torch.stack(finite).all():
        return
    if not torch.isfinite(loss):
        raise NonFiniteError(f"non-finite loss {loss.item()}")
    for name, group in groups:
        if not all(torch.isfinite(p.grad).all() for p in group.parameters() if p.grad is not None):
            raise NonFiniteError(f"non-finite update in {name}")


@dataclass
class StepResult:
    loss: float
    correct: int
    zero_guesses: int  # examples (times parameter tensors in weight space) with a zero guess
    alignment: list  # per block j < J-1: (cosine, norm ratio) of update vs true gradient


def guess_for_block(bp, cfg, cotangent):
    """G~ for one block: a (B, ...) tensor at the output, or {name: (B, *shape)} in weight space."""
    if cfg.guess == "random":
        if cfg.space == "weight":
            B = bp.input.shape[0]
            return {n: random_guess((B, *p.shape), cfg.noise, p) for n, p in bp.params.items()}
        return random_guess(bp.output.shape, cfg.noise, bp.output)
    cot = cotangent(GUESS_LOSS[cfg.guess])
    return bp.weight_slices(cot) if cfg.space == "weight" else cot


def train_step(model, x, y, cfg, measure_alignment=False):
    """Set .grad of every parameter to this step's update and return the step's statistics."""
    J = len(model.blocks)
    guess_loss = GUESS_LOSS[cfg.guess]
    exact = guess_loss == cfg.target  # backprop, local learning: no projection
    if cfg.guess == "ntk":
        for aux in model.aux:
            reset_parameters(aux)
    # Reverse-mode gradients of the end-to-end loss need every block's graph at once. Without
    # them, each block's graph is released once its update is set: forward gradients' memory saving.
    reverse_target = exact or cfg.engine == "autograd"
    keep_graphs = (measure_alignment or guess_loss == "global"
                   or (cfg.target == "global" and reverse_target))
    passes, head_losses, cache = {}, {}, {}
    released = {}  # block index -> its detached output, once its graph is released

    def block_pass(k):
        """Block k's ordinary forward pass, the only one that updates its BatchNorm statistics.
        Its input is a detached leaf, so gradients cross blocks only where a loss asks for them."""
        if k not in passes:
            h = x if k == 0 else released.pop(k - 1, None)
            h = block_pass(k - 1).output if h is None else h
            record = cfg.space == "weight" and k < J - 1 and not exact
            passes[k] = BlockPass(model.blocks[k], h.detach().requires_grad_(k > 0), record)
        return passes[k]

    def head_loss(k):
        """The batch mean loss of block k's own classifier: its auxiliary net or the final one."""
        if k not in head_losses:
            out = block_pass(k).output
            head_losses[k] = F.cross_entropy(out if k == J - 1 else model.aux[k](out), y)
        return head_losses[k]

    def cotangent(j, kind):
        """The gradient of the batch mean loss `kind` at block j's output (reverse mode)."""
        if (j, kind) not in cache:
            if kind == "local":
                args = head_loss(j), block_pass(j).output, None
            elif kind == "above" or j == J - 2:
                args = head_loss(j + 1), block_pass(j + 1).input, None
            else:
                args = block_pass(j + 1).output, block_pass(j + 1).input, cotangent(j + 1, "global")
            cache[j, kind] = torch.autograd.grad(*args, retain_graph=True)[0]
        return cache[j, kind]

    zero_guesses, alignment = 0, []
    normalize = cfg.guess != "random" or cfg.random_estimator == "projection"
    for j in range(J - 1):
        bp = block_pass(j)
        # the auxiliary net's exact gradient, unless it is an ntk guess, which is never trained
        if cfg.guess not in ("ntk", "fixed-ntk"):
            params = list(model.aux[j].parameters())
            set_grads(params, torch.autograd.grad(head_loss(j), params, retain_graph=True))
        if exact:
            update = bp.backward(cotangent(j, cfg.target))
        else:
            direction = guess_for_block(bp, cfg, lambda kind: cotangent(j, kind))
            if normalize:
                direction, zeros = unit_guess(direction)
                zero_guesses += zeros

            def target_loss(h, j=j):
                logits = model.loss_logits(j, h, cfg.target)
                return F.cross_entropy(logits, y, reduction="none")
            G = cotangent(j, cfg.target) if cfg.engine == "autograd" else None
            if not keep_graphs:
                # the auxiliary net's graph and the guess's gradient are spent: free them
                # before the jvp, whose tensors add to this block's graph at the peak
                head_losses.pop(j, None)
                cache.pop((j, guess_loss), None)
            with forward_mode_bn(model):
                dots = target_dots(bp, direction, cfg.space, cfg.engine, target_loss, G)
            update = project(bp, direction, dots)
        set_grads(bp.params.values(), update.values())
        if measure_alignment:
            true = torch.cat([g.flatten() for g in bp.backward(cotangent(j, "global")).values()])
            est = torch.cat([g.flatten() for g in update.values()])
            cosine = F.cosine_similarity(est, true, dim=0).item()
            # a zero true gradient, as behind a dead block, has no direction to compare with
            ratio = (est.norm() / true.norm()).item() if true.norm() > 0 else None
            alignment.append((cosine, ratio))
        if not keep_graphs:
            released[j] = passes.pop(j).output.detach()
            head_losses.pop(j, None)
            for kind in ("local", "above", "global"):
                cache.pop((j, kind), None)

    # the last block's exact gradient
    loss, last = head_loss(J - 1), block_pass(J - 1)
    set_grads(last.params.values(), last.backward(torch.autograd.grad(loss, last.output)[0]).values())
    check_finite(model, loss)
    correct = int((last.output.argmax(1) == y).sum())
    return StepResult(loss.item(), correct, zero_guesses, alignment)


# -------------------------------------------------------------------------------------------------
# Training, evaluation, checkpoints

@torch.no_grad()
def recalibrate_bn(model, data, device, batches, batch_size, seed):
    """Set every BatchNorm layer's running statistics to their average over `batches` training
    batches (no augmentation), which replaces running averages that lag behind moving weights.
    The batches come from their own generator, so training's random streams are untouched."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches that follow
    g = torch.Generator().manual_seed(seed)
    J = len(model.blocks)
    model.train()
    try:
        for _ in range(batches):
            idx = torch.randint(len(data.train_x), (batch_size,), generator=g)
            h, _ = prepare_batch(data, data.train_x[idx], data.train_y[idx], device, augment=False)
            for j, block in enumerate(model.blocks):
                h = block(h)
                if j < J - 1:
                    model.aux[j](h)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum


def evaluate(model, data, device, batch_size=500):
    """Test accuracy in percent of each auxiliary head (blocks 0..J-2), then the final classifier."""
    model.eval()
    J = len(model.blocks)
    correct = torch.zeros(J)
    for i in range(0, len(data.test_x), batch_size):
        x, y = prepare_batch(data, data.test_x[i:i + batch_size], data.test_y[i:i + batch_size],
                             device, augment=False)
        for j, block in enumerate(model.blocks):
            x = block(x)
            logits = x if j == J - 1 else model.aux[j](x)
            correct[j] += (logits.argmax(1) == y).sum().item()
    model.train()
    return (100 * correct / max(1, len(data.test_x))).tolist()


class WriteError(Exception):
    """A results or checkpoint file cannot be written."""


def atomic_write(path, write):
    """Write a file through a temporary file and a rename, so a crash never leaves half of it.
    Raises WriteError on failure, and the previous version of the file is then unchanged.
    A symbolic link is followed, so the file it points to is replaced, not the link."""
    path = os.path.realpath(path)
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    except OSError as e:
        raise WriteError(f"{path}: cannot create a file in {folder} ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file readable by its owner alone, so give it the usual mode
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(f"{path}: cannot write the file ({e.strerror or e}); its previous "
                             "version, if any, is unchanged") from None
        raise
    # The rename survives a power loss only once the folder itself is synced. Some file systems
    # cannot sync a folder, but the rename is atomic there too.
    with contextlib.suppress(OSError):
        folder_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)


def checkpoint_path(cfg):
    if cfg.checkpoint == "none":
        return None
    if cfg.checkpoint != "auto":
        return cfg.checkpoint
    # the digest covers every other setting a resumed run must share, so runs that differ in
    # any of them, such as --lr or --train-subset, get different files
    fixed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    digest = hashlib.sha1(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:8]
    name = (f"{cfg.dataset}-b{cfg.blocks}-w{cfg.width}-{cfg.aux}-{cfg.target}-{cfg.guess}-"
            f"{cfg.space}-{cfg.engine}-s{cfg.seed}-{digest}")
    return os.path.join("checkpoints", name + ".pt")


# settings that may differ between a checkpoint and the run that resumes it; the data may move
RESUMABLE_CHANGES = {"epochs", "out", "checkpoint", "resume", "device", "log_alignment",
                     "log_steps", "data_dir", "benchmark", "benchmark_steps", "benchmark_configs"}


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def find_non_finite(model, x):
    """Name the first block whose weights, or whose output for input x, contain NaN or
    infinity, or return None."""
    with frozen_bn_stats(model):
        for j, block in enumerate(model.blocks):
            if not all(torch.isfinite(p).all() for p in block.parameters()):
                return f"the weights of block {j}"
            x = block(x)
            if not torch.isfinite(x).all():
                return f"the output of block {j}"
    return None


def non_finite_weights(model):
    """Name the first block or auxiliary net with a NaN or infinite weight, or return None."""
    params = list(model.parameters())
    if torch.stack([torch.isfinite(p).all() for p in params]).all():
        return None
    for name, group in [(f"block {j}", b) for j, b in enumerate(model.blocks)] + [
            (f"auxiliary net {j}", a) for j, a in enumerate(model.aux)]:
        if not all(torch.isfinite(p).all() for p in group.parameters()):
            return name
    return None


def describe_hardware(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model_name = names[0] if names else model_name
    return f"{model_name}, {torch.get_num_threads()} threads"


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    By default glibc maps each allocation above its mmap threshold (at most 32 MiB) afresh and
    unmaps it on free, so every step touches new pages. On a 2-core CPU at width 16 and batch 128
    (torch 2.14.1), the page faults took 2.6 s of a 3.7 s global/aux weight-space step. With
    mmap off, large blocks come from the heap, which is trimmed only above 1 GiB of free memory
    at its top. Return whether the settings were applied (False without glibc).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # the parameter numbers in glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


class Run:
    """A training run: model, optimizer and schedule, with checkpoints and a results file."""

    def __init__(self, cfg):
        self.cfg, self.device = cfg, resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.data = load_data(cfg)
        channels = self.data.train_x.shape[1]
        self.model = BlockwiseResNet(cfg.blocks, cfg.width, channels, self.data.classes, cfg.aux)
        self.model.to(self.device)
        self.flop_shares = aux_flop_shares(self.model, tuple(self.data.train_x.shape[1:]))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_step, cfg.lr_decay)
        self.epoch, self.step, self.totals = 0, 0, self.new_totals()
        self.history, self.alignment, self.status, self.error = [], [], "running", None
        self.checkpoint = checkpoint_path(cfg)
        self.saved_position = None  # (epoch, step) that the checkpoint file contains
        self.stop_signal = None

    @staticmethod
    def new_totals():
        return {"loss": 0.0, "correct": 0, "seen": 0, "zero_guesses": 0, "seconds": 0.0}

    def state(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "totals": self.totals, "history": self.history, "alignment": self.alignment,
                "rng": torch.get_rng_state(), "config": dataclasses.asdict(self.cfg),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def save_checkpoint(self):
        if self.checkpoint:
            # torch.save turns a failed write, such as a full disk, into an unclear RuntimeError,
            # so the checkpoint is serialized in memory and written as plain bytes
            buffer = io.BytesIO()
            torch.save(self.state(), buffer)
            atomic_write(self.checkpoint, lambda f: f.write(buffer.getbuffer()))
            self.saved_position = self.epoch, self.step

    def position(self, epoch=None, step=None):
        """Describe a point of training in words, by default the current one."""
        epoch = self.epoch if epoch is None else epoch
        step = self.step if step is None else step
        if step:
            return f"after step {step} of epoch {epoch + 1}"
        return f"at the end of epoch {epoch}" if epoch else "before the first step"

    def load_checkpoint(self):
        # weights_only: a checkpoint contains tensors and plain values, so loading it runs no code
        try:
            state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
            missing = {"model", "optimizer", "scheduler", "config", "epoch", "step", "totals",
                       "history", "alignment", "rng", "cuda_rng"} - set(state)
        except Exception as e:  # any unreadable checkpoint gets the same advice
            # the first line only: torch's weights_only message goes on to suggest unsafe loading
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"{self.checkpoint}: cannot load the checkpoint "
                            f"({type(e).__name__}: {first}); delete it to start from "
                            "scratch") from None
        if missing:
            raise DataError(f"{self.checkpoint}: not a checkpoint of fg.py, it lacks "
                            f"{', '.join(sorted(missing))}; choose another --checkpoint")
        problem = self.checkpoint_problem(state)
        if problem:
            raise DataError(f"{self.checkpoint}: {problem}; choose another --checkpoint")

        saved, now = state["config"], dataclasses.asdict(self.cfg)
        changed = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
        if changed:
            diffs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {now[k]})"
                              for k in changed)
            raise UsageError(f"{self.checkpoint} was written with {diffs}; resume with the same "
                             "settings or choose another --checkpoint")

        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"].cpu())
            if state["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        except (RuntimeError, ValueError, TypeError, AttributeError, KeyError) as e:
            raise DataError(f"{self.checkpoint}: the saved state does not fit this run "
                            f"({type(e).__name__}: {e}); choose another --checkpoint") from None
        self.epoch, self.step, self.totals = state["epoch"], state["step"], state["totals"]
        self.saved_position = self.epoch, self.step
        self.history, self.alignment = state["history"], state["alignment"]

    def checkpoint_problem(self, state):
        """Return what makes a loaded checkpoint's bookkeeping unusable, or None."""
        kinds = {"config": dict, "totals": dict, "history": list, "alignment": list}
        for key, kind in kinds.items():
            if not isinstance(state[key], kind):
                return f"its {key} is of type {type(state[key]).__name__}, not {kind.__name__}"
        epoch, step = state["epoch"], state["step"]
        if not (type(epoch) is int and type(step) is int and epoch >= 0 and step >= 0):
            return f"its position, epoch {epoch!r} and step {step!r}, is not two integers >= 0"
        if step > self.steps_per_epoch():
            return (f"it was saved after step {step} of an epoch, but the training set in "
                    f"--data-dir {self.cfg.data_dir} has {self.steps_per_epoch()} steps per "
                    "epoch; resume with the data the run started with")
        return None

    def steps_per_epoch(self):
        # a last batch of one example is dropped: train-mode BatchNorm needs two
        n, batch = len(self.data.train_x), self.cfg.batch_size
        return n // batch + (n % batch > 1)

    def results(self):
        final = self.history[-1]["test_accuracy"] if self.history else None
        return {"config": dataclasses.asdict(self.cfg), "status": self.status,
                "error": self.error, "final_test_accuracy": final, "epochs": self.history,
                "alignment": self.alignment, "aux_flop_shares": self.flop_shares,
                "versions": {"python": platform.python_version(), "torch": torch.__version__,
                             "torchvision": torchvision.__version__},
                "device": str(self.device), "hardware": describe_hardware(self.device),
                "train_examples": len(self.data.train_x), "test_examples": len(self.data.test_x)}

    def write_results(self):
        if self.cfg.out:
            text = json.dumps(self.results(), indent=1).encode()
            atomic_write(self.cfg.out, lambda f: f.write(text))

    def request_stop(self, signum, frame):
        if self.stop_signal is not None:  # a second signal stops at once
            self.stop_signal = signum
            raise KeyboardInterrupt
        self.stop_signal = signum
        print(f"received {signal.Signals(signum).name}: stopping after this step", flush=True)

    def train_batch(self, x, y, measure):
        """Take one SGD step on a batch. Raises NonFiniteError naming the block at fault."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            result = train_step(self.model, x, y, self.cfg, measure)
        except NonFiniteError as e:
            where = find_non_finite(self.model, x)
            raise NonFiniteError(f"{e} at epoch {self.epoch + 1}, step {self.step + 1}"
                                 + (f", first in {where}" if where else "")) from None
        if self.cfg.max_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        # finite updates can still overflow the weights, for example with a huge learning rate
        where = non_finite_weights(self.model)
        if where:
            raise NonFiniteError(f"non-finite weights in {where} after the update at epoch "
                                 f"{self.epoch + 1}, step {self.step + 1}")
        return result

    def train_epoch(self):
        cfg, data = self.cfg, self.data
        order = epoch_order(len(data.train_x), cfg.seed, self.epoch)
        steps = self.steps_per_epoch()
        while self.step < steps and self.stop_signal is None:
            start = time.perf_counter()
            idx = order[self.step * cfg.batch_size:(self.step + 1) * cfg.batch_size]
            x, y = prepare_batch(data, data.train_x[idx], data.train_y[idx], self.device,
                                 data.augment)
            global_step = self.epoch * steps + self.step
            measure = cfg.log_alignment > 0 and global_step % cfg.log_alignment == 0
            result = self.train_batch(x, y, measure)
            for j, (cosine, ratio) in enumerate(result.alignment):
                self.alignment.append({"step": global_step, "epoch": self.epoch + 1, "block": j,
                                       "cosine": cosine, "norm_ratio": ratio})
            t = self.totals
            t["loss"] += result.loss * len(y)
            t["correct"] += result.correct
            t["seen"] += len(y)
            t["zero_guesses"] += result.zero_guesses
            t["seconds"] += time.perf_counter() - start
            self.step += 1
            if cfg.log_steps and self.step % cfg.log_steps == 0:
                print(f"epoch {self.epoch + 1} step {self.step}/{steps} | train loss "
                      f"{t['loss'] / t['seen']:.4f} | {t['seen'] / t['seconds']:.0f} img/s | "
                      f"zero guesses {t['zero_guesses']}", flush=True)
        return self.step == steps

    def log_epoch(self, test):
        t, J = self.totals, len(self.model.blocks)
        record = {"epoch": self.epoch + 1, "train_loss": t["loss"] / max(1, t["seen"]),
                  "train_accuracy": 100 * t["correct"] / max(1, t["seen"]),
                  "test_accuracy": test[-1], "aux_test_accuracy": test[:-1],
                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": t["seconds"],
                  "images_per_second": t["seen"] / max(t["seconds"], 1e-9),
                  "zero_guesses": t["zero_guesses"]}
        self.history.append(record)
        aux = " ".join(f"{a:.1f}" for a in test[:-1])
        print(f"epoch {self.epoch + 1:3d}/{self.cfg.epochs} | train loss {record['train_loss']:.4f} "
              f"acc {record['train_accuracy']:5.2f}% | test acc {test[-1]:5.2f}% | aux acc [{aux}] "
              f"| lr {record['lr']:.4f} | {t['seconds']:.1f} s | "
              f"{record['images_per_second']:.0f} img/s | zero guesses {t['zero_guesses']}",
              flush=True)
        if len(test) != J:
            raise AssertionError("one accuracy per block expected")

    def train(self):
        """Train to cfg.epochs and return the exit status: 0 when complete, 1 when diverged,
        128 + the signal number when stopped by SIGINT or SIGTERM."""
        cfg = self.cfg
        if cfg.resume and self.checkpoint and os.path.exists(self.checkpoint):
            self.load_checkpoint()
            print(f"resumed from {self.checkpoint} {self.position()}")
        else:
            if cfg.resume:
                print(f"no checkpoint at {self.checkpoint}: starting from scratch")
            # a path that cannot be written fails now, not after the first epoch
            self.save_checkpoint()
        self.write_results()

        handlers = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.epoch < cfg.epochs and self.train_epoch():
                if cfg.bn_recalibration:
                    recalibrate_bn(self.model, self.data, self.device, cfg.bn_recalibration,
                                   cfg.batch_size, cfg.seed * 100003 + self.epoch)
                self.log_epoch(evaluate(self.model, self.data, self.device))
                self.scheduler.step()
                self.epoch, self.step, self.totals = self.epoch + 1, 0, self.new_totals()
                self.save_checkpoint()
                self.write_results()
        except NonFiniteError as e:
            return self.stop_diverged(e)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        if self.epoch < cfg.epochs:
            return self.stop_interrupted()

        self.status = "complete"
        self.write_results()
        if self.history:
            print(f"final test accuracy: {self.history[-1]['test_accuracy']:.2f}%")
        return 0

    def stop_diverged(self, error):
        self.status, self.error = "diverged", str(error)
        self.write_results()
        kept = ""
        if self.saved_position:
            kept = (f"; {self.checkpoint} keeps the last good state, "
                    f"{self.position(*self.saved_position)}")
        fresh = (f" with another --checkpoint or after deleting {self.checkpoint}"
                 if self.checkpoint else "")
        print(f"error: {error}{kept}; lower --lr or set --max-grad-norm and start a new "
              f"run{fresh}", file=sys.stderr)
        return 1

    def stop_interrupted(self):
        self.status = "interrupted"
        self.save_checkpoint()
        self.write_results()
        where = f"; resume with --resume --checkpoint {self.checkpoint}" if self.checkpoint else ""
        print(f"interrupted {self.position()}{where}", flush=True)
        return 128 + self.stop_signal


# -------------------------------------------------------------------------------------------------
# Benchmark

def benchmark_configs(which):
    """(target, guess, space, engine) to time: backprop and local learning first."""
    rows = [("global", "global", "-", "-"), ("local", "aux", "-", "-")]
    pairs = [(t, g) for t in TARGETS for g in GUESSES if GUESS_LOSS[g] != t]
    if which == "main":
        pairs = [("global", g) for g in ("random", "ntk", "aux")]
    return rows + [(t, g, s, e) for t, g in pairs for s in ("activation", "weight")
                   for e in ("jvp", "autograd")]


def forward_equivalents(cfg, p, q, tensors):
    """The floor of one step of cfg in forward passes of the blocks: the FLOPs it must spend.

    p[j] and q[j] are block j's and auxiliary net j's share of the blocks' forward FLOPs, and
    tensors[j] is the number of parameter tensors of block j. A backward pass costs 2 forward
    passes (input and weight gradients), 1 when only one of them is needed; a jvp costs 2 (primal
    and tangent); per-example weight gradients and tangents cost as much as the layer's forward.
    """
    J = len(p)
    downstream = {"local": lambda j: q[j],
                  "above": lambda j: p[j + 1] + (q[j + 1] if j + 1 < J - 1 else 0),
                  "global": lambda j: sum(p[j + 1:])}
    trained_aux = cfg.guess not in ("ntk", "fixed-ntk")
    total = 1 + sum(q) + 2 * p[-1] + (2 * sum(q) if trained_aux else 0)
    guess_loss = GUESS_LOSS[cfg.guess]
    for j in range(J - 1):
        if guess_loss == cfg.target:
            # the exact gradient: a backward pass through block j, and for the above loss the
            # input gradient through block j + 1 (the global chain's is block j + 1's own pass)
            total += 2 * p[j] + (p[j + 1] if cfg.target == "above" else 0)
            continue
        # guess: an input gradient through the nets between its loss and block j's output
        total += {None: 0, "local": 0 if trained_aux else q[j], "above": p[j + 1],
                  "global": p[j + 1]}[guess_loss]
        # target: a jvp through its nets, or a reverse pass like the guess's
        if cfg.engine == "jvp":
            streams = tensors[j] if cfg.space == "weight" else 1
            total += downstream[cfg.target](j) * (1 + streams)
        else:
            total += {"local": 0, "above": p[j + 1], "global": p[j + 1]}[cfg.target]
        if cfg.space == "weight":
            # the guess's gradients at the leaf outputs and its per-example weight gradients,
            # then either the per-example leaf tangents and block j's primal forward (jvp) or
            # the target's leaf gradients and per-example weight gradients (autograd)
            total += p[j] * (0 if guess_loss is None else 2) + 2 * p[j]
        else:
            total += 2 * p[j]  # the projected output gradient's backward pass through block j
    return total


def read_proc_status(field_name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field_name} in /proc/self/status")


def reset_peak_memory(device):
    """Start a peak-memory measurement and return the current memory in bytes, or None where
    this system cannot measure it. CPU: resident set size, whose peak Linux resets through
    /proc/self/clear_refs; freed heap is first returned to the system so it does not count."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return read_proc_status("VmRSS")
    except OSError:
        return None


def peak_memory(device, start):
    if start is None:
        return None
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - start
    return read_proc_status("VmHWM") - start


def time_steps(steps, batches, device):
    """Run each step function once on the first batch to warm up, then time them in rounds, one
    batch per round and every step in turn, so that drifts in the machine's speed reach them all
    alike. Return each step's median seconds."""
    for step in steps:
        step(*batches[0])
    times = [[] for _ in steps]
    for x, y in batches:
        for step, measured in zip(steps, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            step(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            measured.append(time.perf_counter() - t)
    return [statistics.median(measured) for measured in times]


def training_step(model, cfg):
    """Return step(x, y): one training step of model under cfg with its own SGD optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        train_step(model, x, y, cfg)
        optimizer.step()
    return step


def measure_step_memory(connection, step_cfg, state, x, y, classes):
    """Run in a fresh process: one warm-up step, then send the peak bytes of one more step."""
    torch.manual_seed(step_cfg.seed)
    model = BlockwiseResNet(step_cfg.blocks, step_cfg.width, x.shape[1], classes, step_cfg.aux)
    model.load_state_dict(state)
    step = training_step(model, step_cfg)
    step(x, y)
    start = reset_peak_memory(torch.device("cpu"))
    step(x, y)
    connection.send(peak_memory(torch.device("cpu"), start))


def cpu_peak_memory(step_cfg, model, batch, classes):
    """Peak resident memory in bytes that one step adds above the model and its optimizer state,
    measured in a fresh process so that no heap left by other steps hides or inflates it.
    glibc maps every block over 128 KiB on its own there, so freed memory leaves the resident
    set at once (MALLOC_MMAP_THRESHOLD_). Returns None where this cannot be measured."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    try:
        child = context.Process(target=measure_step_memory, args=(
            sender, step_cfg, state, batch[0].cpu(), batch[1].cpu(), classes))
        child.start()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    sender.close()
    try:
        peak = receiver.recv()
    except EOFError:  # the child failed; its traceback is on stderr
        peak = None
    child.join()
    return peak


def coupling_cosines(model, x, y):
    """Per block: the cosine between one jvp's per-example <G_i, u_i> and the exact values, for
    the global target and the unit aux guess, in activation space and (the lowest over the
    block's tensors) in weight space; the BatchNorm coupling of a train-mode batch."""
    model = copy.deepcopy(model)
    rows, h = [], x
    for j in range(len(model.blocks) - 1):
        bp = BlockPass(model.blocks[j], h.detach())

        def loss_fn(out, j=j):
            return F.cross_entropy(model.loss_logits(j, out, "global"), y, reduction="none")
        G = torch.autograd.grad(loss_fn(bp.output).mean(), bp.output, retain_graph=True)[0]
        aux = torch.autograd.grad(F.cross_entropy(model.aux[j](bp.output), y), bp.output,
                                  retain_graph=True)[0]
        row = []
        for space, guess in (("activation", aux), ("weight", bp.weight_slices(aux))):
            u = unit_guess(guess)[0]
            with forward_mode_bn(model):
                one = target_dots(bp, u, space, "jvp", loss_fn)
            exact = target_dots(bp, u, space, "autograd", cotangent=G)
            if space == "activation":
                one, exact = {"output": one}, {"output": exact}
            row.append(min(F.cosine_similarity(one[n], exact[n], dim=0).item() for n in one))
        rows.append(row)
        h = bp.output
    return rows


def benchmark(run):
    """Time every estimator on the same batches, print a Markdown table and return 0."""
    cfg, data, device = run.cfg, run.data, run.device
    g = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for _ in range(cfg.benchmark_steps):
        idx = torch.randint(len(data.train_x), (cfg.batch_size,), generator=g)
        batches.append(prepare_batch(data, data.train_x[idx], data.train_y[idx], device, False))
    model = run.model
    p, q = block_flops(model, tuple(data.train_x.shape[1:]))
    p, q = [f / sum(p) for f in p], [f / sum(p) for f in q]
    tensors = [len(list(b.parameters())) for b in model.blocks]

    def forward(x, y):
        with torch.no_grad(), frozen_bn_stats(model):
            model(x)

    rows, step_cfgs, steps = benchmark_configs(cfg.benchmark_configs), [], [forward]
    for target, guess, space, engine in rows:
        step_cfgs.append(dataclasses.replace(cfg, target=target, guess=guess,
                                             space=space if space != "-" else "activation",
                                             engine=engine if engine != "-" else "autograd"))
        steps.append(training_step(copy.deepcopy(model), step_cfgs[-1]))
    print(f"benchmark: {cfg.blocks} blocks, width {cfg.width}, batch {cfg.batch_size}, median of "
          f"{cfg.benchmark_steps} steps after 1 warm-up, timed in rounds of one step of each of "
          f"{len(rows)} configurations, {device} ({describe_hardware(device)}), "
          f"torch {torch.__version__}", flush=True)
    t_forward, *seconds = time_steps(steps, batches, device)
    print(f"one forward pass of the blocks: {t_forward * 1e3:.1f} ms")
    print("\n| target | guess | space | engine | ms/step | x backprop | floor (forward passes) "
          "| x floor | peak MB | x backprop |\n|---|---|---|---|---|---|---|---|---|---|")
    reference_peak = None
    for row, step_cfg, step, time_per_step in zip(rows, step_cfgs, steps[1:], seconds):
        if device.type == "cuda":
            start = reset_peak_memory(device)
            step(*batches[0])
            peak = peak_memory(device, start)
        else:
            peak = cpu_peak_memory(step_cfg, model, batches[0], data.classes)
        reference_peak = reference_peak or peak
        floor = forward_equivalents(step_cfg, p, q, tensors)
        memory = "n/a | n/a" if peak is None else (
            f"{peak / 2**20:.0f} | {peak / max(reference_peak, 1):.2f}")
        print(f"| {' | '.join(row)} | {time_per_step * 1e3:.1f} | "
              f"{time_per_step / seconds[0]:.2f} | {floor:.1f} | "
              f"{time_per_step / (floor * t_forward):.2f} | {memory} |", flush=True)
    print("\nper-example <G_i, u_i> of the global target along the unit aux guess: cosine between "
          "one jvp and the exact values, on the first batch in train mode\n\n"
          "| block | activation space | weight space (lowest over tensors) |\n|---|---|---|")
    for j, (act, weight) in enumerate(coupling_cosines(model, *batches[0])):
        print(f"| {j} | {act:.3f} | {weight:.3f} |")
    return 0


# -------------------------------------------------------------------------------------------------
# Command line

def print_header(run):
    cfg = run.cfg
    n_params = sum(p.numel() for p in run.model.blocks.parameters())
    n_aux = sum(p.numel() for p in run.model.aux.parameters())
    print(f"fg.py | torch {torch.__version__} | {run.device} ({describe_hardware(run.device)})")
    print(f"data {cfg.dataset}: {len(run.data.train_x)} train, {len(run.data.test_x)} test, "
          f"images {tuple(run.data.train_x.shape[1:])}, {run.data.classes} classes, "
          f"augment {'on' if run.data.augment else 'off'}")
    print(f"model: {cfg.blocks} blocks, width {cfg.width}, {n_params / 1e6:.2f}M parameters, "
          f"{cfg.aux} auxiliary nets {n_aux / 1e6:.2f}M")
    print("auxiliary FLOPs / block FLOPs: " + " ".join(f"{s:.1%}" for s in run.flop_shares))
    print(f"estimator: target {cfg.target}, guess {cfg.guess}, space {cfg.space}, "
          f"engine {cfg.engine}", flush=True)


def saved_state(run):
    """Return a clause naming the checkpoint and the point of training it contains, or ""."""
    if run is None or run.saved_position is None:
        return ""
    return f"; {run.checkpoint} contains the state {run.position(*run.saved_position)}"


def main(argv=None):
    cfg = parse_args(argv)
    run = None
    try:
        run = Run(cfg)
        print_header(run)
        if cfg.benchmark:
            return benchmark(run)
        return run.train()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except WriteError as e:
        resume = "; resume with --resume once it can be written" if saved_state(run) else ""
        print(f"error: {e}{saved_state(run)}{resume}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        # torch.OutOfMemoryError on CUDA; on the CPU a RuntimeError from the allocator
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not (isinstance(e, (MemoryError, torch.OutOfMemoryError))
                or "can't allocate memory" in message):
            raise
        print(f"error: out of memory on {cfg.device} ({message}); lower --width or --batch-size"
              f"{saved_state(run)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # a second SIGINT or SIGTERM during training, or the first one before it starts
        signum = (run and run.stop_signal) or signal.SIGINT
        if run is not None:
            run.status = "interrupted"
            with contextlib.suppress(WriteError):
                run.write_results()
        print(f"error: stopped at once by {signal.Signals(signum).name}{saved_state(run)}",
              file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(main())
