#!/usr/bin/env bash
# AMA for supervised fine-tuning (docs/results.md "AMA for supervised fine-tuning"): the 10:1:1
# benchmark (jobs/imbalance.yaml) trained on the chosen responses' NLL (`dpo.objective: sft`):
# specialists, then proportional, balanced and AMA-S x 5 seeds. Resumable: rerun the same command.
#
#   bash scripts/sft_study.sh
#   ROOT=./runs/ablation AMA=ama-ray bash scripts/sft_study.sh
#   ama-ray compare $ROOT/imbalance_sft --paired "imbalance_sft ama_s" "imbalance_sft proportional"
set -euo pipefail

ROOT=$(realpath -m "${ROOT:-./runs/ablation}")
AMA=${AMA:-ama-ray}
$AMA run --config jobs/imbalance.yaml dpo.objective=sft "storage.path=$ROOT" storage.run_name=imbalance_sft \
  "generalist.seeds=[0,1,2,3,4]" "generalist.algorithms=[proportional,balanced,ama_s]" "merging.methods=[]"
