#!/usr/bin/env bash
# The forecast figures of docs/science.md ("Forecast"), one command, on SmolLM2-135M:
#   run: the first 30 bundled RippleEdits records and the bundled MuSiQue sample (gradcouple run, no ripple);
#   edits: the other 30 RippleEdits records as an EasyEdit / KnowEdit file and as a CounterFact file
#   (benchmarks/forecast_files.py); each forecast with --verify 10 (the run's method, ft); then ROME (its published
#   block 4 for this model, extracted beside 26-29 in a second run directory) on the first 10 CounterFact edits;
#   then the table.
# Usage: benchmarks/forecast_science.sh
set -euo pipefail
cd "$(dirname "$0")/.."
gc=.venv/bin/gradcouple
out=runs/science/forecast
start=$(date +%s)
$gc run --datasets rippleedits:30,musique --no-ripple --out $out --overwrite >/dev/null
.venv/bin/python benchmarks/forecast_files.py --skip 30 --out $out/edits >/dev/null
for f in knowedit counterfact; do
  $gc forecast --run $out --edits $out/edits/$f.json --verify 10 > /dev/null
  mkdir -p $out/results/$f && cp $out/forecast/summary.json $out/forecast/forecast.jsonl $out/results/$f/
done
$gc extract --data $out/pieces.jsonl --layers 4,26-29 --out $out-rome --overwrite >/dev/null
.venv/bin/python benchmarks/forecast_files.py --skip 30 --limit 10 --out $out/edits10 >/dev/null
$gc forecast --run $out-rome --edits $out/edits10/counterfact.json --method rome --verify 10 > /dev/null
mkdir -p $out/results/counterfact-rome && cp $out-rome/forecast/summary.json $out-rome/forecast/forecast.jsonl $out/results/counterfact-rome/
wall=$(( $(date +%s) - start ))
.venv/bin/python benchmarks/forecast_table.py --out docs/science.md --wall "$wall" $out/results/knowedit $out/results/counterfact \
  $out/results/counterfact-rome
echo "wall time: $wall s"
