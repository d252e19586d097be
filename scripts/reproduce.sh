#!/usr/bin/env bash
# Reproduces a paper's Omniglot table with its exact protocol presets (README "Faithfulness"):
#
#   scripts/reproduce.sh maml_paper     # cbfinn/maml: 5/20-way x 1/5-shot, 60,000 iterations each
#   scripts/reproduce.sh mamlpp_paper   # the MAML++ repository's configs, scored as their top-5 ensemble
#
# 1. times PROBE (default 50) iterations of each cell and prints the estimated total time;
# 2. trains the four cells as one sweep (`metarun train -m`) on DEVICE (default auto: the GPU if there is one),
#    through the Hydra launcher LAUNCHER when given (e.g. LAUNCHER=joblib: hydra/launcher=joblib);
# 3. evaluates each cell's best checkpoint on 600 fixed test tasks with the learning curve (accuracy after each
#    number of inner steps, as cbfinn/maml's test: 0..10 steps; MAML++: 0..5 steps, ensemble of the top 5);
# 4. writes the table beside the papers' numbers: `metarun report --paper` -> OUT/report.md, OUT/report.csv.
#
# Environment: OUT (default outputs/reproduce/<preset>-<time>), DEVICE, LAUNCHER, PROBE, EVAL_TASKS (600),
# ENSEMBLE (checkpoints per score; default 1, MAML++ 5).
# Further arguments are metarun settings given to every training run (e.g. iterations=2000 for a short check).
set -euo pipefail

PRESET="${1:-}"
case "$PRESET" in
  maml_paper) STEPS="0,1,2,3,4,5,6,7,8,9,10"; ENSEMBLE="${ENSEMBLE:-1}" ;;
  mamlpp_paper) STEPS="0,1,2,3,4,5"; ENSEMBLE="${ENSEMBLE:-5}" ;;
  *) echo "usage: scripts/reproduce.sh maml_paper|mamlpp_paper [metarun settings...]" >&2; exit 2 ;;
esac
shift
CELLS=(omniglot_5way_1shot omniglot_5way_5shot omniglot_20way_1shot omniglot_20way_5shot)
OUT="${OUT:-outputs/reproduce/$PRESET-$(date +%Y-%m-%d_%H-%M-%S)}"
DEVICE="${DEVICE:-auto}"
PROBE="${PROBE:-50}"
EVAL_TASKS="${EVAL_TASKS:-600}"
METARUN="${METARUN:-metarun}"   # the command (word-split: METARUN="python -m metarun.cli" works)
if [[ -e "$OUT" ]]; then echo "metarun: error: OUT=$OUT exists: choose another OUT" >&2; exit 2; fi
mkdir -p "$OUT/probe"
LAUNCH=()
if [[ -n "${LAUNCHER:-}" ]]; then LAUNCH=("hydra/launcher=$LAUNCHER"); fi

# 1. Estimated time, measured: PROBE iterations of each cell (MAML++: epochs shortened so that its
#    schedules fit, same work per iteration), its seconds per iteration times the cell's iterations.
total=0
for cell in "${CELLS[@]}"; do
  probe=(experiment="$PRESET/$cell" iterations="$PROBE" eval_every="$PROBE" val_tasks=1 test_tasks=1 keep_best=1
         device="$DEVICE" hydra.run.dir="$OUT/probe/$cell")
  if [[ "$PRESET" == mamlpp_paper ]]; then
    probe+=(algorithm.iterations_per_epoch=$(( (PROBE + 9) / 10 )))
  fi
  $METARUN train "$@" "${probe[@]}" > "$OUT/probe/$cell.log" 2>&1 || {
    echo "metarun: error: the probe of $cell failed: see $OUT/probe/$cell.log" >&2; exit 2; }
  seconds=$(python - "$OUT/probe/$cell" "$PRESET/$cell" "$@" <<'EOF'
import json, sys
from pathlib import Path
from hydra import compose, initialize_config_dir
from metarun.cli import CONF
run, preset, extra = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
results = json.loads((run / "results.json").read_text())
with initialize_config_dir(config_dir=CONF, version_base="1.3"):
    cfg = compose(config_name="train", overrides=[f"experiment={preset}", *extra])
per_iteration = results["train_seconds"] / results["config"]["iterations"]
print(round(per_iteration * int(cfg.iterations)))
EOF
)
  printf 'metarun: %-22s ~%5.1f h of training (measured over %s iterations)\n' "$cell" \
    "$(python -c "print($seconds / 3600)")" "$PROBE"
  total=$(( total + seconds ))
done
printf 'metarun: estimated time for the four cells: %.1f h of training on %s, plus evaluation\n' \
  "$(python -c "print($total / 3600)")" "$DEVICE"

# 2. The four cells as one sweep.
sweep="$OUT/sweep"
cells=$(IFS=,; echo "${CELLS[*]/#/$PRESET/}")
$METARUN train -m experiment="$cells" device="$DEVICE" hydra.sweep.dir="$sweep" "${LAUNCH[@]}" "$@"

# 3. Each cell's best checkpoint, with the learning curve, on the same fixed test tasks.
for dir in "$sweep"/*/; do
  [[ -f "$dir/results.json" ]] || continue
  name=$(basename "$dir")
  $METARUN eval checkpoint="$dir" steps="$STEPS" tasks="$EVAL_TASKS" ensemble="$ENSEMBLE" device="$DEVICE" \
    hydra.run.dir="$OUT/eval/$name"
done

# 4. The table beside the papers' numbers.
$METARUN report "$OUT/eval" --paper --out "$OUT"
