"""Build throughput: the build stage's encoder worker against the bare autoencoder, like for like.

On the same run folder (rendered scenes, all rows kept and captioned), two arms with the
same process and thread layout, batch and images:
  bare:  the diffusers AutoencoderKL forward on pre-decoded, pre-cropped uint8 batches:
         upload, normalise, ``encode().latent_dist``, mean and std back to the host (the ceiling);
  stage: ``pipeline.build.BuildShard``, the class `tapir build`'s Ray actors run, called on
         every planned shard of its share: raw tar reading, the join with selection, captions
         and scores, JPEG decode, resize and crop on its decode threads, the encoder, the
         stored image's JPEG encode, npy and tar writing, checksums, fingerprint and the
         atomic commit. No Ray: the class runs directly in a process of its own.
Each run of an arm is fresh processes (``--procs`` x ``--threads``, see bench/_common.py);
model loading, planning and one warm-up batch are not timed in either arm. Prints each arm's
median images/s and spread over ``--repeats`` alternating runs, the median of the per-repeat
ratios stage / bare (goal >= 0.85), and where the stage's time went. Random weights of a real
architecture (``--arch sd``: the SD VAE, stabilityai/sd-vae-ft-mse's config) are fine for
speed. bf16 on GPU, fp32 on CPU, in both arms, as `tapir build` does. Not a test.

    python bench/build.py --arch sd --resolution 64 --images 128 --per-shard 32 --batch 16 --procs 2 --threads 1
    python bench/build.py --arch sd --resolution 256 --images 4096 --per-shard 512 --batch 64 --device cuda --threads 8

``build_inprocess`` (the stage without Ray: plan, one worker, manifest) is also what the
trainer benchmarks build their shards with on a machine without Ray.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
from pathlib import Path

from _common import add_layout_args, compare, guarded_workdir, layout_env, share, summarize, violations

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def save_vae(folder: Path, arch: str) -> str:
    import torch
    from diffusers import AutoencoderKL

    from pipeline.encoders import save_tiny_kl

    if arch == "tiny":
        return save_tiny_kl(folder)
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE).save_pretrained(folder)
    return str(folder)


def write_plan(cfg):
    """What `tapir build`'s driver does before its actors start: the preflight and the plan."""
    from pipeline.build import _digests, _write_plan, check_sizes, encoder_infos
    from pipeline.buildplan import make_plan

    infos = encoder_infos(cfg.build)
    check_sizes(cfg.build, infos)
    cfg.shards_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(cfg, infos, _digests(cfg))
    _write_plan(cfg.shards_dir, plan)
    return plan


def build_inprocess(cfg) -> dict:
    """The build stage without Ray (for a machine that has none): plan, one worker, manifest."""
    from pipeline import manifest, shards
    from pipeline.build import BuildShard

    plan = write_plan(cfg)
    stage = BuildShard(cfg.model_dump())
    stage.setup()
    for sid in range(plan.shards):
        stage(sid)
    manifest.write(cfg.shards_dir, cfg.build, plan.shards)
    return {"written": sum(shards.read_stats(cfg.shards_dir, s)["count"] for s in shards.done_shards(cfg.shards_dir)),
            "setup": stage.setup_seconds}


def _config(spec: dict, shards_dir: str | None = None):
    from pipeline.config import load_config

    sets = [f"output={spec['run']}", f"build.vae.model={spec['vae']}", f"build.resolution={spec['resolution']}",
            f"build.samples_per_shard={spec['per_shard']}", f"build.batch_size={spec['batch']}",
            f"build.device={spec['device']}"]
    return load_config(None, sets + ([f"build.output={shards_dir}"] if shards_dir else []))


def _batches(cfg, plan, sids: list[int]) -> list:
    """uint8 (N, H, W, 3) batches of the planned shards ``sids``, decoded and cropped as the stage
    does and batched as it batches (per shard, per size, ``build.batch_size``)."""
    import io

    import numpy as np
    from PIL import Image, ImageOps

    from pipeline import shards
    from pipeline.build import encoder_infos
    from pipeline.buildplan import planned_rows

    infos, out = encoder_infos(cfg.build), []
    for sid in sids:
        rows = [r for source, start, stop in plan.slices(sid) for r in planned_rows(cfg, infos, source)[start:stop]]
        tars = {s: shards.read_tar(cfg.score_input / f"{shards.shard_name(s)}.tar") for s in {r["source"] for r in rows}}
        groups: dict[tuple, list] = {}
        for r in rows:
            with Image.open(io.BytesIO(tars[r["source"]][r["key"]]["jpg"])) as im:
                fitted = ImageOps.fit(im.convert("RGB"), (r["width"], r["height"]), method=Image.Resampling.BICUBIC)
            groups.setdefault((r["width"], r["height"]), []).append(np.asarray(fitted))
        b = cfg.build.batch_size
        out += [np.stack(g[i:i + b]) for g in groups.values() for i in range(0, len(g), b)]
    return out


