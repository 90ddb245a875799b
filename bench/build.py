"""Build throughput: the bare autoencoder forward versus `tapir build` end to end.

On the same run folder (rendered scenes at the training resolution, all rows kept and
captioned), in one run:
  (a) the bare diffusers AutoencoderKL forward on pre-decoded uint8 batches: upload,
      normalise, ``encode().latent_dist``, mean and std back to the host (the ceiling);
  (b) `tapir build` end to end: Ray start, actors loading the model, the plan, tar
      reading, JPEG decode, resize and crop, encoding, npy and tar writing, checksums,
      atomic commits, the manifest. ``--inprocess`` runs the stage without Ray (for a
      machine that has no Ray installed, such as the GPU box).
Prints images/s and the ratio b/a (goal: at least 0.85). Random weights of a real
architecture (``--arch sd``: the SD VAE, stabilityai/sd-vae-ft-mse's config) are fine for
speed. bf16 on GPU, fp32 on CPU, as `tapir build` does. Not a test.

    python bench/build.py --arch sd --resolution 128 --images 384
    python bench/build.py --arch sd --resolution 512 --images 1024 --inprocess --device cuda
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

from _common import guarded_workdir, violations  # bench/ is sys.path[0] for a script

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


def bench_bare(run: Path, vae_path: str, resolution: int, batch: int, device: str) -> float:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image, ImageOps

    from pipeline import shards

    arrays = []
    for sid in sorted(shards.done_shards(run / "raw")):
        for members in shards.read_tar(run / "raw" / f"{shards.shard_name(sid)}.tar").values():
            with Image.open(io.BytesIO(members["jpg"])) as im:
                arrays.append(np.asarray(ImageOps.fit(im.convert("RGB"), (resolution, resolution))))
    batches = [np.stack(arrays[i:i + batch]) for i in range(0, len(arrays), batch)]  # pre-decoded
    vae = AutoencoderKL.from_pretrained(vae_path).eval().to(device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def run_all(items):
        for b in items:
            x = torch.from_numpy(b).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with torch.no_grad(), autocast:
                dist = vae.encode(x).latent_dist
                dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()

    run_all(batches[:1])  # warm-up
    start = time.perf_counter()
    run_all(batches)
    return len(arrays) / (time.perf_counter() - start)


def build_inprocess(cfg) -> dict:
    """The build stage without Ray (for a machine that has none): plan, one worker, manifest."""
    from pipeline import shards
    from pipeline.build import BuildShard, _planned, _write_plan, encoder_infos, make_plan, plan_digest
    from pipeline.manifest import write

    cfg.shards_dir.mkdir(parents=True)
    plan, inputs = make_plan(cfg, encoder_infos(cfg.build))
    _write_plan(cfg.shards_dir, plan, plan_digest(plan, cfg.build, inputs))
    stage = BuildShard(cfg.model_dump())
    stage.setup()
    for sid in range(_planned(plan)):
        stage(sid)
    write(cfg.shards_dir, cfg.build, _planned(plan))
    return {"written": sum(shards.read_stats(cfg.shards_dir, s)["count"] for s in shards.done_shards(cfg.shards_dir)),
            "setup": stage.setup_seconds}


def bench_tapir(run: Path, vae_path: str, resolution: int, per_shard: int, batch: int, device: str,
                inprocess: bool, num_cpus: int | None, threads: int | None = None) -> tuple[float, dict]:
    from pipeline import shards
    from pipeline.build import build
    from pipeline.config import load_config

    shutil.rmtree(run / "shards", ignore_errors=True)
    sets = [f"output={run}", "input.path=unused", f"build.vae.model={vae_path}", f"build.resolution={resolution}",
            f"build.samples_per_shard={per_shard}", f"build.batch_size={batch}", f"build.device={device}"]
    if num_cpus:
        sets.append(f"resources.num_cpus={num_cpus}")
    if threads:
        sets.append(f"build.decode_threads={threads}")
    cfg = load_config(None, sets)
    start = time.perf_counter()
    funnel = build_inprocess(cfg) if inprocess else build(cfg)
    elapsed = time.perf_counter() - start
    timing: dict = {}  # where the shard workers spent their time, summed over shards
    for sid in shards.done_shards(cfg.shards_dir):
        for k, v in shards.read_stats(cfg.shards_dir, sid)["timing"].items():
            timing[k] = timing.get(k, 0) + v
    funnel["timing"] = {k: round(v, 2) for k, v in timing.items()}
    funnel["elapsed"] = round(elapsed, 2)
    return funnel["written"] / elapsed, funnel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--arch", choices=["sd", "tiny"], default="sd")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--inprocess", action="store_true", help="run the stage without Ray")
    parser.add_argument("--num-cpus", type=int, help="CPUs for the embedded Ray (default: all)")
    parser.add_argument("--decode-threads", default="", help="comma list: run (b) once per thread count")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    from filters.clip import pick_device
    from pipeline.synthweb import write_curated_run

    work = guarded_workdir("tapir-bench-build-")
    device = pick_device(args.device)
    run = work / "run"
    side = args.resolution
    write_curated_run(run, args.images, per_shard=args.per_shard, sizes=((side * 5 // 4, side),), faults=False,
                      drop_every=None)
    vae = save_vae(work / "vae", args.arch)
    bare = bench_bare(run, vae, args.resolution, args.batch, device)
    print(f"{args.arch} VAE, {args.images} images at {side}px, batch {args.batch}, {device}:")
    print(f"  (a) bare AutoencoderKL forward, pre-decoded:  {bare:8.2f} img/s")
    figures = {"arch": args.arch, "resolution": args.resolution, "images": args.images, "batch": args.batch,
               "device": device, "inprocess": args.inprocess, "bare_img_s": round(bare, 2), "runs": []}
    for threads in [int(t) for t in args.decode_threads.split(",") if t] or [None]:
        tapir, funnel = bench_tapir(run, vae, args.resolution, args.per_shard, args.batch, device, args.inprocess,
                                    args.num_cpus, threads)
        figures["runs"].append({"decode_threads": threads, "tapir_img_s": round(tapir, 2),
                                "ratio": round(tapir / bare, 3), "written": funnel["written"],
                                "elapsed_s": funnel["elapsed"], "shard_timing_s": funnel["timing"],
                                "setup_s": round(funnel.get("setup", 0), 2)})
        label = f"tapir build end to end{' (in-process)' if args.inprocess else ''}" + (
            f", {threads} decode threads" if threads else "")
        print(f"  (b) {label}: {tapir:8.2f} img/s")
        print(f"  ratio b/a: {tapir / bare:.3f}  (goal >= 0.85)")
        print(f"  (b) took {funnel['elapsed']:.1f} s; shard workers' time, summed: {funnel['timing']}"
              + (f", model setup {funnel['setup']:.1f} s" if "setup" in funnel else ""))
    figures["guard_refusals"] = violations(work)
    print(f"  guard refusals: {figures['guard_refusals']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
