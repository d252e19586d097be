#!/usr/bin/env bash
# Runs cells of the reproduction matrix (metarun/matrix.py) and rebuilds it (docs/results/matrix.md):
#
#   scripts/reproduce.sh all                         # every cell
#   scripts/reproduce.sh maml_omniglot_5way_1shot    # cells by name (python -m metarun.matrix names)
#   scripts/reproduce.sh maml_paper                  # a group: maml_paper, mamlpp_paper (4 cells each)
#   SEEDS="0 1 2" scripts/reproduce.sh anil_omniglot_20way_1shot -- threads=1 time_limit=120
#
# For each cell and seed, one run dir OUT/<cell>/seed<N>:
# 1. trains the cell's preset (`metarun train <preset> seed=N`); a run dir that holds a checkpoint
#    but not all of its iterations (stopped by time_limit=, killed) is continued with `metarun train
#    resume=<dir>`; one that finished its iterations is kept as it is;
# 2. scores it with the paper's protocol where that is not the run's own test (`metarun eval`:
#    MAML++'s top-5 ensemble, Lake's benchmark), into OUT/<cell>/seed<N>-eval-<time>;
# 3. copies its results.json (and eval.json), never a checkpoint, into RESULTS/<cell>/seed<N>/.
# Then `metarun report RESULTS --matrix` rewrites RESULTS/matrix.md. A cell stopped early is shown as
# such, with the iterations it reached: run the script again to continue a time_limit= segment. A
# short check (iterations=N below the paper's) ends at N and stays a short check: delete its run dir
# to train the cell in full (an extended run would not follow the preset's schedules).
#
# Environment: SEEDS (default "0"), OUT (run dirs, default outputs/reproduce), RESULTS (default
# docs/results), DEVICE (default auto: the GPU if there is one), METARUN (default metarun; word-split,
# so METARUN="python -m metarun.cli" works). Settings after `--` go to every `metarun train` (e.g.
# threads=1 time_limit=120 for a segment of at most two hours, iterations=200 for a short check).
set -euo pipefail

if [[ $# -eq 0 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  [[ $# -gt 0 ]]   # exit 0 for --help, 1 without any cell
  exit
fi
NAMES=()
while [[ $# -gt 0 && "$1" != "--" ]]; do NAMES+=("$1"); shift; done
[[ $# -gt 0 ]] && shift   # the `--`
if [[ ${#NAMES[@]} -eq 0 ]]; then
  echo "metarun: error: name the cells before \`--\` (a cell, a group or all): see $0 --help" >&2
  exit 2
fi
SEEDS="${SEEDS:-0}"
OUT="${OUT:-outputs/reproduce}"
RESULTS="${RESULTS:-docs/results}"
DEVICE="${DEVICE:-auto}"
METARUN="${METARUN:-metarun}"
# A line per cell: name, the paper's iterations, train settings, eval settings (tab-separated); an
# unknown name stops here.
PLAN=$(python -m metarun.matrix plan "${NAMES[@]}")

# How far a run dir got: "done" (a results.json at the paper's iterations), "short N" (a short
# check that finished its own N), "partial" (a checkpoint to resume from), "dead" (a dir without
# either: a run killed before its first checkpoint), "running" (one starting now), "new".
state() {
  python - "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
run, paper = Path(sys.argv[1]), int(sys.argv[2])
results = run / "results.json"
if results.is_file():
    data = json.loads(results.read_text())
    done, own = data.get("iterations_done", 0), data.get("config", {}).get("iterations", 1)
    if done >= own:
        print("done" if done >= paper else f"short {own}")
        raise SystemExit
if (run / "checkpoints" / "last.pt").is_file():
    print("partial")
elif run.exists():
    import os, socket
    from metarun.runner.rundir import MARKER
    try:  # a run still starting in it (its claim's process lives) is not a dead one
        owner = json.loads((run / MARKER).read_text())
        os.kill(int(owner["pid"]), 0)
        print("running" if owner.get("host") == socket.gethostname() else "dead")
    except (OSError, ValueError, KeyError, TypeError):
        print("dead")
else:
    print("new")
EOF
}

while IFS=$'\t' read -r cell paper train evaluate <&3; do
  read -ra TRAIN <<< "$train"
  read -ra EVAL <<< "${evaluate:-}"
  for seed in $SEEDS; do
    run="$OUT/$cell/seed$seed"
    status=$(state "$run" "$paper")
    case "$status" in
      done) echo "metarun: $run is at the paper's $paper iterations: kept" >&2 ;;
      short*) echo "metarun: $run is a short check (iterations=${status#short }, the paper's:" \
        "$paper): kept; delete it to train the cell in full" >&2 ;;
      partial) $METARUN train resume="$run" "$@" ;;
      running) echo "metarun: error: $run is being trained by a running process" >&2; exit 2 ;;
      dead|new)
        if [[ "$status" == dead ]]; then   # nothing finished in it: kept aside, not deleted
          aside="$run.killed-$(date +%Y-%m-%d_%H-%M-%S)"
          echo "metarun: $run holds no checkpoint (killed before its first): moved to $aside" >&2
          mv "$run" "$aside"
        fi
        $METARUN train "${TRAIN[@]}" seed="$seed" device="$DEVICE" hydra.run.dir="$run" "$@" ;;
    esac
    keep="$RESULTS/$cell/seed$seed"
    if [[ ${#EVAL[@]} -gt 0 ]]; then   # scored first: a failed eval leaves the kept files alone
      scored="$run-eval-$(date +%Y-%m-%d_%H-%M-%S)"   # a new score of the run as it is now
      $METARUN eval checkpoint="$run" "${EVAL[@]}" device="$DEVICE" hydra.run.dir="$scored"
      mkdir -p "$keep"
      cp "$scored/eval.json" "$keep/eval.json"
    fi
    mkdir -p "$keep"
    cp "$run/results.json" "$keep/results.json"
  done
done 3<<< "$PLAN"
$METARUN report "$RESULTS" --matrix > /dev/null   # says where it wrote
