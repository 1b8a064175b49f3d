#!/bin/bash
# The pipeline of slurm/pipeline.example.yaml (ADM-G 128x128, a sweep of guidance scales) as plain
# sbatch jobs of stage.sbatch chained with afterok dependencies: what `adm pipeline` does.
#
#   IMAGENET=/data/ILSVRC2012_img_train.tar IMAGENET_VAL=/data/ILSVRC2012_img_val \
#   VAL_LABELS=/data/LOC_val_solution.csv INCEPTION=/models/pt_inception-2015-12-05-6726825d.pth \
#   OUT=runs/adm128-guided slurm/templates/pipeline.sh
#
# Extra sbatch options for every job (partition, account...) go in SBATCH_OPTS. A failed stage
# cancels the stages after it (--kill-on-invalid-dep). Rerunning continues where the stages stopped.
set -euo pipefail
: "${IMAGENET:?set IMAGENET to ILSVRC2012_img_train.tar or a folder of class folders}"
: "${IMAGENET_VAL:?set IMAGENET_VAL to the validation images}"
: "${VAL_LABELS:?set VAL_LABELS to LOC_val_solution.csv}"
: "${INCEPTION:?set INCEPTION to pt_inception-2015-12-05-6726825d.pth}"
OUT=${OUT:-runs/adm128-guided}
SCALES=${SCALES:-"0.0 0.5 1.0 2.0 4.0"}
N=${N:-50000}
STAGE=${STAGE_SCRIPT:-$(dirname "$0")/stage.sbatch}
mkdir -p "$OUT/logs"

# submit NAME AFTER(job ids, comma-separated or empty) SBATCH-OPTIONS... -- STAGE ARGS...; prints the job id.
submit() {
  local name=$1 after=$2; shift 2
  local opts=(--parsable --job-name="adm128.$name" --output="$OUT/logs/$name-%j.out" --kill-on-invalid-dep=yes)
  [ -n "$after" ] && opts+=(--dependency="afterok:${after//,/:}")
  while [ "$1" != "--" ]; do opts+=("$1"); shift; done
  shift
  # shellcheck disable=SC2086  # SBATCH_OPTS is a list of options on purpose
  sbatch ${SBATCH_OPTS:-} "${opts[@]}" "$STAGE" "$@"
}

# CPU-only stages: no GPU, so one process (stage.sbatch starts one per GPU).
CPU=(--gpus-per-node=0 --cpus-per-task=32)
prepare=$(submit prepare "" "${CPU[@]}" --time=12:00:00 -- \
  prepare-imagenet "$IMAGENET" "$OUT/shards/train" --resize-short-side 128 --workers 32)
prepare_val=$(submit prepare_val "" "${CPU[@]}" --time=2:00:00 -- \
  prepare-imagenet "$IMAGENET_VAL" "$OUT/shards/val" --split val --val-labels "$VAL_LABELS" --resize-short-side 128 --workers 32)
reference=$(submit reference "$prepare" --time=4:00:00 -- \
  make-reference "$OUT/shards/train" --size 128 --num-images 10000 --inception-weights "$INCEPTION" \
  --out "$OUT/reference/imagenet128.npz")
train=$(submit train "$prepare" --nodes=4 -- \
  train --run-dir "$OUT/adm128" --preset adm128 --data "$OUT/shards/train" --precision bf16)
classifier=$(submit train_classifier "$prepare,$prepare_val" -- \
  train-classifier --run-dir "$OUT/adm128-classifier" --preset adm128-classifier --data "$OUT/shards/train" \
  --val-data "$OUT/shards/val" --precision bf16)
evaluations=""
for scale in $SCALES; do
  sample=$(submit "sample.scale-$scale" "$train,$classifier" --time=12:00:00 -- \
    sample --model "$OUT/adm128" --classifier "$OUT/adm128-classifier" --classifier-scale "$scale" \
    --num-samples "$N" --steps 250 --batch-size 128 --seed 0 --out "$OUT/samples/scale-$scale")
  evaluation=$(submit "evaluate.scale-$scale" "$sample,$reference" --time=2:00:00 -- \
    evaluate "$OUT/reference/imagenet128.npz" "$OUT/samples/scale-$scale/samples_${N}x128x128x3.npz" \
    --inception-weights "$INCEPTION" --out "$OUT/eval/scale-$scale")
  evaluations=${evaluations:+$evaluations,}$evaluation
done
report=$(submit report "$evaluations" --gpus-per-node=0 --cpus-per-task=4 --time=0:30:00 -- \
  report "$OUT/eval" --out "$OUT/report" --title "ADM-G 128x128: guidance scale sweep")
echo "submitted: prepare $prepare, prepare_val $prepare_val, reference $reference, train $train," \
     "train_classifier $classifier, evaluations $evaluations, report $report; logs in $OUT/logs/"
