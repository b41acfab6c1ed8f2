#!/usr/bin/env bash
# Run the experiment grid of Fournier, Rivaud, Belilovsky, Eickenberg and Oyallon, "Can Forward
# Gradient Match Backpropagation?" (ICML 2023) with fg.py, then print the test accuracy table and
# the alignment of each estimate with the true gradient.
#
#   bash reproduce.sh                    full grid: CIFAR-10, width 64, 100 epochs, on a GPU
#   bash reproduce.sh --small            reduced grid on CPU, Fashion-MNIST, 20 to 25 minutes
#   bash reproduce.sh --smoke            the whole pipeline on synthetic data, under a minute
#   bash reproduce.sh --gpus 0,1,2,3     one run per GPU at a time
#   bash reproduce.sh --print-commands   one fg.py command per line, for a SLURM array or parallel
#   bash reproduce.sh --table            print the tables from existing results and run nothing
#
# Grid, for each block count (8 and 16) and seed (0, 1, 2):
#   backprop           --target global --guess global
#   local learning     --target local  --guess aux                        x 3 auxiliary nets
#   random guesses     --target global --guess random, weight/activation
#   NTK guesses        --target global --guess ntk,    weight/activation  x 3 auxiliary nets
#   auxiliary guesses  --target global --guess aux,    weight/activation  x 3 auxiliary nets
# Backprop and random guesses never use the auxiliary nets, so one run with --aux linear fills
# all three auxiliary columns of the table: 18 configurations per block count.
#
# Time budget of the full grid = runs x epochs x time per epoch.
#   runs: 2 block counts x 18 configurations x 3 seeds = 108, each 100 epochs of 391 steps.
#   Time per epoch on one A100-class GPU is an estimate, not a measurement. It assumes 20 s for a
#   backprop epoch and scales that by fg.py's step costs on 2 CPU cores at width 16 (backprop
#   0.36 s, activation space 0.73-0.85 s, weight space about 5.5 s). With 16 blocks, each block's
#   forward-mode product runs through all later blocks, about J/2 networks, hence the factor 1.7:
#                             8 blocks   16 blocks   configurations per block count
#     backprop, local         20 s       25 s         4
#     activation space        50 s       85 s         7
#     weight space           300 s      510 s         7
#   per seed and epoch: 4 x 20 + 7 x 50 + 7 x 300 + 4 x 25 + 7 x 85 + 7 x 510 = 6795 s
#   total: 3 seeds x 100 epochs x 6795 s = 2.0e6 s, about 570 GPU-hours, 6 days on 4 GPUs.
#   Weight space is 83% of that. Edit EPOCH_SECONDS below when the estimators get faster; the
#   printed estimate uses it.
#
# --small: Fashion-MNIST (the real idx files), width 8, 8 blocks, CNN auxiliary nets, activation
#   space only, 18432 training examples, 3 epochs of 144 steps with the learning rate divided by
#   5 after each epoch (the paper divides it after 30%, 60% and 90% of training), seeds 0 1 2:
#   5 configurations x 3 seeds = 15 runs on CPU, 2 at a time with one thread each on 2 cores.
#   Measured with one thread on a 2-core machine: an epoch takes about 22 s for backprop and
#   local learning and 65 s for forward gradients, test pass included, and a run starts in 5 s:
#     15 x 5 s + 3 epochs x (6 x 22 s + 9 x 65 s) = 2226 s of run time, about 19 min on 2 cores.
#   Weight space is left out because a weight-space step costs about 10 times an activation-space
#   step (2.0 s against 0.22 s at width 8 with 2 threads). With it, each run would get about 50
#   steps in 30 minutes, too few to separate the guesses: a 48-step pilot ranked random guesses
#   above auxiliary ones. With 432 steps, one seed ranked them as the paper does: backprop 88.1%,
#   local learning 82.5%, global/aux 79.4%, global/ntk 75.0%, global/random 74.7%.
#
# --smoke: synthetic data, width 4, one epoch of 2 steps of 32 examples, 8 blocks, linear aux
#   nets, both spaces, seeds 0 1: 16 runs of about 4 s, mostly start-up; 30 s on 2 idle cores.
#
# Each run writes NAME.json (results), NAME.pt (checkpoint) and NAME.log under RESULTS/SCALE.
# A run whose results say "complete" or "diverged" for the same number of epochs is skipped, and
# every other run is started with --resume, so an interrupted run continues from its checkpoint.
# Two reproduce.sh processes must not share a results folder: use --print-commands to spread the
# runs over machines, then --table to summarize them.

