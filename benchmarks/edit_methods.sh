#!/usr/bin/env bash
# The edit-method figures of docs/science.md, on SmolLM2-135M on the CPU: layer sweeps (what
# configs/hparams/*/smollm2-135m.yaml were chosen from), efficacy and the field's metrics of
# ft, ft-l, rome, memit and alphaedit on the first 45 edits of the shared RippleEdits sample and
# of rome and memit on the next 45 (held back: not looked at while choosing), every predictor per
# method, and the reference check of ROME and MEMIT.
# Usage: benchmarks/edit_methods.sh [SHARED_DATA_DIR]   (default ../shared/data; about 2.5 hours on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/data}
gc=.venv/bin/gradcouple
out=runs/science/methods
start=$(date +%s)
mkdir -p "$out" data/science
$gc download rippleedits --from "$shared/rippleedits_compositional.sample.jsonl" --limit 45 --out data/science/rippleedits >/dev/null
sed -n '46,90p' "$shared/rippleedits_compositional.sample.jsonl" > data/science/rippleedits-heldback.jsonl
$gc download rippleedits --from data/science/rippleedits-heldback.jsonl --out data/science/rippleedits-heldback >/dev/null

# one extraction per edit set holds every block the methods edit (MEMIT's 4-8 hold ROME's and FT-L's);
# GradSim stays on the last four blocks
$gc run --data data/science/rippleedits/pieces.jsonl --method memit --n-edits 45 --out "$out/shared" --overwrite >/dev/null
$gc run --data data/science/rippleedits-heldback/pieces.jsonl --method memit --n-edits 45 --out "$out/heldback" --overwrite >/dev/null

# where to edit SmolLM2: the layer sweeps, and MEMIT's lambda
$gc ripple --run "$out/shared" --method rome --layer-sweep 2-6,8,12 --n-edits 8 >/dev/null
$gc ripple --run "$out/shared" --method memit --layer-sweep 1-4,6,10 --n-edits 8 >/dev/null
$gc ripple --run "$out/shared" --method memit --sweep mom2-update-weight=150,1500,15000 --n-edits 8 >/dev/null

for m in rome alphaedit ft-l ft; do
  $gc ripple --run "$out/shared" --method "$m" --n-edits 45 >/dev/null
done
$gc ripple --run "$out/heldback" --method rome --n-edits 45 >/dev/null

.venv/bin/python benchmarks/methods_table.py --out docs/science.md "$out/shared" "$out/heldback"
.venv/bin/python benchmarks/reference_check.py --pieces data/science/rippleedits/pieces.jsonl --n-edits 10 --out docs/science.md
echo "wall time: $(( $(date +%s) - start )) s" | tee "$out/wall.txt"
