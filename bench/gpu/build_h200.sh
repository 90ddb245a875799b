#!/usr/bin/env bash
# The build stage on a lent GPU (`device` tool). NOT RUN YET with this code: bench/build.py runs the shipped
# pipeline.build.BuildShard (the class `tapir build`'s actors run: raw tar reading, JPEG decode and crop on
# its decode threads, the encoder, npy and tar writing, checksums, the commit) in a process of its own
# against the bare AutoencoderKL forward on pre-decoded batches, same process, threads, batch and images,
# 5 repeats in alternating order, each arm's median images/s and spread, the median per-repeat ratio.
# No Ray is needed (the class runs without it; Ray is not installed on that machine). SD VAE architecture
# (random weights), bf16 autocast as the stage runs on a GPU, eager, no cudnn.benchmark in either arm.
# Carry wheels in .whl/ (torch is the machine's own):
#   pip download --no-deps -d .whl diffusers==0.42.1 pydantic==2.14.4 pydantic-core annotated-types \
#     typing-inspection safetensors==0.8.0 huggingface-hub
# and whatever of pyarrow, pyyaml, pillow, numpy, tqdm, filelock, regex, requests the import check below
# names as missing. Each resolution is one python run of about 3 minutes; `bash bench/gpu/build_h200.sh 256`
# runs one, no argument runs both. Figures (markdown table, every run in JSON) go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 - <<'EOF' | tee -a "$OUT/gpu.txt" || exit 1
import importlib, sys
missing = []
for name in ("torch", "diffusers", "pydantic", "yaml", "pyarrow", "PIL", "numpy", "tqdm", "safetensors",
             "pipeline.build", "pipeline.encoders", "pipeline.manifest", "pipeline.synthweb"):
    try:
        importlib.import_module(name)
    except ImportError as e:
        missing.append(f"{name} ({e})")
if missing:
    sys.exit("missing, carry their wheels: " + "; ".join(missing))
import torch, diffusers
print("torch", torch.__version__, "diffusers", diffusers.__version__, "cuda", torch.cuda.is_available())
EOF
# resolution -> images, images per shard, batch
declare -A IMAGES=([256]=4096 [512]=1024) SHARD=([256]=512 [512]=256) BATCH=([256]=64 [512]=32)
RES=("$@"); [ ${#RES[@]} -gt 0 ] || RES=(256 512)
for res in "${RES[@]}"; do
  python3 bench/build.py --arch sd --resolution "$res" --images "${IMAGES[$res]}" --per-shard "${SHARD[$res]}" \
    --batch "${BATCH[$res]}" --device cuda --procs 1 --threads 8 --repeats 5 --json "$OUT/sd$res.json" 2>&1 \
    | grep -v Warning | tee -a "$OUT/log.txt"
done
