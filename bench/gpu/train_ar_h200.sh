#!/usr/bin/env bash
# The AR trainer's GPU check for a lent H200 (`device` tool). NOT RUN YET: no GPU was lent to the
# session that wrote it, so there are no H200 figures for it anywhere in bench/results/.
#
# Through bench/train_ar.py (the ARTrainer users run; the real shard loader against in-memory
# batches; KV-cached against uncached sampling): LlamaGen-L (~300M: 24 layers, width 1024) on
# 16x16 and 32x32 token grids (a random-weight VQModel with 16x downsampling, so 256 and 512 px
# images in the shards, LlamaGen's 16384 codes), pre-computed text embeddings as wide and long as
# LlamaGen's FLAN-T5-XL ones (2048 x 120, a one-layer random T5), bf16, torch.compile, 8 loader
# workers. Prints image tokens/s, MFU (counted FLOPs / 989 TFLOP/s dense bf16), sampling images/s
# and the ratios. Shards are built in-process (the machine has no Ray); each grid is one python run
# of a few minutes (build, compile, 3 x 2 timed arms, sampling), so pass one grid per `run` call to
# stay inside the 10-minute limit of a command: `bash bench/gpu/train_ar_h200.sh 16`, then `... 32`.
# Carry wheels in .whl/ (torch is the machine's own):
#   pip download --no-deps -d .whl diffusers==0.42.1 pydantic==2.14.4 pydantic-core annotated-types \
#     typing-inspection webdataset==0.2.86 braceexpand transformers==5.24.0 tokenizers huggingface-hub \
#     safetensors==0.8.0 tensorboard==2.21.0 tensorboard-data-server protobuf absl-py markdown werkzeug
# (and whatever of pyarrow, pyyaml, pillow, tqdm, regex the machine lacks). Figures go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
# grid, images built, training batch (about 32k image tokens per step either way), prompts per sampling call
declare -A IMAGES=([16]=2048 [32]=1024) BATCH=([16]=128 [32]=32) PROMPTS=([16]=8 [32]=4)
for grid in "${@:-16 32}"; do
  for g in $grid; do
    python3 bench/train_ar.py --inprocess --model L --grid "$g" --vq-factor 16 --codebook 16384 \
      --text-dim 2048 --text-len 120 --images "${IMAGES[$g]}" --batch "${BATCH[$g]}" --workers 8 \
      --steps 30 --repeats 3 --device cuda --precision bf16 --compile --sample-batch "${PROMPTS[$g]}" \
      --sample-repeats 3 2>&1 | grep -v Warning | tee -a "$OUT/log-grid$g.txt"
  done
done