def bare(spec: dict, part: int, procs: int):
    """The AutoencoderKL forward alone on batches decoded and cropped beforehand."""
    import torch
    from diffusers import AutoencoderKL

    from filters.clip import pick_device
    from pipeline.build import _digests, encoder_infos
    from pipeline.buildplan import make_plan

    cfg = _config(spec)
    plan = make_plan(cfg, encoder_infos(cfg.build), _digests(cfg))
    batches = _batches(cfg, plan, share(spec["shards"], part, procs))
    device = pick_device(spec["device"])
    vae = AutoencoderKL.from_pretrained(spec["vae"]).eval().to(device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def forward(b) -> None:
        x = torch.from_numpy(b).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad(), autocast:
            dist = vae.encode(x).latent_dist
            dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()

    forward(batches[0])  # warm-up

    def work() -> dict:
        for b in batches:
            forward(b)
        return {"images": sum(len(b) for b in batches)}

    return work


def stage(spec: dict, part: int, procs: int):
    """pipeline.build.BuildShard, as an actor runs it: setup once, then one call per planned shard."""
    from pipeline.build import BuildShard

    cfg = _config(spec, os.path.join(spec["work"], f"stage-{os.getpid()}"))
    plan = write_plan(cfg)
    shard = BuildShard(cfg.model_dump())
    shard.setup()
    mine = share(spec["shards"], part, procs)
    shard.encoders.encode_images(_batches(cfg, plan, mine[:1])[0])  # warm-up: one batch through the same model

    def work() -> dict:
        stats = [shard(sid) for sid in mine]
        assert all(not s["failed"] for s in stats), [s["failed"] for s in stats]
        timing = {f"{k}_s": sum(s["timing"][k] for s in stats) for k in stats[0]["timing"]}
        return {"images": sum(s["count"] for s in stats), **timing}

    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--arch", choices=["sd", "tiny"], default="sd")
    parser.add_argument("--device", default="cpu")
    add_layout_args(parser)
    args = parser.parse_args()
    load = os.getloadavg()[0]

    from pipeline.synthweb import write_curated_run

    work = guarded_workdir("tapir-bench-build-")
    run, side = work / "run", args.resolution
    write_curated_run(run, args.images, per_shard=args.per_shard, sizes=((side * 5 // 4, side),), faults=False,
                      drop_every=None)
    vae = save_vae(work / "vae", args.arch)
    n_shards = -(-args.images // args.per_shard)
    if n_shards % args.procs:
        print(f"warning: {n_shards} shards do not split evenly over {args.procs} processes")
    spec = {"run": str(run), "work": str(work), "vae": vae, "resolution": side, "per_shard": args.per_shard,
            "batch": args.batch, "device": args.device, "shards": list(range(n_shards))}
    layout_env(args.threads)
    print(f"{args.arch} VAE (random weights), {args.images} images of {side * 5 // 4}x{side} cropped to {side}px in "
          f"{n_shards} shards, batch {args.batch}, {args.device}", flush=True)
    runs = compare({"bare": bare, "stage": stage}, spec, repeats=args.repeats, procs=args.procs, threads=args.threads)
    spent = {k[:-2]: statistics.median(r[k] for r in runs["stage"]) for k in runs["stage"][0] if k.endswith("_s")}
    summarize(runs, "bare", "stage", 0.85, procs=args.procs, threads=args.threads, load_before=load,
              labels={"bare": "bare: AutoencoderKL forward on pre-decoded batches",
                      "stage": "stage: pipeline.build.BuildShard (read, decode, crop, encode, write, commit)"},
              notes=["stage's time, summed over its processes, median over repeats (s): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in spent.items()),
                     f"non-loopback connection attempts refused by the guard: {violations(work)}"],
              json_path=args.json)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
