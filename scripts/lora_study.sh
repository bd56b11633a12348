#!/usr/bin/env bash
# Cheaper specialists: LoRA for one stage only, at 10:1:1 (docs/results.md "LoRA for one stage").
# Resumable: rerun the same command.
#
#   bash scripts/lora_study.sh
#   ROOT=./runs/ablation AMA=ama-ray bash scripts/lora_study.sh
#
# - $ROOT/imbalance:        full-weight specialists and generalists (jobs/imbalance.yaml; the run
#                           scripts/ablation.sh makes, made here if missing). The yardstick.
# - $ROOT/lora_specialists: the same data and reference; LoRA specialists (specialists.lora, r = 8 on
#                           the attention projections, lr 1e-2), their scores, full-weight AMA-S.
# - $ROOT/lora_generalist:  the main run's specialists and scores; a LoRA AMA-S generalist
#                           (generalist.lora, same LoRA, lr 1e-2).
# AMA-S seeds 0-2 in both; each is evaluated against the main run's full-weight specialists on
# the same test examples ($ROOT/<run>_eval), then compared with the main run's AMA-S and balanced.
set -euo pipefail

ROOT=$(realpath -m "${ROOT:-./runs/ablation}")
AMA=${AMA:-ama-ray}
SEEDS="[0,1,2]"
LORA="{enabled: true, r: 8}"
COMMON=(--config jobs/imbalance.yaml "storage.path=$ROOT" "merging.methods=[]")
MAIN=$ROOT/imbalance

source "$(dirname "$0")/study_lib.sh"  # copy_units

echo "== the main run (full weights everywhere): $MAIN =="
$AMA run --config jobs/imbalance.yaml "storage.path=$ROOT" storage.run_name=imbalance "generalist.seeds=[0,1,2,3,4]" \
  "generalist.algorithms=[proportional,balanced,ama_s]" "merging.methods=[average,task_arithmetic,ties]"

echo "== LoRA specialists, full-weight generalist =="
copy_units "$MAIN" "$ROOT/lora_specialists" prepared reference
$AMA run "${COMMON[@]}" storage.run_name=lora_specialists "generalist.seeds=$SEEDS" "generalist.algorithms=[ama_s]" \
  "specialists.lora=$LORA" specialists.optim.lr=1.0e-2

echo "== full-weight specialists, LoRA generalist =="
copy_units "$MAIN" "$ROOT/lora_generalist" prepared reference specialists scores
$AMA run "${COMMON[@]}" storage.run_name=lora_generalist "generalist.seeds=$SEEDS" "generalist.algorithms=[ama_s]" \
  "generalist.lora=$LORA" generalist.optim.lr=1.0e-2

for run in lora_specialists lora_generalist; do
  eval_dir=$ROOT/${run}_eval
  copy_units "$MAIN" "$eval_dir" prepared reference specialists scores
  mkdir -p "$eval_dir/generalist"
  [[ -d $eval_dir/generalist/ama_s ]] || cp -r "$ROOT/$run/generalist/ama_s" "$eval_dir/generalist/"
  $AMA evaluate "${COMMON[@]}" "storage.run_name=${run}_eval" "generalist.seeds=$SEEDS" "generalist.algorithms=[ama_s]"
done

$AMA compare "$MAIN=full" "$ROOT/lora_specialists_eval=lora_spec" "$ROOT/lora_generalist_eval=lora_gen" \
  --paired "lora_spec ama_s" "full ama_s"
$AMA compare "$MAIN=full" "$ROOT/lora_generalist_eval=lora_gen" --paired "lora_gen ama_s" "full ama_s"
$AMA compare "$MAIN=full" "$ROOT/lora_specialists_eval=lora_spec" --paired "lora_spec ama_s" "full balanced"

# The compute side, side by side (TIME=1): the specialists stage alone, 100 steps, full and LoRA
# alternating twice, on copies of the main run's prepared and reference units; wall time of
# each and every specialist's train/seconds_per_step and peak worker RSS from its manifest.
if [[ ${TIME:-0} == 1 ]]; then
  for arm in full lora full2 lora2; do
    dir=$ROOT/time_$arm
    rm -rf "$dir" && copy_units "$MAIN" "$dir" prepared reference
    extra=(); [[ $arm == lora* ]] && extra=("specialists.lora=$LORA" specialists.optim.lr=1.0e-2)
    start=$(date +%s)
    $AMA specialists "${COMMON[@]}" "storage.run_name=time_$arm" specialists.optim.steps=100 \
      specialists.optim.checkpoint_every=100 "${extra[@]}" > "$dir.log" 2>&1
    echo "$arm: specialists stage $(( $(date +%s) - start )) s"
    for manifest in "$dir"/specialists/*/_manifest.json; do
      ${PYTHON:-python} -c "import json,sys; m=json.load(open(sys.argv[1]))['final_metrics']; print('  ', sys.argv[1].split('/')[-2], round(m['train/seconds_per_step'], 3), 's/step', round(m['check/peak_rss_mb']), 'MB')" "$manifest"
    done
  done
fi
