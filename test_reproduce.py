"""Tests of reproduce.sh: the smoke grid end to end, skipping and resuming runs, the printed
commands, the summary tables, and the scheduling of runs over devices (with a stand-in for fg.py).

The smoke grid trains 16 tiny runs on synthetic data in about 30 s on 2 idle cores.
"""

import csv
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(ROOT, "reproduce.sh")
sys.path.insert(0, ROOT)
import fg  # noqa: E402

SMOKE_TIMEOUT_S = 600
ACCURACY_ROWS = [
    ("backprop", "global", "global", "-"),
    ("local learning", "local", "aux", "-"),
    ("forward gradient", "global", "random", "weight"),
    ("forward gradient", "global", "ntk", "weight"),
    ("forward gradient", "global", "aux", "weight"),
    ("forward gradient", "global", "random", "activation"),
    ("forward gradient", "global", "ntk", "activation"),
    ("forward gradient", "global", "aux", "activation"),
]
FULL_COLUMNS = [f"{b} blocks, {a}" for b in (8, 16) for a in ("linear", "mlp", "cnn")]
MEAN_STD = re.compile(r"^(\d+\.\d\d) ± (\d+\.\d\d)$")


def run_script(*args, env=None, timeout=SMOKE_TIMEOUT_S):
    """Run reproduce.sh with this interpreter as PYTHON and return the finished process."""
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def parse_table(output, title_start):
    """Return (header, {(target, guess, space): [cells]}) of the Markdown table after the title."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    header, body = table[0], table[2:]
    return header, {tuple(row[1:4]): row for row in body}


def name_of(blocks, aux, target, guess, space, seed):
    return f"b{blocks}-{aux}-{target}-{guess}-{space}-s{seed}"


def smoke_names():
    names = []
    for seed in (0, 1):
        names.append(name_of(8, "linear", "global", "global", "activation", seed))
        names.append(name_of(8, "linear", "local", "aux", "activation", seed))
        for space in ("weight", "activation"):
            for guess in ("random", "ntk", "aux"):
                names.append(name_of(8, "linear", "global", guess, space, seed))
    return names


def load_result(folder, name):
    with open(os.path.join(folder, name + ".json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke grid, run once: (results folder of its runs, reproduce.sh output)."""
    results = tmp_path_factory.mktemp("smoke")
    proc = run_script("--smoke", "--results", str(results))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return results / "smoke", proc.stdout


@pytest.fixture(scope="module")
def rerun(smoke, tmp_path_factory):
    """A copy of the smoke results with one run marked interrupted and one deleted, run again."""
    folder = tmp_path_factory.mktemp("rerun") / "smoke"
    shutil.copytree(smoke[0], folder)
    interrupted = name_of(8, "linear", "global", "aux", "weight", 1)
    result = load_result(folder, interrupted)
    result["status"] = "interrupted"
    (folder / f"{interrupted}.json").write_text(json.dumps(result))
    deleted = name_of(8, "linear", "global", "ntk", "activation", 0)
    for suffix in (".json", ".pt", ".log"):
        (folder / (deleted + suffix)).unlink()
    proc = run_script("--smoke", "--results", str(folder.parent))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder, proc.stdout, interrupted, deleted


def test_smoke_completes_every_run(smoke):
    folder, _ = smoke
    for name in smoke_names():
        result = load_result(folder, name)
        assert result["status"] == "complete", name
        assert result["config"]["dataset"] == "synthetic"
        assert result["config"]["width"] == 4
        assert result["config"]["epochs"] == 1
        assert len(result["epochs"]) == 1
        assert (folder / f"{name}.pt").is_file()
    assert len(list(folder.glob("*.json"))) == 16


def test_smoke_table_rows_columns_and_values(smoke):
    folder, output = smoke
    header, rows = parse_table(output, "Test accuracy (%) after 1 epoch")
    assert header == ["method", "target", "guess", "space", "8 blocks, linear"]
    assert [tuple(row[:4]) for row in rows.values()] == ACCURACY_ROWS
    for (target, guess, space), row in rows.items():
        match = MEAN_STD.match(row[4])
        assert match, row
        run_space = "activation" if space == "-" else space
        accuracies = [load_result(folder, name_of(8, "linear", target, guess, run_space, seed))
                      ["final_test_accuracy"] for seed in (0, 1)]
        assert match[1] == f"{statistics.mean(accuracies):.2f}"
        assert match[2] == f"{statistics.stdev(accuracies):.2f}"
        assert 0 <= float(match[1]) <= 100