set -euo pipefail

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: reproduce.sh needs bash 4.4 or later; this is bash $BASH_VERSION" >&2
  exit 2
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FG="$HERE/fg.py"
PYTHON=${PYTHON:-python3}

# Estimated seconds per epoch, by scale, block count and kind of run (see the header).
# small:8:weight, 144 steps of about 3 s, is a guess for a --small grid that adds weight space.
declare -A EPOCH_SECONDS=(
  [full:8:exact]=20 [full:8:activation]=50 [full:8:weight]=300
  [full:16:exact]=25 [full:16:activation]=85 [full:16:weight]=510
  [small:8:exact]=22 [small:8:activation]=65 [small:8:weight]=450
  [smoke:8:exact]=0 [smoke:8:activation]=0 [smoke:8:weight]=0
)
declare -A STARTUP_SECONDS=([full]=30 [small]=5 [smoke]=4)

usage() {
  sed -n '2,/^# Grid/{/^# Grid/!p}' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --small            reduced grid on CPU (Fashion-MNIST)
  --smoke            tiny grid on synthetic data, to check the pipeline
  --results DIR      folder for results, checkpoints and logs (default: results); runs go
                     to DIR/full, DIR/small or DIR/smoke
  --data-dir DIR     dataset folder (default: data for CIFAR-10, which is downloaded there,
                     and /usr/share/datasets/fashion-mnist for --small)
  --gpus LIST        comma-separated CUDA device numbers; one run per device at a time,
                     so 0,0,1,1 runs two at a time on each of GPUs 0 and 1
  --jobs N           runs at a time on CPU (default: the number of cores), each with
                     cores / N threads unless OMP_NUM_THREADS is set
  --print-commands   print one fg.py command per run and exit
  --table            print the tables from existing results and exit
EOF
}

# Set the scale's settings as globals: data, model width, training length, grid and device.
set_scale() {
  SCALE=$1
  BATCH=128
  case $SCALE in
    full)
      DATASET=cifar10; DEFAULT_DATA_DIR="$HERE/data"
      WIDTH=64; EPOCHS=100; SUBSET=0; LR_STEP=30
      BLOCKS=(8 16); AUX=(linear mlp cnn); SPACES=(weight activation); SEEDS=(0 1 2)
      DEVICE=auto; ALIGN_EVERY=100 ;;
    small)
      DATASET=fashion-mnist; DEFAULT_DATA_DIR=/usr/share/datasets/fashion-mnist
      WIDTH=8; EPOCHS=3; SUBSET=18432; LR_STEP=1
      BLOCKS=(8); AUX=(cnn); SPACES=(activation); SEEDS=(0 1 2)
      DEVICE=cpu; ALIGN_EVERY=8 ;;
    smoke)
      DATASET=synthetic; DEFAULT_DATA_DIR="$HERE/data"
      WIDTH=4; EPOCHS=1; SUBSET=64; BATCH=32; LR_STEP=30
      BLOCKS=(8); AUX=(linear); SPACES=(weight activation); SEEDS=(0 1)
      DEVICE=cpu; ALIGN_EVERY=1 ;;
  esac
}

# Print the grid, one run per line: blocks aux target guess space seed.
# Seeds vary slowest, so the table has every row once the first seed is done.
print_grid() {
  local seed blocks aux space
  for seed in "${SEEDS[@]}"; do
    for blocks in "${BLOCKS[@]}"; do
      echo "$blocks ${AUX[0]} global global activation $seed"
      for aux in "${AUX[@]}"; do
        echo "$blocks $aux local aux activation $seed"
      done
      for space in "${SPACES[@]}"; do
        echo "$blocks ${AUX[0]} global random $space $seed"
        for aux in "${AUX[@]}"; do
          echo "$blocks $aux global ntk $space $seed"
          echo "$blocks $aux global aux $space $seed"
        done
      done
    done
  done
}

run_name() {  # blocks aux target guess space seed
  echo "b$1-$2-$3-$4-$5-s$6"
}

# Kind of run for the time estimate: exact gradients, or a forward gradient in a space.
run_kind() {  # target guess space
  if [[ $1/$2 == global/global || $1/$2 == local/aux ]]; then
    echo exact
  else
    echo "$3"
  fi
}

