#!/usr/bin/env bash
# GPU benchmark of gradcouple extract (factors store) against the forward-only floor, offline.
#
#   benchmarks/gpu.sh            # Llama-2-7B config (random bf16 weights) + GPT-2 small config
#   benchmarks/gpu.sh --tiny     # tiny configs of both architectures; runs on CPU, proves the code path
#   benchmarks/gpu.sh --json out.json --pieces 256
#
# Needs: a CUDA build of torch, transformers, tokenizers and gradcouple's dependencies
# (pydantic, rich, pyyaml, psutil). gradcouple itself is imported from src/ if not installed.
# No network: models are built from configs, pieces are random token ids. Capped at 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
exec timeout --signal=INT --kill-after=20 470 "$PY" benchmarks/gpu_bench.py "$@"
