#!/usr/bin/env bash
# The ripple science run of docs/science.md: 45 RippleEdits edits and 20 MQuAKE-hard cases from
# the shared samples, with ft and rome, every predictor, on the default model (CPU is enough).
# Usage: benchmarks/ripple_science.sh [SHARED_DATA_DIR]   (default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/data}
gc=.venv/bin/gradcouple
start=$(date +%s)
$gc download rippleedits --from "$shared/rippleedits_compositional.sample.jsonl" --limit 45 --out data/science/rippleedits >/dev/null
$gc download mquake-hard --from "$shared/mquake_hard.sample.jsonl" --limit 20 --out data/science/mquake >/dev/null
for m in ft rome; do
  $gc run --data data/science/rippleedits/pieces.jsonl --method "$m" --n-edits 45 --out "runs/science/rippleedits-$m" --overwrite >/dev/null
  $gc run --data data/science/mquake/pieces.jsonl --method "$m" --n-edits 20 --out "runs/science/mquake-$m" --overwrite >/dev/null
done
.venv/bin/python benchmarks/ripple_table.py runs/science/rippleedits-ft runs/science/rippleedits-rome \
  runs/science/mquake-ft runs/science/mquake-rome > runs/science/table.md
echo "wall time: $(( $(date +%s) - start )) s" | tee runs/science/wall.txt
