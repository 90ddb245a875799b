"""Recaption throughput: the recaption stage's worker against bare batched ``generate``, like for like.

Same images (synthetic scenes, pre-written shards with every row selected), same model,
batch, greedy decoding, both caption kinds (descriptive and short: two generate passes per
image), same process and thread layout:
  bare:  ``model.generate`` alone on processor inputs (pixels, rendered prompts) made
         beforehand, the captioner's own loader and precision (the ceiling);
  stage: ``pipeline.recaption.RecaptionShard``, the class `tapir recaption`'s Ray actors run,
         called on every shard of its share: selection and tar reading, decoding, the
         processor, generate, decoding the tokens, cleaning, the parquet write and the atomic
         commit. No Ray: the class runs directly in a process of its own.
Each run of an arm is fresh processes (``--procs`` x ``--threads``, see bench/_common.py);
model loading and one warm-up batch are not timed in either arm. The model is a BLIP of the
real base size built from its config with random weights (fine for speed: it always
generates ``--new-tokens`` tokens); ``--tiny`` uses the tiny test model. Prints each arm's
median images/s and spread over ``--repeats`` alternating runs and the median of the
per-repeat ratios stage / bare (goal >= 0.9). Not a test.

    python bench/recaption.py --images 32 --per-shard 16 --batch 8 --procs 1 --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# this folder must not be on sys.path: bench/recaption.py would shadow the recaption package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
_spec = importlib.util.spec_from_file_location("tapir_bench_common", BENCH / "_common.py")
_common = sys.modules["tapir_bench_common"] = importlib.util.module_from_spec(_spec)  # importable by name (spawn)
_spec.loader.exec_module(_common)


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


def write_run(out: Path, n: int, per_shard: int) -> None:
    import pyarrow as pa

    from pipeline import shards

    _common.write_shards(out / "raw", n, per_shard)
    for sid in sorted(shards.done_shards(out / "raw")):
        keys = [f"{sid:05d}{i:04d}" for i in range(min(per_shard, n - sid * per_shard))]
        staging = shards.new_staging(out / "selection", sid)
        shards.write_parquet(staging / f"{sid:05d}.parquet",
                             pa.table({"key": keys, "keep": [True] * len(keys), "reason": [None] * len(keys)}))
        shards.commit(staging, out / "selection", sid, [f"{sid:05d}.parquet"], {"count": len(keys),
                                                                                 "kept": len(keys)})


def _config(spec: dict, output: str):
    from pipeline.config import load_config

    return load_config(None, [f"output={output}", f"recaption.model={spec['model']}",
                              f"recaption.batch_size={spec['batch']}", f"recaption.max_new_tokens={spec['new_tokens']}",
                              "recaption.retry_sampling=[]", "recaption.min_words=1", "recaption.token_counter=words",
                              "recaption.alt_text_hint=false", f"recaption.device={spec['device']}"])


def _images(cfg, sid: int) -> tuple[list, list]:
    """(decoded images, alt-texts) of one raw shard, in key order as the stage reads them."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline import shards

    name = shards.shard_name(sid)
    meta = pq.read_table(cfg.raw_dir / f"{name}.parquet").sort_by("key")
    members = shards.read_tar(cfg.raw_dir / f"{name}.tar")
    images = [Image.open(io.BytesIO(members[k]["jpg"])).convert("RGB") for k in meta["key"].to_pylist()]
    return images, meta["caption"].to_pylist()


def bare(spec: dict, part: int, procs: int):
    """``model.generate`` alone, on the processor's inputs for each kind's prompt, made beforehand."""
    import torch

    from pipeline.recaption import KINDS, build_captioner
    from recaption.prompts import load_prompt

    cfg = _config(spec, spec["run"])
    r = cfg.recaption
    cap = build_captioner(cfg)  # the stage's captioner: its loader, device and precision
    cap.setup()
    prompts = [load_prompt(getattr(r.prompts, kind)) for kind in KINDS]
    batches = []
    for sid in _common.share(spec["shards"], part, procs):
        images, alts = _images(cfg, sid)
        for prompt in prompts:  # each kind over the shard, batch by batch, as the stage goes
            for i in range(0, len(images), r.batch_size):
                texts = [prompt.render(a, r.alt_text_hint) for a in alts[i:i + r.batch_size]]
                batch = cap.inputs(images[i:i + r.batch_size], texts, [prompt.prefix] * len(texts)).to(cap.device)
                if "pixel_values" in batch and cap.precision == "bf16":
                    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
                batches.append(batch)

    def generate(batch) -> int:
        with torch.no_grad():
            return int(cap.model.generate(**batch, max_new_tokens=r.max_new_tokens, do_sample=False).shape[0])

    generate(batches[0])  # warm-up

    def work() -> dict:
        return {"images": sum(generate(b) for b in batches) // len(KINDS)}

    return work


def stage(spec: dict, part: int, procs: int):
    """pipeline.recaption.RecaptionShard, as an actor runs it: setup once, then one call per shard."""
    from pipeline.recaption import RecaptionShard

    out = Path(spec["work"]) / f"stage-{os.getpid()}"  # its own captions/, beside links to the inputs
    out.mkdir()
    for sub in ("raw", "selection"):
        (out / sub).symlink_to(Path(spec["run"]) / sub)
    cfg = _config(spec, str(out))
    shard = RecaptionShard(cfg.model_dump())
    shard.setup()
    mine = _common.share(spec["shards"], part, procs)
    images, alts = _images(cfg, mine[0])
    n = cfg.recaption.batch_size
    shard.captioner.generate(images[:n], alts[:n], [""] * len(alts[:n]), {})  # warm-up: one batch, same model

    def work() -> dict:
        return {"images": sum(shard(sid)["count"] for sid in mine)}

    return work


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--tiny", action="store_true", help="the tiny test BLIP instead of the base size")
    p.add_argument("--device", default="cpu")
    _common.add_layout_args(p)
    args = p.parse_args()
    load = os.getloadavg()[0]

    work = _common.guarded_workdir("tapir-bench-recap-")
    model = base_blip(work / "model", args.tiny)
    write_run(work / "run", args.images, args.per_shard)
    n_shards = -(-args.images // args.per_shard)
    if n_shards % args.procs:
        print(f"warning: {n_shards} shards do not split evenly over {args.procs} processes")
    spec = {"run": str(work / "run"), "work": str(work), "model": model, "batch": args.batch,
            "new_tokens": args.new_tokens, "device": args.device, "shards": list(range(n_shards))}
    _common.layout_env(args.threads)
    size = "tiny" if args.tiny else "base-size (ViT-B/16 384 px + BERT-base decoder)"
    print(f"BLIP {size}, random weights, {args.images} images in {n_shards} shards, batch {args.batch}, "
          f"{args.new_tokens} new tokens, 2 caption kinds per image, greedy, {args.device}", flush=True)
    runs = _common.compare({"bare": bare, "stage": stage}, spec, repeats=args.repeats, procs=args.procs,
                           threads=args.threads)
    _common.summarize(runs, "bare", "stage", 0.9, procs=args.procs, threads=args.threads, load_before=load,
                      labels={"bare": "bare: model.generate on processor inputs made beforehand",
                              "stage": "stage: pipeline.recaption.RecaptionShard (read, decode, generate, clean, "
                                       "write)"},
                      notes=[f"non-loopback connection attempts refused by the guard: {_common.violations(work)}"],
                      json_path=args.json)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
