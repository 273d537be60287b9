#!/usr/bin/env bash
# The GPU benchmarks in one command, on a CUDA device; every run appends its markdown block to benchmarks/RESULTS.md:
# 1. bench_gpu.py: training images/s, peak memory and MFU of hfgen vs diffusers at matched configs (U-Net, DiT-B/2 and
#    DiT-XL/2 on 4x32x32 latents, RIN), bf16 autocast, eager and torch.compile'd;
# 2. bench_speed.py: training and sampling steps with bfloat16 weights, top ops, eager and compiled in one run;
# 3. bench_scheduler.py: scheduler step() overhead in bfloat16 and float32.
#
#   bash benchmarks/gpu.sh                                   # on a machine with a CUDA GPU
#   TRAIN_BATCH=128 BATCH=128 SIZE=base bash benchmarks/gpu.sh
#   DRY_RUN=1 RESULTS=/tmp/dry.md bash benchmarks/gpu.sh     # CPU, tiny models (tests/test_gpu_script.py)
#
# DRY_RUN=1 skips the CUDA check and runs step 1 on the CPU with --dry_run and the compile backend "eager" (TorchDynamo's
# graph capture, run without code generation: inductor's C++ code generation takes about 90 s per tiny model on a 2-core
# CPU, aot_eager doubles the dry run's time), writing to RESULTS (default: a new temporary file). Steps 2 and 3 are
# skipped there: their --quick modes are tests/test_benchmarks_quick.py. RESULTS and PY are paths from benchmarks/ or
# absolute.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
TRAIN_BATCH=${TRAIN_BATCH:-256}
BATCH=${BATCH:-64}
SIZE=${SIZE:-base}
export HF_HUB_OFFLINE=1

if [[ ${DRY_RUN:-0} == 1 ]]; then
    RESULTS=${RESULTS:-$(mktemp -t gpu_dry_run.XXXXXX.md)}
    echo -e "\n## GPU script dry run ($(date -u '+%Y-%m-%d %H:%M UTC'), CPU)" >> "$RESULTS"
    "$PY" bench_gpu.py --device cpu --dry_run --compile_backend eager --results "$RESULTS"
    echo "dry run: bench_speed.py and bench_scheduler.py skipped; results in $RESULTS"
    exit 0
fi

RESULTS=${RESULTS:-RESULTS.md}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh needs a CUDA device: torch.cuda.is_available() is False')"
echo -e "\n## GPU run ($(date -u '+%Y-%m-%d %H:%M UTC'), $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'))" >> "$RESULTS"

"$PY" bench_gpu.py --device cuda --autocast bfloat16 --batch_size "$TRAIN_BATCH" --results "$RESULTS"

common=(--device cuda --dtype bfloat16 --size "$SIZE" --batch_size "$BATCH" --repeats 20 --matmul_size 8192 --threads 4 --results "$RESULTS")
"$PY" bench_speed.py "${common[@]}" --profile  # eager and compiled variants side by side in one run
"$PY" bench_scheduler.py --device cuda --dtype bfloat16 --repeats 30 --threads 4 --results "$RESULTS"
"$PY" bench_scheduler.py --device cuda --dtype float32 --repeats 30 --threads 4 --results "$RESULTS"
