#!/usr/bin/env bash
# The evidence of docs/results.md ("Held-out mixing and weak specialists"): AMA-H (alpha moved by
# the excess on a held-out `signal` split) against AMA-S, balanced and proportional, 5 seeds, on
# one configuration; with `broken`, the 10:1:1 benchmark whose refusal specialist trained 2 steps.
#
#   bash scripts/heldout_study.sh imbalance   # the 10:1:1 benchmark (jobs/imbalance.yaml)
#   bash scripts/heldout_study.sh difficulty  # equal sizes, unequal difficulty (jobs/minimal.yaml, 150 steps)
#   bash scripts/heldout_study.sh broken      # 10:1:1 with a deliberately broken refusal specialist
#   ROOT=./runs/ablation AMA=ama-ray PYTHON=python bash scripts/heldout_study.sh imbalance
#
# Every excess is measured against one yardstick: the specialists of the configuration's main run
# ($ROOT/imbalance or $ROOT/difficulty, the run scripts/ablation.sh makes; made here if missing),
# trained on the full training split. Arms trained in other run directories (their own data or
# specialists) are evaluated in `<name>_eval` directories that hold the main run's units and the
# arm's generalists. Every stage is resumable: after an interruption the same command continues.
#
# - <base>:               proportional, balanced, AMA-S, the merges (as scripts/ablation.sh runs it)
# - <config>_signal:      data.signal_fraction=0.1: a held-out slice per task taken from training;
#                         its own specialists (trained without the slice) and scores; AMA-H, and AMA-S
#                         on the same smaller training split (what the slice costs AMA-S)
# - broken only:
#   broken_warn:          the refusal specialist trained 2 steps; AMA-S against it as before
#                         (specialists.on_weak=warn). Balanced and proportional never read a specialist:
#                         their units are the main run's (same data, same seeds, same training).
#   broken_raw:           the same specialists; AMA-S with on_weak=raw_loss (the default)
set -euo pipefail

CONFIG=${1:?usage: heldout_study.sh imbalance|difficulty|broken}
ROOT=$(realpath -m "${ROOT:-./runs/ablation}")
AMA=${AMA:-ama-ray}
PYTHON=${PYTHON:-python}
SEEDS="[0,1,2,3,4]"
BREAK=()
case "$CONFIG" in
  imbalance)  BASE=imbalance ;;
  difficulty) BASE=difficulty ;;
  broken)     BASE=imbalance; BREAK=(data.tasks.1.specialist_steps=2) ;;
  *) echo "unknown configuration '$CONFIG' (imbalance, difficulty or broken)" >&2; exit 2 ;;
esac
case "$BASE" in
  imbalance)  JOB=jobs/imbalance.yaml; STEPS=() ;;
  difficulty) JOB=jobs/minimal.yaml;   STEPS=(generalist.optim.steps=150 generalist.optim.checkpoint_every=75 generalist.max_concurrent=3) ;;
esac
COMMON=(--config "$JOB" "storage.path=$ROOT" "generalist.seeds=$SEEDS" "${STEPS[@]}")
MAIN=$ROOT/$BASE
MERGES="merging.methods=[average,task_arithmetic,ties]"  # the main run's, so its evaluation stays as it is

source "$(dirname "$0")/study_lib.sh"  # copy_units

evaluate_against_main() {  # evaluate_against_main RUN ALGORITHMS [overrides...]: RUN's generalists, main's yardstick
  local run=$1 algorithms=$2; shift 2
  local eval_dir=$ROOT/${run}_eval
  copy_units "$MAIN" "$eval_dir" prepared reference specialists scores
  mkdir -p "$eval_dir/generalist"
  for unit in "$ROOT/$run"/generalist/*; do
    [[ -d $eval_dir/generalist/$(basename "$unit") ]] || cp -r "$unit" "$eval_dir/generalist/"
  done
  $AMA evaluate "${COMMON[@]}" "storage.run_name=${run}_eval" "generalist.algorithms=$algorithms" "merging.methods=[]" "$@"
}

echo "== $BASE: main run (the yardstick's specialists, baselines, AMA-S, merging) =="
$AMA run "${COMMON[@]}" "storage.run_name=$BASE" "generalist.algorithms=[proportional,balanced,ama_s]" "$MERGES"

if [[ $CONFIG == broken ]]; then
  echo "== broken: AMA-S against a refusal specialist of 2 steps (on_weak=warn: as before) =="
  $AMA run "${COMMON[@]}" "${BREAK[@]}" storage.run_name=broken_warn "generalist.algorithms=[ama_s]" \
    specialists.on_weak=warn "merging.methods=[]"
  echo "== broken: AMA-S with on_weak=raw_loss =="
  copy_units "$ROOT/broken_warn" "$ROOT/broken_raw" prepared reference specialists scores
  $AMA run "${COMMON[@]}" "${BREAK[@]}" storage.run_name=broken_raw "generalist.algorithms=[ama_s]" \
    specialists.on_weak=raw_loss "merging.methods=[]"
  evaluate_against_main broken_warn "[ama_s]"
  evaluate_against_main broken_raw "[ama_s]"
  SIGNAL_ALGORITHMS="[ama_h]"
else
  SIGNAL_ALGORITHMS="[ama_s,ama_h]"
fi

echo "== $CONFIG: a held-out signal split (10 %); AMA-H =="
$AMA run "${COMMON[@]}" "${BREAK[@]}" "storage.run_name=${CONFIG}_signal" data.signal_fraction=0.1 \
  "generalist.algorithms=$SIGNAL_ALGORITHMS" "merging.methods=[]"
evaluate_against_main "${CONFIG}_signal" "$SIGNAL_ALGORITHMS" data.signal_fraction=0.1

echo "== $CONFIG: paired comparisons (test split; worst task and each task, per seed) =="
RUNS=("$MAIN=main" "$ROOT/${CONFIG}_signal_eval=signal")
PAIRS=(--paired "signal ama_h" "main balanced" --paired "signal ama_h" "main proportional"
       --paired "signal ama_h" "main ama_s")
if [[ $CONFIG == broken ]]; then
  RUNS+=("$ROOT/broken_warn_eval=warn" "$ROOT/broken_raw_eval=raw")
  PAIRS+=(--paired "signal ama_h" "warn ama_s" --paired "signal ama_h" "raw ama_s"
          --paired "raw ama_s" "warn ama_s" --paired "raw ama_s" "main balanced" --paired "warn ama_s" "main balanced")
else
  PAIRS+=(--paired "signal ama_h" "signal ama_s" --paired "signal ama_s" "main ama_s")
fi
for metric in excess_loss rewards/accuracies; do
  $AMA compare "${RUNS[@]}" --metric "$metric" "${PAIRS[@]}"
done

echo "== $CONFIG: the mixtures, by third of training (mean over seeds) =="
$PYTHON scripts/alpha_phases.py "$MAIN" ama_s
for algorithm in ${SIGNAL_ALGORITHMS//[\[\],]/ }; do
  $PYTHON scripts/alpha_phases.py "$ROOT/${CONFIG}_signal" "$algorithm"
done
if [[ $CONFIG == broken ]]; then
  $PYTHON scripts/alpha_phases.py "$ROOT/broken_warn" ama_s
  $PYTHON scripts/alpha_phases.py "$ROOT/broken_raw" ama_s
fi
