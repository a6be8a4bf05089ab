#!/usr/bin/env bash
# The science campaign of docs/science.md ("At scale"), one command, on SmolLM2-135M:
#   data: every record of the shared RippleEdits sample (175) and of the MQuAKE-hard sample (40 cases);
#   ft (the last four blocks, GradSim's layers) on every edit of both, and its learning-rate sweep (--sweep)
#   on the first 40 RippleEdits edits; the ported methods (ft-l, memit, alphaedit, rome, on an extraction of
#   their blocks 4-8 beside the coupling blocks 26-29) on the first $N_PORTED RippleEdits edits (default 10)
#   and the first $N_PORTED_MQUAKE MQuAKE cases (default 3; a case is about four rewrites): they cost
#   4-11 s each per RippleEdits edit on 2 cores (29 s for the four), so N_PORTED=1000 adds about 80 min and
#   N_PORTED_MQUAKE=1000 about 50 min on a CPU;
#   every predictor; the report (with the sweep figure) and the tables.
# Usage: benchmarks/science_campaign.sh [SHARED_DATA_DIR]     (default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/data}
n_ported=${N_PORTED:-10}
n_ported_mquake=${N_PORTED_MQUAKE:-3}
gc=.venv/bin/gradcouple
out=runs/science/campaign
data=data/science/campaign
start=$(date +%s)
mkdir -p "$out" "$data"
$gc download rippleedits --from "$shared/rippleedits_compositional.sample.jsonl" --out $data/rippleedits >/dev/null
$gc download mquake-hard --from "$shared/mquake_hard.sample.jsonl" --out $data/mquake >/dev/null
for ds in rippleedits mquake; do
  n=$n_ported; [ $ds = mquake ] && n=$n_ported_mquake
  $gc extract --data $data/$ds/pieces.jsonl --layers last4 --out "$out/$ds-ft" --overwrite
  $gc couple --run "$out/$ds-ft"
  $gc ripple --run "$out/$ds-ft" --method ft --n-edits 1000
  $gc extract --data $data/$ds/pieces.jsonl --layers 4-8,26-29 --out "$out/$ds-ported" --overwrite
  $gc couple --run "$out/$ds-ported" --couple-layers 26-29
  for m in ft-l memit alphaedit rome; do $gc ripple --run "$out/$ds-ported" --method $m --n-edits "$n"; done
done
$gc ripple --run "$out/rippleedits-ft" --method ft --sweep lr=1e-4,5e-4,2e-3 --n-edits 40
$gc report --run "$out/rippleedits-ft" >/dev/null
wall=$(( $(date +%s) - start ))
.venv/bin/python benchmarks/campaign_table.py --out docs/science.md --wall "$wall" --n-ported "$n_ported/$n_ported_mquake" \
  "$out/rippleedits-ft" "$out/rippleedits-ported" "$out/mquake-ft" "$out/mquake-ported"
echo "wall time: $wall s" | tee "$out/wall.txt"
