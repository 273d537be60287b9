#!/usr/bin/env bash
# train_diffusion.py under FSDP (FULL_SHARD) on the GPUs of this machine, then the saved pipeline is loaded and
# sampled. Accelerate 1.15 refuses FSDP without an accelerator ("There are currently no available devices found,
# must be one of 'XPU', 'CUDA', ...", accelerate/utils/dataclasses.py), so the CPU test suite cannot run this.
#
#   bash benchmarks/fsdp_gpu.sh            # from the repository root; NPROC defaults to the number of GPUs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/hfgen-fsdp}
NPROC=${NPROC:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}
export HF_HUB_OFFLINE=1
[ "$NPROC" -ge 1 ] || { echo "fsdp_gpu.sh needs a CUDA device"; exit 1; }
rm -rf "$OUT"
"$PY" -m accelerate.commands.launch --use_fsdp --num_processes "$NPROC" --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no --fsdp_sharding_strategy FULL_SHARD --fsdp_state_dict_type FULL_STATE_DICT \
    training/train_diffusion.py --model unet --model_config unet-tiny --resolution 16 --shapes_num_images 64 \
    --train_batch_size 8 --max_train_steps 20 --checkpointing_steps 10 --num_inference_steps 4 \
    --num_validation_images 4 --report_to none --output_dir "$OUT"
"$PY" - "$OUT" <<'PYEOF'
import sys
import torch
from hfgen.pipelines import HFGenPipeline

pipe = HFGenPipeline.from_pretrained(sys.argv[1])
images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
assert torch.isfinite(images).all(), "non-finite samples"
print(f"FSDP pipeline loads and samples: {tuple(images.shape)}")
PYEOF
