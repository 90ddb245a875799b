"""Scoring throughput: the score stage's CLIP worker against the bare CLIP model, like for like.

On the same pre-written shards (img2dataset's webdataset layout, synthetic scenes at
256 px), two arms with the same process and thread layout, batch and images:
  bare:  the open_clip model alone (loaded by the scorer's own loader) on pre-decoded,
         pre-processed pixel tensors and pre-tokenised captions: encode_image, encode_text,
         normalise, cosine, results copied to the host (the model's ceiling);
  stage: ``pipeline.score.ScoreShard``, the class `tapir score`'s Ray actors run, called on
         every shard of its share: parquet and tar reading, JPEG decoding and CLIP
         preprocessing on its thread, tokenising, the model, the parquet write and the
         atomic commit. No Ray: the class runs directly in a process of its own.
Each run of an arm is fresh processes (``--procs`` x ``--threads``, see bench/_common.py);
model loading and one warm-up batch are not timed in either arm. Prints each arm's median
images/s and spread over ``--repeats`` alternating runs, and the median of the per-repeat
ratios stage / bare (goal >= 0.85). Random weights of a real architecture (default
ViT-B-32) are fine for speed; ``--tiny`` uses the tests' tiny CLIP. Not a test.

    python bench/score.py --images 256 --per-shard 64 --batch 32 --procs 2 --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from _common import add_layout_args, compare, guarded_workdir, layout_env, share, summarize, violations, write_shards


def _config(spec: dict, output: str):
    from pipeline.config import load_config

    return load_config(None, [f"output={output}", f"score.input={spec['raw']}", "score.scorers=[clip]",
                              f"score.clip.model={spec['model']}", "score.clip.pretrained=null",
                              f"score.clip.device={spec['device']}", f"score.batch_size={spec['batch']}",
                              "score.dedup.near=false"])


def _decoded(spec: dict, sids: list[int]) -> list[tuple[list, list]]:
    """(images, captions) per batch of each shard, as the stage batches them."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline import shards

    out = []
    for sid in sids:
        name = shards.shard_name(sid)
        meta = pq.read_table(Path(spec["raw"]) / f"{name}.parquet").sort_by("key")
        members = shards.read_tar(Path(spec["raw"]) / f"{name}.tar")
        keys, captions = meta["key"].to_pylist(), meta["caption"].to_pylist()
        images = [Image.open(io.BytesIO(members[k]["jpg"])).convert("RGB") for k in keys]
        b = spec["batch"]
        out += [(images[i:i + b], captions[i:i + b]) for i in range(0, len(keys), b)]
    return out


def bare(spec: dict, part: int, procs: int):
    """The CLIP model alone on batches decoded, preprocessed and tokenised beforehand."""
    import torch

    from filters.clip import ClipScorer

    scorer = ClipScorer(spec["model"], None, spec["device"])
    scorer.setup()  # the stage's loader, device and precision
    model, dev = scorer.model, scorer.device
    batches = [(scorer.prepare(images), scorer.tokenizer(caps))
               for images, caps in _decoded(spec, share(spec["shards"], part, procs))]

    def forward(pixels, tokens) -> None:
        with torch.no_grad(), scorer.autocast:
            img = model.encode_image(pixels.to(dev, non_blocking=True))
            txt = model.encode_text(tokens.to(dev, non_blocking=True))
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        (img * txt).sum(-1).cpu(), img.half().cpu()

    forward(*batches[0])  # warm-up

    def work() -> dict:
        for pixels, tokens in batches:
            forward(pixels, tokens)
        return {"images": sum(len(t) for _, t in batches)}

    return work


def stage(spec: dict, part: int, procs: int):
    """pipeline.score.ScoreShard, as an actor runs it: setup once, then one call per shard."""
    from pipeline.score import ScoreShard

    cfg = _config(spec, os.path.join(spec["work"], f"stage-{os.getpid()}"))
    shard = ScoreShard(cfg.model_dump(), "model", ["clip"], threads=spec["threads"], with_hash=True)
    shard.setup()
    mine = share(spec["shards"], part, procs)
    images, captions = _decoded(spec, mine[:1])[0]
    shard.clip({"image": images, "caption": captions})  # warm-up: one batch through the same model

    def work() -> dict:
        stats = [shard(sid) for sid in mine]
        assert all(s["errors"] == 0 for s in stats), stats
        return {"images": sum(s["scored"] for s in stats)}

    return work


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny CLIP instead of --model")
    p.add_argument("--device", default="cpu")
    add_layout_args(p)
    args = p.parse_args()
    load = os.getloadavg()[0]

    work = guarded_workdir("tapir-bench-score-")
    write_shards(work / "raw", args.images, args.per_shard)
    model = args.model
    if args.tiny:
        from filters.clip import save_local_clip

        model = save_local_clip(work / "clip")
    n_shards = -(-args.images // args.per_shard)
    if n_shards % args.procs:
        print(f"warning: {n_shards} shards do not split evenly over {args.procs} processes")
    spec = {"raw": str(work / "raw"), "work": str(work), "model": model, "batch": args.batch, "device": args.device,
            "threads": args.threads, "shards": list(range(n_shards))}
    layout_env(args.threads)
    print(f"CLIP {'tiny' if args.tiny else args.model} (random weights), {args.images} images at 256 px in "
          f"{n_shards} shards, batch {args.batch}, {args.device}", flush=True)
    runs = compare({"bare": bare, "stage": stage}, spec, repeats=args.repeats, procs=args.procs,
                   threads=args.threads)
    summarize(runs, "bare", "stage", 0.85, procs=args.procs, threads=args.threads, load_before=load,
              labels={"bare": "bare: CLIP model on pre-decoded tensors",
                      "stage": "stage: pipeline.score.ScoreShard (read, decode, preprocess, model, write)"},
              notes=[f"non-loopback connection attempts refused by the guard: {violations(work)}"],
              json_path=args.json)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
