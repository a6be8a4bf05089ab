#!/usr/bin/env bash
# The edit-method figures of docs/science.md ("Edit methods"), on the CPU. Three streams of one torch
# thread each share the two cores:
#   A. SmolLM2-135M on the first 45 edits of the shared RippleEdits sample: `run --method memit`
#      (extracting MEMIT's blocks beside the coupling blocks), then rome (45), alphaedit (12) and ft-l (12);
#   B. the ROME layer sweep of Gemma 3 270M (4 edits), each method on Gemma at its published
#      settings (3 edits) and ROME with C^-1 keys (mom2_adjustment) at two blocks, the ROME layer
#      sweep of SmolLM2 (4 edits), and memit (30) and rome (20) on
#      a held-back set (records 46-75, not looked at while choosing settings);
#   C. the reference check of ROME and MEMIT (6 edits), then on a copy of A's extraction AlphaEdit's
#      L2 sweep with its Llama3-8B value settings (6 edits), MEMIT's mom2_update_weight sweep (4 edits)
#      and AlphaEdit with MEMIT's value settings (6 edits), what the published SmolLM2 file was chosen from.
# Then the tables.
# Usage: benchmarks/edit_methods.sh [SHARED_DATA_DIR]   (default ../shared/data; about 2 h 15 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/data}
gc=.venv/bin/gradcouple
out=runs/science/methods
data=data/science
start=$(date +%s)
mkdir -p "$out" "$data"
rm -f "$out/.shared-extracted"
$gc download rippleedits --from "$shared/rippleedits_compositional.sample.jsonl" --limit 45 --out $data/rippleedits >/dev/null 2>&1
sed -n '46,75p' "$shared/rippleedits_compositional.sample.jsonl" > $data/rippleedits-heldback.jsonl
$gc download rippleedits --from $data/rippleedits-heldback.jsonl --out $data/rippleedits-heldback >/dev/null 2>&1

stream_a() {
  $gc run --data $data/rippleedits/pieces.jsonl --method memit --n-edits 45 --out "$out/shared" --overwrite
  touch "$out/.shared-extracted"
  $gc ripple --run "$out/shared" --method rome --n-edits 45
  $gc ripple --run "$out/shared" --method alphaedit --n-edits 12
  $gc ripple --run "$out/shared" --method ft-l --n-edits 12
}
stream_b() {
  $gc extract --data $data/rippleedits/pieces.jsonl --model gemma3-270m --out "$out/sweep-gemma3-270m" --overwrite
  $gc couple --run "$out/sweep-gemma3-270m"
  $gc ripple --run "$out/sweep-gemma3-270m" --method rome --layer-sweep 2,4,6,9,12 --n-edits 4
  $gc run --data $data/rippleedits/pieces.jsonl --model gemma3-270m --method memit --n-edits 3 --out "$out/gemma3-270m" --overwrite
  for m in rome alphaedit ft-l; do $gc ripple --run "$out/gemma3-270m" --method "$m" --n-edits 3; done
  $gc ripple --run "$out/gemma3-270m" --method rome --hparams benchmarks/hparams/rome-mom2-adjustment.yaml \
    --layer-sweep 2,6 --n-edits 4
  $gc extract --data $data/rippleedits/pieces.jsonl --out "$out/sweep-smollm2-135m" --overwrite
  $gc couple --run "$out/sweep-smollm2-135m"
  $gc ripple --run "$out/sweep-smollm2-135m" --method rome --layer-sweep 2,4,6,8,12 --n-edits 4
  $gc run --data $data/rippleedits-heldback/pieces.jsonl --method memit --n-edits 30 --out "$out/heldback" --overwrite
  $gc ripple --run "$out/heldback" --method rome --n-edits 20
}
stream_c() {
  .venv/bin/python benchmarks/reference_check.py --pieces $data/rippleedits/pieces.jsonl --n-edits 6 --out docs/science.md
  # sweeps on a copy of stream A's extraction (a run directory takes one writer at a time)
  until [ -e "$out/.shared-extracted" ]; do sleep 10; done
  rm -rf "$out/shared-sweeps" && mkdir -p "$out/shared-sweeps"
  cp -r "$out/shared/"{config.json,pieces.jsonl,gradients,coupling} "$out/shared-sweeps/"
  $gc ripple --run "$out/shared-sweeps" --method alphaedit --hparams benchmarks/hparams/alphaedit-llama3-values.yaml \
    --sweep L2=1,10 --n-edits 6
  $gc ripple --run "$out/shared-sweeps" --method memit --sweep mom2-update-weight=150,1500,15000 --n-edits 4
  $gc ripple --run "$out/shared-sweeps" --method alphaedit --hparams benchmarks/hparams/alphaedit-memit-values.yaml --n-edits 6
}
export OMP_NUM_THREADS=1
stream_a > "$out/stream-a.log" 2>&1 &
a=$!
stream_b > "$out/stream-b.log" 2>&1 &
b=$!
stream_c > "$out/stream-c.log" 2>&1 &
c=$!
wait $a || { echo "stream A failed: see $out/stream-a.log" >&2; exit 1; }
wait $b || { echo "stream B failed: see $out/stream-b.log" >&2; exit 1; }
wait $c || { echo "stream C failed: see $out/stream-c.log" >&2; exit 1; }
.venv/bin/python benchmarks/methods_table.py --out docs/science.md "$out/shared" "$out/heldback" \
  "$out/sweep-smollm2-135m" "$out/sweep-gemma3-270m" "$out/gemma3-270m" "$out/shared-sweeps"
echo "wall time: $(( $(date +%s) - start )) s" | tee "$out/wall.txt"
