#!/usr/bin/env bash
# AMA-S on tasks found by `data.partition` against AMA-S on the true tasks, at 10:1:1
# (docs/results.md "Tasks found by partitioning"). Resumable: rerun the same command.
#
#   bash scripts/partition_study.sh [embedding|tfidf] [raw_loss|warn]   # default embedding raw_loss
#   ROOT=./runs/ablation AMA=ama-ray PYTHON=python bash scripts/partition_study.sh
#
# - $ROOT/imbalance:           the true tasks (jobs/imbalance.yaml; the run scripts/ablation.sh makes,
#                              made here if missing): specialists, proportional, balanced, AMA-S x 5 seeds.
# - $ROOT/partition_<method>:  its train and validation rows pooled into one file (its test rows
#                              stay out), split into 3 tasks by data.partition, then the whole
#                              pipeline on the found tasks: their own specialists, AMA-S x 5 seeds.
#                              Validation is sized as in the true run; the found tasks keep a token
#                              test split (data.test_fraction=0.01, >= 20 rows), so they train on
#                              about as many rows as the true tasks.
#   With `warn` (specialists.on_weak=warn: a weak specialist stays the target), the found-task
#   run's partition, prepared data, specialists and scores are reused in $ROOT/partition_<method>_warn
#   (on_weak is in no hash): only the generalists differ.
# - $ROOT/<found run>_eval:    the true run's units with the found-task generalists: every
#                              number is on the true tasks' test split against the true specialists.
set -euo pipefail

METHOD=${1:-embedding}
ON_WEAK=${2:-raw_loss}
case "$METHOD/$ON_WEAK" in
  embedding/raw_loss|embedding/warn|tfidf/raw_loss|tfidf/warn) ;;
  *) echo "unknown method or on_weak '$METHOD $ON_WEAK' (embedding|tfidf, raw_loss|warn)" >&2; exit 2 ;;
esac
ROOT=$(realpath -m "${ROOT:-./runs/ablation}")
AMA=${AMA:-ama-ray}
PYTHON=${PYTHON:-python}
SEEDS="[0,1,2,3,4]"
COMMON=(--config jobs/imbalance.yaml "storage.path=$ROOT" "generalist.seeds=$SEEDS")
MAIN=$ROOT/imbalance
RUN=partition_$METHOD
MIXED=$ROOT/$RUN.mixed.jsonl
source "$(dirname "$0")/study_lib.sh"  # copy_units

echo "== the true tasks: $MAIN =="
$AMA run "${COMMON[@]}" storage.run_name=imbalance "generalist.algorithms=[proportional,balanced,ama_s]" \
  "merging.methods=[average,task_arithmetic,ties]"

[[ -f $MIXED ]] || $PYTHON scripts/partition_study.py mixture "$MAIN" "$MIXED"

FOUND=(data.tasks=null
  "data.partition={sources: [{name: mixed, path: $MIXED}], k: 3, method: $METHOD, label_field: task}"
  data.test_fraction=0.01 data.min_heldout_examples=20)
echo "== found tasks ($METHOD): $ROOT/$RUN =="
$AMA run "${COMMON[@]}" "storage.run_name=$RUN" "generalist.algorithms=[ama_s]" "merging.methods=[]" "${FOUND[@]}"
if [[ $ON_WEAK == warn ]]; then
  copy_units "$ROOT/$RUN" "$ROOT/${RUN}_warn" partition prepared reference specialists scores
  RUN=${RUN}_warn
  echo "== found tasks ($METHOD), a weak specialist kept as the target: $ROOT/$RUN =="
  $AMA run "${COMMON[@]}" "storage.run_name=$RUN" "generalist.algorithms=[ama_s]" "merging.methods=[]" "${FOUND[@]}" \
    specialists.on_weak=warn
fi

echo "== the found-task generalists on the true tasks =="
EVAL=$ROOT/${RUN}_eval
copy_units "$MAIN" "$EVAL" prepared reference specialists scores
mkdir -p "$EVAL/generalist"
[[ -d $EVAL/generalist/ama_s ]] || cp -r "$ROOT/$RUN/generalist/ama_s" "$EVAL/generalist/"
$AMA evaluate "${COMMON[@]}" "storage.run_name=${RUN}_eval" "generalist.algorithms=[ama_s]" "merging.methods=[]"

$AMA compare "$MAIN=true" "$EVAL=found" --paired "found ama_s" "true ama_s"
$AMA compare "$MAIN=true" "$EVAL=found" --paired "found ama_s" "true balanced"
