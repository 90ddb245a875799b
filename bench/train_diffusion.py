"""Diffusion trainer throughput: the real shard loader versus in-memory tensors, and
pre-encoded latents versus encoding images with the VAE online.

On shards written by `tapir build` (rendered scenes, a KL autoencoder's latent mean and std,
text embeddings per caption kind), one Trainer (the code `tapir train-diffusion` runs: its
micro-step with latent sampling, scaling, text lookup, noise, forward, loss and backward, and
its optimizer step with clipping and EMA) is driven by three batch sources, same model, batch,
threads and step count:
  (a) synthetic: batches collated once from the shards, held in memory and cycled (the ceiling);
  (b) loader:    the real loader, `ShardStream` through a DataLoader with the configured workers;
  (c) online:    decoded images held in memory, encoded by the VAE inside every step (what a
                 trainer without pre-encoded latents does on top of (a)).
Arms alternate order over the repeats; each repeat times ``--steps`` steps after 3 + 4 x
workers warm-up steps (more than the loader's workers prefetch, so its queue starts drained). Prints steps/s per arm (median, min-max), the speedup a/c, and last the ratio b/a
(goal: 0.9 or more). Not a test.

    python bench/train_diffusion.py --images 256 --resolution 64 --model tiny --batch 16
    python bench/train_diffusion.py --arch sd --resolution 256 --model XL/2 --batch 64 --device cuda --compile --inprocess
"""

from __future__ import annotations

import argparse
import io
import itertools
import statistics
import subprocess
import time
from pathlib import Path

import sys

from _common import guarded_workdir, violations  # bench/ is sys.path[0] for a script
from build import build_inprocess, save_vae  # the SD VAE's architecture (random weights) or the tiny one

sys.path.remove(str(Path(__file__).resolve().parent))  # bench/recaption.py would shadow the package


def make_shards(work: Path, images: int, resolution: int, arch: str, inprocess: bool, device: str) -> Path:
    from pipeline import ray_backend
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.encoders import save_tiny_text_encoder
    from pipeline.synthweb import write_curated_run

    run = work / "run"
    write_curated_run(run, images, per_shard=100, faults=False, drop_every=None)
    vae = save_vae(work / "vae", arch)
    text = save_tiny_text_encoder(work / "text")
    cfg = load_config(None, [f"output={run}", f"build.resolution={resolution}", "build.samples_per_shard=100",
                             f"build.vae.model={vae}", f"build.text.model={text}", "build.latent_dtype=float16",
                             f"build.device={device}"])
    if inprocess:
        build_inprocess(cfg)
        return run
    try:
        build(cfg)
    finally:
        ray_backend.shutdown()
    return run


def trainer(run: Path, work: Path, args):
    from pipeline.config import load_config
    from training.diffusion import Trainer

    cfg = load_config(None, [f"output={run}", f"train_diffusion.output={work / 'train'}",
                             f"train_diffusion.model={args.model}", f"train_diffusion.data.batch_size={args.batch}",
                             f"train_diffusion.data.workers={args.workers}", f"train_diffusion.device={args.device}",
                             "train_diffusion.sample.every=0", "train_diffusion.data.shuffle_buffer=256",
                             f"train_diffusion.compile={args.compile}"])
    return Trainer(cfg)


def step(tr, batch) -> None:
    tr._micro(batch, 0, True)
    tr._optimizer_step()
    tr.step += 1


def timed(tr, batches, n: int, warmup: int) -> float:
    for _ in range(warmup):  # for the loader: more than its workers prefetch, so the clock sees steady state
        step(tr, next(batches))
    sync(tr)
    start = time.perf_counter()
    for _ in range(n):
        step(tr, next(batches))
    sync(tr)
    return n / (time.perf_counter() - start)


def sync(tr) -> None:
    import torch

    if tr.d.device.startswith("cuda"):
        torch.cuda.synchronize()


def image_batches(tr, run: Path, batch: int, n: int) -> list[dict]:
    """Decoded images (uint8, on the host) with captions, for the online arm."""
    import numpy as np
    import torch
    from PIL import Image

    from training.data import _read_tar

    out, cur = [], []
    for tar in sorted((run / "shards").glob("*.tar")):
        for _, members in _read_tar(tar):
            with Image.open(io.BytesIO(members["jpg"])) as im:
                cur.append(torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1))
            if len(cur) == batch:
                out.append(torch.stack(cur))
                cur = []
            if len(out) == n:
                return out
    return out


def online(tr, images: list, template: list[dict]):
    """Batches whose latents come from encoding images with the run's VAE inside the step."""
    import torch

    for pixels, batch in zip(itertools.cycle(images), itertools.cycle(template)):
        x = pixels.to(tr.d.device).float() / 127.5 - 1
        with torch.no_grad(), tr.autocast:
            dist = tr.vae.encode(x.to(next(tr.vae.parameters()).dtype)).latent_dist
        yield {**batch, "latent_mean": dist.mean.float(), "latent_std": dist.std.float()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--arch", choices=["tiny", "sd"], default="tiny", help="VAE architecture (random weights)")
    p.add_argument("--model", default="tiny", help="DiT size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--inprocess", action="store_true", help="build the shards without Ray (a machine without it)")
    args = p.parse_args()
    work = guarded_workdir("tapir-bench-train-")
    from filters.clip import pick_device

    run = make_shards(work, args.images, args.resolution, args.arch, args.inprocess, pick_device(args.device))
    tr = trainer(run, work, args)
    stream = tr._batches()
    memory = [next(stream) for _ in range(8)]
    images = image_batches(tr, run, args.batch, 8)
    arms = {"synthetic": lambda: itertools.cycle(memory), "loader": tr._batches,
            "online": lambda: online(tr, images, memory)}
    rates: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(args.repeats):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for name in order:
            rates[name].append(timed(tr, arms[name](), args.steps, warmup=3 + 4 * args.workers))
            print(f"repeat {r + 1} {name:9s} {rates[name][-1]:.2f} steps/s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\ncommit {commit}; device {tr.d.device}; model {args.model}; batch {args.batch}; "
          f"{args.resolution} px -> latents {tr.kl['channels']}x{tr.latent_size}x{tr.latent_size}; "
          f"workers {args.workers}; {args.steps} steps x {args.repeats} repeats")
    med = {k: statistics.median(v) for k, v in rates.items()}
    from training.loop import peak_flops

    peak = peak_flops(tr.d.device)
    if tr.flops:
        print(f"training step: {tr.flops / 1e9:.1f} GFLOPs counted (FlopCounterMode, 2 per multiply-add); "
              f"peak {peak / 1e12:.0f} TFLOP/s bf16 dense")
    for k, v in rates.items():
        mfu = f"  MFU {tr.flops * med[k] / peak:.1%}" if tr.flops else ""
        print(f"{k:9s} median {med[k]:.2f} steps/s  ({min(v):.2f}-{max(v):.2f})  "
              f"= {med[k] * args.batch:.1f} images/s{mfu}")
    print(f"pre-encoded latents vs VAE online: {med['synthetic'] / med['online']:.2f}x faster")
    if violations(work):
        print("NETWORK GUARD VIOLATIONS: see", work / "netguard.log")
    print(f"real loader / in-memory tensors: {med['loader'] / med['synthetic']:.3f}")


if __name__ == "__main__":
    main()
