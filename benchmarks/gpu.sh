#!/usr/bin/env bash
# Benchmarks 1 (denoiser speed) and 2 (scheduler overhead) on a CUDA device in bfloat16, eager and torch.compile'd,
# for hfgen and diffusers; every run appends its markdown block to benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu.sh                 # from the repository root, on a machine with a CUDA GPU
#   BATCH=128 SIZE=base bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
RESULTS=${RESULTS:-RESULTS.md}
BATCH=${BATCH:-64}
SIZE=${SIZE:-base}
export HF_HUB_OFFLINE=1

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh needs a CUDA device: torch.cuda.is_available() is False')"
echo -e "\n## GPU run ($(date -u '+%Y-%m-%d %H:%M UTC'), $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'))" >> "$RESULTS"

common=(--device cuda --dtype bfloat16 --size "$SIZE" --batch_size "$BATCH" --repeats 20 --matmul_size 8192 --threads 4 --results "$RESULTS")
"$PY" bench_speed.py "${common[@]}" --profile
"$PY" bench_speed.py "${common[@]}" --compile
"$PY" bench_scheduler.py --device cuda --dtype bfloat16 --repeats 30 --threads 4 --results "$RESULTS"
"$PY" bench_scheduler.py --device cuda --dtype float32 --repeats 30 --threads 4 --results "$RESULTS"