# Fill the array CMD with the fg.py command of one run.
build_command() {  # blocks aux target guess space seed device
  local name align=0
  name=$(run_name "$1" "$2" "$3" "$4" "$5" "$6")
  # alignment with the true gradient is recorded for the forward-gradient runs
  if [[ $(run_kind "$3" "$4" "$5") != exact ]]; then
    align=$ALIGN_EVERY
  fi
  CMD=(
    "$PYTHON" "$FG"
    --dataset "$DATASET"
    --data-dir "$DATA_DIR"
    --train-subset "$SUBSET"
    --blocks "$1"
    --width "$WIDTH"
    --aux "$2"
    --target "$3"
    --guess "$4"
    --space "$5"
    --engine jvp
    --epochs "$EPOCHS"
    --batch-size "$BATCH"
    --lr 0.05
    --lr-step "$LR_STEP"
    --lr-decay 0.2
    --seed "$6"
    --device "$7"
    --log-alignment "$align"
    --out "$RUN_DIR/$name.json"
    --checkpoint "$RUN_DIR/$name.pt"
    --resume
  )
}

print_commands() {
  local line
  while read -r -a run; do
    build_command "${run[@]}" "$DEVICE"
    printf -v line '%q ' "${CMD[@]}"
    echo "${line% }"
  done < <(print_grid)
}

