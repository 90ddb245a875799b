#!/usr/bin/env bash
# The build-stage GPU check, run on a lent H200 by the `device` tool (see bench/results/):
# installs the carried wheels (.whl/: diffusers, pydantic; torch is the machine's own),
# then bench/build.py in-process (no Ray on that machine) for the SD VAE architecture
# (random weights) at 256 and 512 px in bf16. Figures go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
python3 bench/build.py --arch sd --resolution 256 --images 8192 --per-shard 1024 --batch 64 --inprocess --device cuda --json "$OUT/sd256.json" 2>&1 | grep -v Warning | tee "$OUT/log.txt"
python3 bench/build.py --arch sd --resolution 512 --images 2048 --per-shard 512 --batch 32 --inprocess --device cuda --json "$OUT/sd512.json" 2>&1 | grep -v Warning | tee -a "$OUT/log.txt"
# decode threads against the encoder's launch thread (GIL): the stage at 256 px with 1, 2, 4, 8 threads
python3 bench/build.py --arch sd --resolution 256 --images 8192 --per-shard 1024 --batch 64 --inprocess --device cuda --decode-threads 1,2,4,8 --json "$OUT/sd256_threads.json" 2>&1 | grep -v Warning | tee -a "$OUT/log.txt"
