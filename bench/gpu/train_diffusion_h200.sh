#!/usr/bin/env bash
# The diffusion trainer's GPU check for a lent H200 (`device` tool), not yet run: DiT-B/2 and
# DiT-XL/2 at 256 px (32x32x4 latents of the SD VAE architecture, random weights), bf16,
# compiled, through bench/train_diffusion.py (the Trainer users run, the real shard loader),
# printing images/s and MFU (counted FLOPs / 989 TFLOP/s dense bf16). Shards are built
# in-process (the machine has no Ray). Carry wheels in .whl/ (torch is the machine's own):
#   pip download --no-deps -d .whl diffusers==0.42.1 pydantic==2.14.4 pydantic-core annotated-types \
#     typing-inspection webdataset==0.2.86 braceexpand transformers==5.24.0 tokenizers huggingface-hub \
#     safetensors==0.8.0 tensorboard==2.21.0 tensorboard-data-server protobuf absl-py markdown werkzeug
# (and whatever of pyarrow, pyyaml, pillow, tqdm, regex the machine lacks). Figures go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for spec in "B/2 256" "XL/2 128"; do
  set -- $spec
  python3 bench/train_diffusion.py --arch sd --resolution 256 --images 4096 --model "$1" --batch "$2" \
    --workers 8 --steps 30 --repeats 3 --device cuda --compile --inprocess 2>&1 | grep -v Warning | tee -a "$OUT/log.txt"
done