def test_smoke_alignment_table_rows(smoke):
    _, output = smoke
    header, rows = parse_table(output, "Mean cosine between the update and the true gradient")
    assert header[-1] == "8 blocks, linear"
    assert [tuple(row[:4]) for row in rows.values()] == ACCURACY_ROWS[2:]
    for row in rows.values():
        match = MEAN_STD.match(row[4].lstrip("-"))
        assert match, row
        assert -1 <= float(row[4].split(" ")[0]) <= 1


def test_smoke_alignment_csv_rows(smoke):
    folder, output = smoke
    with open(folder / "alignment.csv") as f:
        records = list(csv.DictReader(f))
    # 12 forward-gradient runs x 2 logged steps (one per step) x 7 blocks with auxiliary nets
    assert len(records) == 12 * 2 * 7
    assert {(r["guess"], r["space"]) for r in records} == {
        (g, s) for g in ("random", "ntk", "aux") for s in ("weight", "activation")}
    assert {r["target"] for r in records} == {"global"}
    assert {r["seed"] for r in records} == {"0", "1"}
    assert {int(r["block"]) for r in records} == set(range(7))
    assert {int(r["step"]) for r in records} == {0, 1}
    assert all(-1 <= float(r["cosine"]) <= 1 for r in records)
    assert all(float(r["norm_ratio"]) >= 0 for r in records)
    assert str(folder / "alignment.csv") in output


