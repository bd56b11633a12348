#!/usr/bin/env bash
# The ablation of docs/results.md ("Ablations"): AMA-S as specified against its variants, the
# merging arms and the two baselines, 5 seeds each, on one configuration.
#
#   bash scripts/ablation.sh imbalance   # the 10:1:1 benchmark (jobs/imbalance.yaml)
#   bash scripts/ablation.sh difficulty  # equal sizes, unequal difficulty (jobs/minimal.yaml, 150 steps)
#   ROOT=./runs/ablation AMA=ama-ray bash scripts/ablation.sh imbalance
#
# Every run directory lives under $ROOT; every stage is resumable, so after an interruption the
# same command continues where it stopped. Runs that share data share it by copying committed
# units (prepared/, reference/, specialists/, scores/): the copies are skipped, not recomputed.
#
# - <name>:            proportional, balanced, AMA-S (mixing.* defaults), and the merged
#                      specialists (average, task arithmetic, TIES; λ on validation)
# - <name>_clip_none:  AMA-S with mixing.clip=none (its excess may be negative)
# - <name>_history_task_mean, <name>_history: specialist-free AMA-S (mixing.excess_target=history)
#                      with clip per_task_mean and per_example. It trains without specialists; the
#                      main run's specialists are copied in, and merging.methods set, only so that
#                      evaluate measures its excess against the same specialists as every other
#                      arm (a yardstick; the generalist never reads them).
# - <name>_spec_half, <name>_spec_triple: AMA-S trained against specialists of 1/2x and 3x the
#                      steps (their own specialists and scores). Their excess is then measured
#                      against the main run's specialists in <name>_spec_*_eval, a run directory
#                      holding the main run's units and the variant's generalists, so every arm
#                      has one yardstick.
set -euo pipefail

CONFIG=${1:?usage: ablation.sh imbalance|difficulty}
ROOT=$(realpath -m "${ROOT:-./runs/ablation}")
AMA=${AMA:-ama-ray}
SEEDS="[0,1,2,3,4]"
case "$CONFIG" in
  imbalance)  JOB=jobs/imbalance.yaml; STEPS=(); SPEC_STEPS=300 ;;
  difficulty) JOB=jobs/minimal.yaml;   STEPS=(generalist.optim.steps=150 generalist.optim.checkpoint_every=75 generalist.max_concurrent=3); SPEC_STEPS=200 ;;
  *) echo "unknown configuration '$CONFIG' (imbalance or difficulty)" >&2; exit 2 ;;
esac
COMMON=(--config "$JOB" "storage.path=$ROOT" "generalist.seeds=$SEEDS" "${STEPS[@]}")
MAIN=$ROOT/$CONFIG

source "$(dirname "$0")/study_lib.sh"  # copy_units

echo "== $CONFIG: main run (baselines, AMA-S, merging) =="
$AMA run "${COMMON[@]}" "storage.run_name=$CONFIG" \
  "generalist.algorithms=[proportional,balanced,ama_s]" "merging.methods=[average,task_arithmetic,ties]"

echo "== $CONFIG: AMA-S with clip none =="
copy_units "$MAIN" "$ROOT/${CONFIG}_clip_none" prepared reference specialists scores
$AMA run "${COMMON[@]}" "storage.run_name=${CONFIG}_clip_none" "generalist.algorithms=[ama_s]" \
  mixing.clip=none "merging.methods=[]"

echo "== $CONFIG: specialist-free AMA-S (history target; per-task-mean clip, as docs/algorithms.md advises) =="
copy_units "$MAIN" "$ROOT/${CONFIG}_history_task_mean" prepared reference specialists scores
$AMA run "${COMMON[@]}" "storage.run_name=${CONFIG}_history_task_mean" "generalist.algorithms=[ama_s]" \
  mixing.excess_target=history mixing.clip=per_task_mean "merging.methods=[average]"

echo "== $CONFIG: specialist-free AMA-S (history target; the default per-example clip) =="
copy_units "$MAIN" "$ROOT/${CONFIG}_history" prepared reference specialists scores
$AMA run "${COMMON[@]}" "storage.run_name=${CONFIG}_history" "generalist.algorithms=[ama_s]" \
  mixing.excess_target=history "merging.methods=[average]"

for variant in half:$((SPEC_STEPS / 2)) triple:$((SPEC_STEPS * 3)); do
  name=${variant%%:*}; steps=${variant##*:}
  echo "== $CONFIG: AMA-S against specialists of $steps steps =="
  copy_units "$MAIN" "$ROOT/${CONFIG}_spec_$name" prepared reference
  $AMA run "${COMMON[@]}" "storage.run_name=${CONFIG}_spec_$name" "generalist.algorithms=[ama_s]" \
    "specialists.optim.steps=$steps" "merging.methods=[]"
  # The same generalists, measured against the main run's specialists.
  eval_dir=$ROOT/${CONFIG}_spec_${name}_eval
  copy_units "$MAIN" "$eval_dir" prepared reference specialists scores
  if [[ ! -d $eval_dir/generalist ]]; then
    cp -r "$ROOT/${CONFIG}_spec_$name/generalist" "$eval_dir/generalist"
  fi
  $AMA evaluate "${COMMON[@]}" "storage.run_name=${CONFIG}_spec_${name}_eval" "generalist.algorithms=[ama_s]" "merging.methods=[]"
done

echo "== $CONFIG: paired comparisons (test split; worst task and each task, per seed) =="
RUNS=("$MAIN=main" "$ROOT/${CONFIG}_clip_none=clip_none" "$ROOT/${CONFIG}_history_task_mean=history_tm"
      "$ROOT/${CONFIG}_history=history"
      "$ROOT/${CONFIG}_spec_half_eval=spec_half" "$ROOT/${CONFIG}_spec_triple_eval=spec_triple")
PAIRS=(--paired "main ama_s" "main balanced" --paired "main ama_s" "main proportional"
       --paired "main ama_s" "main merge_average" --paired "main ama_s" "main merge_task_arithmetic"
       --paired "main ama_s" "main merge_ties" --paired "clip_none ama_s" "main ama_s"
       --paired "history_tm ama_s" "main ama_s" --paired "history_tm ama_s" "main balanced"
       --paired "history ama_s" "history_tm ama_s"
       --paired "spec_half ama_s" "main ama_s" --paired "spec_triple ama_s" "main ama_s")
for metric in excess_loss rewards/accuracies generation/accuracy; do
  $AMA compare "${RUNS[@]}" --metric "$metric" "${PAIRS[@]}"
done
