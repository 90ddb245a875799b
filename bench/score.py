"""Scoring throughput: the CLIP scorer alone, `tapir score` end to end, and a naive loop.

On the same pre-written shards (img2dataset's webdataset layout, synthetic scenes at
256 px), in one run:
  (a) the CLIP scorer alone on pre-decoded batches (the model's ceiling here),
  (b) `tapir score` end to end with only the CLIP scorer: Ray start, actors loading the
      model, tar reading, decoding, preprocessing, scoring, atomic parquet writes, dedup,
  (c) a naive loop: PIL decode and score one image at a time.
Prints images/s and the ratios (goals: b/a >= 0.85, b well ahead of c). Random weights
of a real architecture (default ViT-B-32) are fine for speed. Not a test.

    python bench/score.py --images 1024 --model ViT-B-32
"""

from __future__ import annotations

import argparse
import io
import shutil
import time
from pathlib import Path

from _common import guarded_workdir, violations, write_shards  # bench/ is sys.path[0] for a script


def bench_scorer(items, model, batch) -> float:
    from PIL import Image

    from filters.clip import ClipScorer

    scorer = ClipScorer(model, None, "cpu")
    scorer.setup()
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b, _ in items]  # pre-decoded
    captions = [c for _, c in items]
    scorer({"image": images[:batch], "caption": captions[:batch]})  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        scorer({"image": images[i:i + batch], "caption": captions[i:i + batch]})
    return len(images) / (time.perf_counter() - start)


def bench_naive(items, model, limit) -> float:
    import torch
    from PIL import Image

    from filters.clip import load_clip

    net, preprocess, tokenizer = load_clip(model)
    start = time.perf_counter()
    for data, caption in items[:limit]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        with torch.no_grad():
            img = torch.nn.functional.normalize(net.encode_image(preprocess(image)[None]), dim=-1)
            txt = torch.nn.functional.normalize(net.encode_text(tokenizer([caption])), dim=-1)
        float((img * txt).sum())
    return limit / (time.perf_counter() - start)


def bench_tapir(raw: Path, out: Path, n: int, model: str, batch: int) -> float:
    from pipeline import ray_backend
    from pipeline.config import load_config
    from pipeline.score import score

    cfg = load_config(None, [f"output={out}", f"input.path={raw}", f"score.input={raw}", "score.scorers=[clip]",
                             f"score.clip.model={model}", "score.clip.pretrained=null", f"score.batch_size={batch}",
                             "score.dedup.near=false", "resources.num_cpus=2"])
    start = time.perf_counter()
    funnel = score(cfg)
    elapsed = time.perf_counter() - start
    ray_backend.shutdown()
    assert funnel["scored"] == n, funnel
    return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--per-shard", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--naive", type=int, default=128, help="images for the naive loop (it is slow)")
    args = p.parse_args()

    work = guarded_workdir("tapir-bench-score-")
    items = write_shards(work / "raw", args.images, args.per_shard)
    a = bench_scorer(items, args.model, args.batch)
    b = bench_tapir(work / "raw", work / "run", args.images, args.model, args.batch)
    c = bench_naive(items, args.model, args.naive)
    import torch

    print(f"\n{args.model} (random weights), {args.images} images at 256 px in {args.images // args.per_shard} "
          f"shards, batch {args.batch}, CPU threads {torch.get_num_threads()}")
    print(f"  (a) CLIP scorer alone, pre-decoded batches : {a:7.1f} img/s")
    print(f"  (b) tapir score end to end                 : {b:7.1f} img/s")
    print(f"  (c) naive loop, PIL + one image at a time  : {c:7.1f} img/s  ({args.naive} images)")
    print(f"  ratio b/a = {b / a:.3f}  (goal >= 0.85)    ratio b/c = {b / c:.2f}")
    print(f"  non-loopback connection attempts refused by the guard: {violations(work)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
