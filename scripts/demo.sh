#!/usr/bin/env bash
# The product's main job on the embedded default, then where its model comes from:
#   1. the scanner emulator writes a DICOM study from a synthetic crop (hippo.data.synthetic);
#   2. the shipped model (trained on real MR crops) measures it; the synthetic images do not look
#      like MR to it, so its honest answer is "review" with the reason;
#   3. a short training run on the synthetic data set (20 of its 40 cases, 8 epochs of a small UNet:
#      12 filters, 64 x 48 slices, batches of 16) exports a model;
#   4. that model measures the same study: the volumes, the report (SC PNG) and result.json.
# No shared data, no network services. Outputs under outputs/demo/ (replaced on each run).
# About 1 min on 2 idle cores, 2.8 min with another training run on them.
# Usage: scripts/demo.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=outputs/demo
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1. a DICOM study from the scanner emulator (synthetic case, seed 7: not a training case)"
"$PY" -m hippo.data.synthetic --out "$OUT/study_source" --n-cases 1 --seed 7
"$PY" -m hippo.scanner write --nifti "$OUT/study_source/imagesTr/hippocampus_001.nii.gz" \
    --label "$OUT/study_source/labelsTr/hippocampus_001.nii.gz" --out "$OUT/study" --seed 7

echo "== 2. the shipped model on it (expect review: it was trained on real MR, these are synthetic)"
"$PY" -m hippo.deploy study="$OUT/study" send=false results_dir="$OUT/shipped" \
    hydra.run.dir="$OUT/shipped" 2>/dev/null || true

echo "== 3. a short training run on the synthetic data set"
"$PY" -m hippo.train trainer.max_epochs=8 model.net.initial_filters=12 model.largest_component=true \
    data.max_cases=20 data.batch_size=16 "data.patch_size=[64,48]" \
    test=false val_volumes=false callbacks.rich_progress_bar=null trainer.enable_progress_bar=false \
    hydra.run.dir="$OUT/train" 2>&1 | grep -E "exported model file|Error|error" || true
test -f "$OUT/train/model.pt"

echo "== 4. the just-trained model on the same study"
"$PY" -m hippo.deploy study="$OUT/study" send=false model_path="$OUT/train/model.pt" \
    results_dir="$OUT/trained" hydra.run.dir="$OUT/trained" 2>/dev/null
echo "report (SC PNG):  $(ls "$OUT"/trained/*/report.png)"
echo "result.json:      $(ls "$OUT"/trained/*/result.json)"
