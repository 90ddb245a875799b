"""Recaption throughput: bare batched `model.generate` versus `tapir recaption` end to end.

Same images (synthetic scenes, pre-written shards with every row selected), same model,
same batch size, greedy decoding, both caption kinds (descriptive and short: two
generate passes per image in both). The model is a BLIP of the real base size built
from its config with random weights (fine for speed: it always generates
``--new-tokens`` tokens); ``--tiny`` uses the tiny test model. Prints captions/s,
tokens/s and the ratio (goal >= 0.9). Not a test.

    python bench/recaption.py --images 64
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# this folder must not be on sys.path: bench/recaption.py would shadow the recaption package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
_spec = importlib.util.spec_from_file_location("tapir_bench_common", BENCH / "_common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
guarded_workdir = _common.guarded_workdir
violations = _common.violations
write_shards = _common.write_shards


def base_blip(folder: Path, tiny: bool) -> str:
    """BLIP at its base size (ViT-B/16 at 384 px, BERT-base decoder), random weights."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from recaption.tiny import save_tiny_blip

    path = save_tiny_blip(folder)  # the tokenizer and processor files
    if tiny:
        return path
    processor = BlipProcessor.from_pretrained(path)
    processor.image_processor = BlipImageProcessor(size={"height": 384, "width": 384})
    small = BlipConfig.from_pretrained(path)
    text = {k: getattr(small.text_config, k) for k in ("vocab_size", "bos_token_id", "pad_token_id",
                                                        "sep_token_id", "eos_token_id")}
    config = BlipConfig(vision_config={"image_size": 384, "patch_size": 16},
                        text_config={**text, "encoder_hidden_size": 768})
    model = BlipForConditionalGeneration(config)
    model.generation_config.pad_token_id = text["pad_token_id"]
    model.generation_config.eos_token_id = None  # random weights: always the full length
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return path


def write_run(out: Path, n: int, per_shard: int) -> list:
    import pyarrow as pa
    from PIL import Image

    from pipeline import shards

    items = write_shards(out / "raw", n, per_shard)
    for sid in sorted(shards.done_shards(out / "raw")):
        keys = [f"{sid:05d}{i:04d}" for i in range(min(per_shard, n - sid * per_shard))]
        staging = shards.new_staging(out / "selection", sid)
        shards.write_parquet(staging / f"{sid:05d}.parquet",
                             pa.table({"key": keys, "keep": [True] * len(keys), "reason": [None] * len(keys)}))
        shards.commit(staging, out / "selection", sid, [f"{sid:05d}.parquet"], {"count": len(keys),
                                                                                 "kept": len(keys)})
    return [Image.open(io.BytesIO(b)).convert("RGB") for b, _ in items]


def bench_bare(model: str, images, batch: int, new_tokens: int) -> tuple[float, float]:
    import torch

    from recaption.backends import TransformersCaptioner
    from recaption.prompts import load_prompt

    torch.set_num_threads(2)
    cap = TransformersCaptioner(model, device="cpu", max_new_tokens=new_tokens)
    cap.setup()
    prefixes = [load_prompt("descriptive-v1").prefix, load_prompt("short-v1").prefix]
    cap.generate(images[:2], ["x"] * 2, [prefixes[0]] * 2, {})  # warm-up
    start, tokens = time.perf_counter(), 0
    for prefix in prefixes:
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            tokens += sum(n for _, n, _ in cap.generate(chunk, ["x"] * len(chunk), [prefix] * len(chunk), {}))
    elapsed = time.perf_counter() - start
    return len(images) / elapsed, tokens / elapsed


def bench_tapir(out: Path, model: str, batch: int, new_tokens: int, n: int) -> tuple[float, float]:
    from pipeline import ray_backend
    from pipeline.config import load_config
    from pipeline.recaption import recaption

    cfg = load_config(None, [f"output={out}", f"input.path={out}", f"recaption.model={model}",
                             f"recaption.batch_size={batch}", f"recaption.max_new_tokens={new_tokens}",
                             "recaption.retry_sampling=[]", "recaption.min_words=1", "recaption.token_counter=words",
                             "recaption.actors=1", "resources.num_cpus=2", "resources.cpus_per_actor=2",
                             "recaption.device=cpu"])
    start = time.perf_counter()
    funnel = recaption(cfg)
    elapsed = time.perf_counter() - start
    ray_backend.shutdown()
    assert funnel["rows_in"] == n, funnel
    import pyarrow.parquet as pq

    tokens = sum(pq.read_table(p, columns=["descriptive_tokens", "short_tokens"]).to_pandas().sum().sum()
                 for p in (out / "captions").glob("0*.parquet"))
    return n / elapsed, tokens / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--tiny", action="store_true", help="the tiny test BLIP instead of the base size")
    args = p.parse_args()

    work = guarded_workdir("tapir-bench-recap-")
    model = base_blip(work / "model", args.tiny)
    images = write_run(work / "run", args.images, args.per_shard)
    a_caps, a_toks = bench_bare(model, images, args.batch, args.new_tokens)
    b_caps, b_toks = bench_tapir(work / "run", model, args.batch, args.new_tokens, args.images)
    size = "tiny" if args.tiny else "base-size (ViT-B/16 384 px + BERT-base decoder)"
    print(f"\nBLIP {size}, random weights, {args.images} images, batch {args.batch}, "
          f"{args.new_tokens} new tokens, 2 caption kinds per image, greedy, CPU")
    print(f"  bare batched generate : {a_caps:7.2f} images/s  {a_toks:8.1f} tokens/s")
    print(f"  tapir recaption       : {b_caps:7.2f} images/s  {b_toks:8.1f} tokens/s")
    print(f"  ratio tapir / bare    : {b_caps / a_caps:.3f}  (goal >= 0.9)")
    print(f"  non-loopback connection attempts refused by the guard: {violations(work)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