def test_smoke_plot_needs_matplotlib(smoke):
    folder, output = smoke
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in output
        assert not (folder / "alignment.png").exists()
    else:
        assert (folder / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_skips_finished_runs(smoke, tmp_path):
    folder = tmp_path / "smoke"
    shutil.copytree(smoke[0], folder)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    proc = run_script("--smoke", "--results", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "16 runs in" in proc.stdout
    assert "16 finished, 0 to run" in proc.stdout
    assert not re.search(r"^\[\d+/\d+\] (start|resume) ", proc.stdout, re.MULTILINE)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} == before
    first = parse_table(smoke[1], "Test accuracy")
    assert parse_table(proc.stdout, "Test accuracy") == first


def test_rerun_resumes_interrupted_run(rerun):
    folder, output, interrupted, _ = rerun
    assert "14 finished, 2 to run" in output
    assert re.search(rf"^\[\d/2\] resume {interrupted} on cpu$", output, re.MULTILINE)
    log = (folder / f"{interrupted}.log").read_text()
    assert f"resumed from {folder / interrupted}.pt at the end of epoch 1" in log
    # the run trained its one epoch before the interruption and not again after it
    assert len(re.findall(r"^epoch +1/1 ", log, re.MULTILINE)) == 1
    assert load_result(folder, interrupted)["status"] == "complete"


def test_rerun_starts_missing_run_from_scratch(rerun):
    folder, output, _, deleted = rerun
    assert re.search(rf"^\[\d/2\] start {deleted} on cpu$", output, re.MULTILINE)
    log = (folder / f"{deleted}.log").read_text()
    assert f"no checkpoint at {folder / deleted}.pt: starting from scratch" in log
    assert len(re.findall(r"^epoch +1/1 ", log, re.MULTILINE)) == 1
    assert load_result(folder, deleted)["status"] == "complete"


def expected_full_grid():
    grid = set()
    for blocks in (8, 16):
        for seed in (0, 1, 2):
            grid.add((blocks, "linear", "global", "global", "activation", seed))
            for space in ("weight", "activation"):
                grid.add((blocks, "linear", "global", "random", space, seed))
            for aux in ("linear", "mlp", "cnn"):
                grid.add((blocks, aux, "local", "aux", "activation", seed))
                for space in ("weight", "activation"):
                    for guess in ("ntk", "aux"):
                        grid.add((blocks, aux, "global", guess, space, seed))
    return grid


def test_print_commands_lists_full_grid(tmp_path):
    proc = run_script("--print-commands", "--results", str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 108
    grid = set()
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == sys.executable
        assert argv[1] == os.path.join(ROOT, "fg.py")
        cfg = fg.parse_args(argv[2:])
        assert cfg.dataset == "cifar10"
        assert cfg.width == 64
        assert cfg.epochs == 100
        assert (cfg.batch_size, cfg.lr, cfg.lr_step, cfg.lr_decay) == (128, 0.05, 30, 0.2)
        assert cfg.engine == "jvp"
        assert cfg.resume
        name = name_of(cfg.blocks, cfg.aux, cfg.target, cfg.guess, cfg.space, cfg.seed)
        assert cfg.out == str(tmp_path / "full" / f"{name}.json")
        assert cfg.checkpoint == str(tmp_path / "full" / f"{name}.pt")
        exact = (cfg.target, cfg.guess) in (("global", "global"), ("local", "aux"))
        assert cfg.log_alignment == (0 if exact else 100)
        grid.add((cfg.blocks, cfg.aux, cfg.target, cfg.guess, cfg.space, cfg.seed))
    assert grid == expected_full_grid()
    assert not list(tmp_path.iterdir()), "printing commands must not create files"


@pytest.mark.parametrize("scale, runs, dataset, spaces", [
    ("--small", 15, "fashion-mnist", {"activation"}),
    ("--smoke", 16, "synthetic", {"weight", "activation"}),
])
def test_print_commands_reduced_grids(scale, runs, dataset, spaces, tmp_path):
    proc = run_script(scale, "--print-commands", "--results", str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    configs = [fg.parse_args(shlex.split(line)[2:]) for line in proc.stdout.splitlines()]
    assert len(configs) == runs
    assert {c.dataset for c in configs} == {dataset}
    assert {c.device for c in configs} == {"cpu"}
    assert {c.seed for c in configs} == ({0, 1, 2} if scale == "--small" else {0, 1})
    forward_gradient = [c for c in configs if c.target == "global" and c.guess != "global"]
    assert {c.space for c in forward_gradient} == spaces


def write_result(folder, name, epochs, status, accuracy, cosines=()):
    folder.mkdir(parents=True, exist_ok=True)
    result = {"config": {"epochs": epochs}, "status": status, "final_test_accuracy": accuracy,
              "alignment": [{"step": i, "epoch": 1, "block": 0, "cosine": c, "norm_ratio": 1.0}
                            for i, c in enumerate(cosines)]}
    (folder / f"{name}.json").write_text(json.dumps(result))


def test_table_mode_summarizes_written_results(tmp_path):
    folder = tmp_path / "full"
    for seed, accuracy in zip((0, 1, 2), (90.0, 91.0, 92.0)):
        write_result(folder, name_of(8, "linear", "global", "global", "activation", seed), 100,
                     "complete", accuracy)
    write_result(folder, name_of(16, "mlp", "local", "aux", "activation", 0), 100, "complete", 80.0)
    write_result(folder, name_of(16, "mlp", "local", "aux", "activation", 1), 100, "running", 50.0)
    for seed, status in zip((0, 1, 2), ("complete", "complete", "diverged")):
        write_result(folder, name_of(8, "cnn", "global", "aux", "weight", seed), 100, status,
                     70.0 + seed, cosines=(0.2, 0.4))
    # a finished run of another length counts as not finished
    write_result(folder, name_of(8, "cnn", "global", "ntk", "weight", 0), 50, "complete", 60.0)

    proc = run_script("--table", "--results", str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    header, rows = parse_table(proc.stdout, "Test accuracy (%) after 100 epochs")
    assert header[4:] == FULL_COLUMNS
    assert [tuple(row[:4]) for row in rows.values()] == ACCURACY_ROWS
    # backprop uses no auxiliary net: its 8-block runs fill all three 8-block columns
    assert rows["global", "global", "-"][4:] == ["91.00 ± 1.00"] * 3 + ["-"] * 3
    assert rows["local", "aux", "-"][4:] == ["-"] * 4 + ["80.00 (1/3 seeds)", "-"]
    assert rows["global", "aux", "weight"][6] == "70.50 ± 0.71 (2/3 seeds, 1 diverged)"
    assert rows["global", "ntk", "weight"][6] == "-"
    assert "6 complete" in proc.stdout
    assert "1 stale" in proc.stdout
    assert "1 diverged" in proc.stdout
    assert "1 running" in proc.stdout
    assert "99 missing" in proc.stdout
    _, cosine_rows = parse_table(proc.stdout, "Mean cosine")
    assert cosine_rows["global", "aux", "weight"][6] == "0.30 ± 0.00 (2/3 seeds, 1 diverged)"
    assert not list(folder.glob("*.log")), "--table must not start runs"
    with open(folder / "alignment.csv") as f:
        assert len(list(csv.DictReader(f))) == 3 * 2


def write_fake_fg(tmp_path):
    """Write a stand-in for `python fg.py` that records its device and time span, then writes a
    complete result. `python -` runs the real interpreter, for reproduce.sh's own helpers."""
    fake = tmp_path / "fake-python"
    fake.write_text(f"""#!/usr/bin/env bash
if [[ $1 == - ]]; then exec {shlex.quote(sys.executable)} "$@"; fi
while (($#)); do
  case $1 in --device) device=$2 ;; --out) out=$2 ;; --epochs) epochs=$2 ;; esac
  shift
done
# the data check before the grid
if [[ $epochs == 0 ]]; then exit 0; fi
write() {{
  echo "{{\\"config\\": {{\\"epochs\\": $epochs}}, \\"status\\": \\"$1\\"," \\
       "\\"final_test_accuracy\\": 50.0, \\"alignment\\": []}}" >"$out"
}}
trap 'kill $!; write interrupted; echo "stop $device $out" >>{tmp_path}/spans; exit 143' TERM
echo "begin $device $(date +%s.%N) $out" >>{tmp_path}/spans
sleep "${{FAKE_SECONDS:-0.1}}" & wait
echo "end $device $(date +%s.%N) $out" >>{tmp_path}/spans
write complete
echo "final test accuracy: 50.00%"
""")
    fake.chmod(0o755)
    return fake


def test_gpus_run_one_job_per_device(tmp_path):
    fake = write_fake_fg(tmp_path)
    proc = run_script("--gpus", "0,1,2", "--results", str(tmp_path / "out"),
                      env={"PYTHON": str(fake)}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spans = {}
    for line in (tmp_path / "spans").read_text().splitlines():
        event, device, seconds, out = line.split()
        spans.setdefault(out, {})[event] = (device, float(seconds))
    assert len(spans) == 108
    by_device = {}
    for span in spans.values():
        device = span["begin"][0]
        assert span["end"][0] == device
        by_device.setdefault(device, []).append((span["begin"][1], span["end"][1]))
    assert sorted(by_device) == ["cuda:0", "cuda:1", "cuda:2"]
    for device, intervals in by_device.items():
        intervals.sort()
        for (_, end), (begin, _) in zip(intervals, intervals[1:]):
            assert begin >= end, f"two runs at once on {device}"
    assert "0 finished, 108 to run, 3 at a time on cuda:0 cuda:1 cuda:2" in proc.stdout
    assert "108 complete" in proc.stdout


def test_sigterm_stops_runs_resumably(tmp_path):
    fake = write_fake_fg(tmp_path)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_SECONDS": "30"}
    proc = subprocess.Popen(["bash", SCRIPT, "--gpus", "0,1", "--results", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    spans = tmp_path / "spans"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
            not spans.exists() or spans.read_text().count("begin") < 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopping 2 run(s)" in stdout
    stops = [line.split() for line in spans.read_text().splitlines() if line.startswith("stop")]
    assert sorted(device for _, device, _ in stops) == ["cuda:0", "cuda:1"]
    for _, _, out in stops:
        with open(out) as f:
            assert json.load(f)["status"] == "interrupted"


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option --bogus"),
    (["--gpus", "a,b"], "invalid value for --gpus: a,b"),
    (["--gpus"], "--gpus needs a value"),
    (["--gpus", "0", "--print-commands"], "--gpus has no effect with --print-commands"),
    (["--jobs", "2"], "invalid value for --jobs: 2"),
    (["--smoke", "--jobs", "0"], "invalid value for --jobs: 0"),
])
def test_invalid_options_exit_2(args, message):
    proc = run_script(*args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_help_lists_every_option():
    proc = run_script("--help", timeout=60)
    assert proc.returncode == 0
    for option in ("--small", "--smoke", "--results", "--data-dir", "--gpus", "--jobs",
                   "--print-commands", "--table"):
        assert option in proc.stdout