# Python helpers that read the result files: `status` prints each run's state, `summary` prints
# the tables and writes alignment.csv (and alignment.png when matplotlib is installed).
results_helper() {  # status|summary RUN_DIR EPOCHS RUN...
  "$PYTHON" - "$@" <<'PYTHON'
import csv, json, os, statistics, sys

mode, run_dir, epochs, specs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
FIELDS = ("blocks", "aux", "target", "guess", "space", "seed")
runs = [dict(zip(FIELDS, spec.split())) for spec in specs]


def name(run):
    return "b{blocks}-{aux}-{target}-{guess}-{space}-s{seed}".format(**run)


def load(run):
    path = os.path.join(run_dir, name(run) + ".json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def state(result):
    """missing, running, interrupted, complete or diverged; `stale` for another epoch count."""
    if result is None:
        return "missing"
    if result["config"]["epochs"] != epochs and result["status"] in ("complete", "diverged"):
        return "stale"
    return result["status"]


if mode == "status":
    for run in runs:
        print(name(run), state(load(run)))
    sys.exit()


def exact(run):
    return (run["target"], run["guess"]) in (("global", "global"), ("local", "aux"))


def uses_aux(run):
    return not (run["target"] == "global" and run["guess"] in ("global", "random"))


def row_of(run):
    return (run["target"], run["guess"], "-" if exact(run) else run["space"])


results = {name(run): load(run) for run in runs}
rows = list(dict.fromkeys(row_of(run) for run in runs))
columns = list(dict.fromkeys((run["blocks"], run["aux"]) for run in runs if uses_aux(run)))
seeds = list(dict.fromkeys(run["seed"] for run in runs))


def cell_runs(row, column):
    return [run for run in runs if row_of(run) == row and run["blocks"] == column[0]
            and (run["aux"] == column[1] or not uses_aux(run))]


def format_cell(values, diverged):
    if not values:
        text = "-"
    elif len(values) == 1:
        text = f"{values[0]:.2f}"
    else:
        text = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    notes = [f"{len(values)}/{len(seeds)} seeds"] if 0 < len(values) < len(seeds) else []
    notes += [f"{diverged} diverged"] if diverged else []
    return text + (f" ({', '.join(notes)})" if notes else "")


def print_table(title, value_of, row_filter=lambda row: True):
    """Print a Markdown table whose cells are the mean ± std over seeds of value_of(result)."""
    print(f"\n{title}\n")
    head = ["method", "target", "guess", "space"] + [f"{b} blocks, {a}" for b, a in columns]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 4 + "---:|" * len(columns))
    for row in filter(row_filter, rows):
        method = {("global", "global"): "backprop", ("local", "aux"): "local learning"}.get(
            row[:2], "forward gradient")
        cells = []
        for column in columns:
            complete = [results[name(r)] for r in cell_runs(row, column)
                        if state(results[name(r)]) == "complete"]
            values = [v for v in map(value_of, complete) if v is not None]
            diverged = sum(state(results[name(r)]) == "diverged" for r in cell_runs(row, column))
            cells.append(format_cell(values, diverged))
        print("| " + " | ".join([method, *row, *cells]) + " |")


def mean_cosine(result):
    cosines = [a["cosine"] for a in result["alignment"]]
    return statistics.mean(cosines) if cosines else None


def write_alignment_csv(path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS + ("step", "epoch", "block", "cosine", "norm_ratio"))
        for run in runs:
            for a in (results[name(run)] or {}).get("alignment", []):
                writer.writerow([run[k] for k in FIELDS] +
                                [a["step"], a["epoch"], a["block"], a["cosine"], a["norm_ratio"]])


def plot_curve(ax, row, column):
    """Plot the cosine of one row's runs against the step, averaged over blocks and seeds."""
    by_step = {}
    for run in cell_runs(row, column):
        for a in (results[name(run)] or {}).get("alignment", []):
            by_step.setdefault(a["step"], []).append(a["cosine"])
    steps = sorted(by_step)
    if steps:
        color = {"random": "C0", "ntk": "C1", "aux": "C2"}.get(row[1])
        ax.plot(steps, [statistics.mean(by_step[s]) for s in steps], label=row[1], color=color)


def plot_alignment(path):
    """Plot one panel per space and (blocks, aux) column, with one curve per guess."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    spaces = list(dict.fromkeys(row[2] for row in rows if row[2] != "-"))
    figure, axes = plt.subplots(len(spaces), len(columns), squeeze=False, sharey=True,
                                figsize=(4 * len(columns) + 1.5, 3 * len(spaces) + 0.5))
    for i, space in enumerate(spaces):
        for j, column in enumerate(columns):
            ax = axes[i][j]
            for row in rows:
                if row[2] == space:
                    plot_curve(ax, row, column)
            ax.set_title(f"{space} space, {column[0]} blocks, {column[1]} aux", fontsize=9)
            ax.set_xlabel("training step")
            ax.axhline(0, color="gray", linewidth=0.5)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        axes[i][0].set_ylabel("cosine")
    figure.suptitle("Cosine of update and true gradient, mean over blocks and seeds", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


states = [state(results[name(run)]) for run in runs]
counts = {s: states.count(s) for s in dict.fromkeys(states)}
print(f"\nruns in {run_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
print_table(f"Test accuracy (%) after {epochs} epoch{'s' * (epochs != 1)}, mean ± std over seeds "
            f"{' '.join(seeds)}", lambda result: result["final_test_accuracy"])
print("\nBackprop and random guesses use no auxiliary net: one run per seed (--aux "
      f"{runs[0]['aux']}) fills every aux column.")
print_table("Mean cosine between the update and the true gradient over logged steps and blocks, "
            "mean ± std over seeds", mean_cosine, lambda row: row[2] != "-")
csv_path = os.path.join(run_dir, "alignment.csv")
write_alignment_csv(csv_path)
try:
    plot_alignment(os.path.join(run_dir, "alignment.png"))
    print(f"\nalignment: {csv_path} and alignment.png beside it")
except ImportError:
    print(f"\nalignment: {csv_path}; matplotlib is not installed, so no alignment.png "
          "(pip install matplotlib)")
PYTHON
}

summarize() {
  local specs
  mapfile -t specs < <(print_grid)
  results_helper summary "$RUN_DIR" "$EPOCHS" "${specs[@]}"
}

format_duration() {  # seconds
  if (($1 < 120)); then
    echo "$1 s"
  elif (($1 < 7200)); then
    echo "$(($1 / 60)) min"
  else
    echo "$(($1 / 3600)) h"
  fi
}

# Print the scale, the runs left to do and their estimated time; fill the array PENDING.
print_header() {
  local specs spec run name state kind epoch_seconds seconds=0 examples=$SUBSET
  mapfile -t specs < <(print_grid)
  declare -A states=()
  while read -r name state; do
    states[$name]=$state
  done < <(results_helper status "$RUN_DIR" "$EPOCHS" "${specs[@]}")
  PENDING=()
  for spec in "${specs[@]}"; do
    read -r -a run <<<"$spec"
    name=$(run_name "${run[@]}")
    [[ ${states[$name]} == complete || ${states[$name]} == diverged ]] && continue
    PENDING+=("$spec")
    kind=$(run_kind "${run[2]}" "${run[3]}" "${run[4]}")
    epoch_seconds=${EPOCH_SECONDS[$SCALE:${run[0]}:$kind]:-0}
    seconds=$((seconds + STARTUP_SECONDS[$SCALE] + EPOCHS * epoch_seconds))
  done
  ((SUBSET == 0)) && examples=all
  echo "reproduce.sh $SCALE: $DATASET, width $WIDTH, epochs $EPOCHS," \
       "$examples training examples, blocks ${BLOCKS[*]}, aux ${AUX[*]}," \
       "seeds ${SEEDS[*]}"
  echo "${#specs[@]} runs in $RUN_DIR: $((${#specs[@]} - ${#PENDING[@]})) finished," \
       "${#PENDING[@]} to run, ${#DEVICES[@]} at a time on ${DEVICES[*]}"
  echo "estimated time: $(format_duration "$seconds") of run time, about" \
       "$(format_duration $((seconds / ${#DEVICES[@]}))) with ${#DEVICES[@]} at a time" \
       "(estimates per epoch in the header of reproduce.sh)"
}

# Load the dataset once with fg.py before any run starts: this downloads CIFAR-10 once rather
# than in several runs at a time, and a missing or invalid dataset stops the script here.
check_data() {
  local log="$RUN_DIR/data-check.log"
  echo "checking $DATASET in $DATA_DIR"
  if ! "$PYTHON" "$FG" --dataset "$DATASET" --data-dir "$DATA_DIR" --train-subset "$SUBSET" \
      --epochs 0 --checkpoint none --device cpu >"$log" 2>&1; then
    tail -n 5 "$log" >&2
    echo "error: fg.py could not load $DATASET from $DATA_DIR (log: $log); use --data-dir" >&2
    exit 1
  fi
}

# Runs in progress: process id -> run name, device and start time.
declare -A RUN_NAME=() RUN_DEVICE=() RUN_START=()
FREE_DEVICES=()
FAILED=()

start_run() {  # index spec
  local name verb=start device=${FREE_DEVICES[0]}
  read -r -a run <<<"$2"
  name=$(run_name "${run[@]}")
  FREE_DEVICES=("${FREE_DEVICES[@]:1}")
  build_command "${run[@]}" "$device"
  [[ -f $RUN_DIR/$name.pt ]] && verb=resume
  echo "[$1/${#PENDING[@]}] $verb $name on $device"
  # stdin from /dev/null: a run in a background process group that read the terminal would stop
  if [[ $device == cpu ]]; then
    OMP_NUM_THREADS=$THREADS "${CMD[@]}" </dev/null >>"$RUN_DIR/$name.log" 2>&1 &
  else
    "${CMD[@]}" </dev/null >>"$RUN_DIR/$name.log" 2>&1 &
  fi
  RUN_NAME[$!]=$name
  RUN_DEVICE[$!]=$device
  RUN_START[$!]=$SECONDS
}

# Wait until a run ends, report it and free its device. Polling with kill -0 instead of
# `wait -n -p` keeps the script working with bash 4.4.
finish_run() {
  local pid
  while true; do
    for pid in "${!RUN_NAME[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        report_run "$pid"
        return
      fi
    done
    sleep 0.2
  done
}

report_run() {  # pid
  local pid=$1 status=0 name outcome
  wait "$pid" || status=$?
  name=${RUN_NAME[$pid]}
  outcome="done: $(tail -n 1 "$RUN_DIR/$name.log")"
  if grep -q '"status": "diverged"' "$RUN_DIR/$name.json" 2>/dev/null; then
    outcome="diverged, see $RUN_DIR/$name.log"
  elif ((status != 0)); then
    outcome="FAILED with exit status $status, see $RUN_DIR/$name.log"
    FAILED+=("$name")
  fi
  echo "    $name $outcome ($((SECONDS - RUN_START[$pid])) s)"
  FREE_DEVICES+=("${RUN_DEVICE[$pid]}")
  unset "RUN_NAME[$pid]" "RUN_DEVICE[$pid]" "RUN_START[$pid]"
}

# On SIGINT or SIGTERM, ask every run to stop: fg.py writes its checkpoint and exits. The exit
# status is 128 + the signal's number, as for a process the signal ended: 130 or 143.
stop_runs() {
  echo "stopping ${#RUN_NAME[@]} run(s); run the same command again to resume them"
  local pid
  for pid in "${!RUN_NAME[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  wait || true
  exit "$1"
}

run_grid() {
  local i=0
  FREE_DEVICES=("${DEVICES[@]}")
  # Job control gives each run its own process group, so a Ctrl-C in the terminal reaches
  # only this script, which then stops each run once through stop_runs.
  set -m
  trap 'stop_runs 130' INT
  trap 'stop_runs 143' TERM
  for spec in "${PENDING[@]}"; do
    i=$((i + 1))
    while ((${#FREE_DEVICES[@]} == 0)); do
      finish_run
    done
    start_run "$i" "$spec"
  done
  while ((${#RUN_NAME[@]})); do
    finish_run
  done
  trap - INT TERM
  set +m
}

# Printed commands and logs use absolute paths, so they work from any directory.
absolute_path() {
  if [[ $1 == /* ]]; then
    echo "$1"
  else
    echo "$PWD/$1"
  fi
}

main() {
  local mode=run gpus="" jobs="" results=results data_dir="" cores
  set_scale full
  while (($#)); do
    case $1 in
      --small) set_scale small ;;
      --smoke) set_scale smoke ;;
      --print-commands) mode=print ;;
      --table) mode=table ;;
      --results | --data-dir | --gpus | --jobs)
        if (($# < 2)); then
          echo "error: $1 needs a value; see bash reproduce.sh --help" >&2
          exit 2
        fi
        case $1 in
          --results) results=$2 ;;
          --data-dir) data_dir=$2 ;;
          --gpus) gpus=$2 ;;
          --jobs) jobs=$2 ;;
        esac
        shift ;;
      -h | --help) usage; exit 0 ;;
      *) echo "error: unknown option $1; see bash reproduce.sh --help" >&2; exit 2 ;;
    esac
    shift
  done

  DEVICES=("$DEVICE")
  if [[ -n $jobs ]]; then
    if [[ ! $jobs =~ ^[1-9][0-9]*$ || -n $gpus || $DEVICE != cpu ]]; then
      echo "error: invalid value for --jobs: $jobs; expected a number >= 1, with --small or" \
           "--smoke and without --gpus" >&2
      exit 2
    fi
  fi
  # CPU runs: one run per core at a time with one thread each, unless --jobs or OMP_NUM_THREADS
  # sets otherwise. Small models gain little from a second thread, and on a shared 2-core machine
  # (load about 5) one smoke run took 70 s with two threads against 11 s with one.
  cores=$(getconf _NPROCESSORS_ONLN)
  if [[ $DEVICE == cpu ]]; then
    jobs=${jobs:-$cores}
    THREADS=${OMP_NUM_THREADS:-$(((cores + jobs - 1) / jobs))}
    DEVICES=()
    while ((${#DEVICES[@]} < jobs)); do
      DEVICES+=(cpu)
    done
  fi
  if [[ -n $gpus ]]; then
    if [[ ! $gpus =~ ^[0-9]+(,[0-9]+)*$ ]]; then
      echo "error: invalid value for --gpus: $gpus; expected device numbers such as 0,1,2,3" >&2
      exit 2
    fi
    if [[ $mode == print ]]; then
      echo "error: --gpus has no effect with --print-commands; the commands use --device" \
           "$DEVICE" >&2
      exit 2
    fi
    IFS=, read -r -a DEVICES <<<"$gpus"
    DEVICES=("${DEVICES[@]/#/cuda:}")
  fi
  RUN_DIR=$(absolute_path "$results/$SCALE")
  DATA_DIR=$(absolute_path "${data_dir:-$DEFAULT_DATA_DIR}")

  case $mode in
    print) print_commands; return ;;
    table)
      if [[ ! -d $RUN_DIR ]]; then
        echo "error: no results folder $RUN_DIR; run the grid first or pass --results" >&2
        exit 1
      fi
      summarize
      return ;;
  esac
  mkdir -p "$RUN_DIR"
  print_header
  if ((${#PENDING[@]})); then
    check_data
  fi
  run_grid
  summarize
  if ((${#FAILED[@]})); then
    echo "error: ${#FAILED[@]} run(s) failed: ${FAILED[*]}; their logs are in $RUN_DIR" >&2
    exit 1
  fi
}

main "$@"
