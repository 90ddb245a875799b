"""Autoregressive trainer throughput: the real shard loader versus in-memory tensors, and
KV-cached versus uncached sampling.

On shards written by the build stage (rendered scenes; a VQ model's token grid, random weights
of a small VQModel with ``--vq-factor`` downsampling and ``--codebook`` codes; pre-computed text
embeddings per caption kind), one ARTrainer (the code `tapir train-ar` runs: its micro-step with
the text lookup, caption dropout, forward, next-token loss and backward, and its optimizer step
with clipping and EMA) is driven by two batch sources, same model, batch, threads and step count:
  (a) synthetic: batches collated once from the shards, held in memory and cycled (the ceiling);
  (b) loader:    the real loader, `ShardStream` through a DataLoader with the configured workers.
Arms alternate order over the repeats; each repeat times ``--steps`` steps after 3 + 4 x workers
warm-up steps (more than the loader's workers prefetch, so its queue starts drained). Then
`training.ar_model.sample` draws codes for ``--sample-batch`` prompts with guidance (the config's
cfg 4.0, temperature 1), same model and seed, with and without the KV cache, alternated too.
Prints image tokens/s per arm (median, min-max), images/s of sampling and the ratio
cached/uncached, MFU on a known GPU, and last the ratio b/a (goal: 0.9 or more). Not a test.

    python bench/train_ar.py --inprocess --model tiny --grid 16 --batch 32 --steps 30
    python bench/train_ar.py --inprocess --model L --grid 16 --vq-factor 16 --codebook 16384 --text-dim 4096 \
        --text-len 120 --batch 64 --workers 8 --device cuda --precision bf16 --compile
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import guarded_workdir, violations  # bench/ is sys.path[0] for a script
from build import build_inprocess

sys.path.remove(str(Path(__file__).resolve().parent))  # bench/recaption.py would shadow the package


def save_vq(folder: Path, factor: int, codebook: int) -> str:
    """A VQModel with ``factor`` downsampling (random weights; factor 4 is the tests' tiny one)."""
    import math

    import torch
    from diffusers import VQModel

    from pipeline.encoders import save_tiny_vq

    if factor == 4:
        return save_tiny_vq(folder, codebook_size=codebook)
    levels = int(math.log2(factor)) + 1
    torch.manual_seed(0)
    VQModel(in_channels=3, out_channels=3, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=codebook,
            block_out_channels=(32,) * (levels - 1) + (64,), down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, norm_num_groups=16,
            sample_size=256).save_pretrained(folder)
    return str(folder.resolve())


def save_text_encoder(folder: Path, dim: int) -> str:
    """The tests' tiny T5 (width 32), or a one-layer T5 encoder of width ``dim`` (random weights:
    4096 stores embeddings as large as T5-XXL's)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from pipeline.encoders import save_tiny_text_encoder
    from recaption.tiny import world_tokenizer

    if dim == 32:
        return save_tiny_text_encoder(folder)
    tokenizer = world_tokenizer()
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=64, d_ff=dim, num_layers=1,
                      num_heads=max(1, dim // 64), pad_token_id=tokenizer.pad_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder.resolve())


def make_shards(work: Path, args, device: str) -> Path:
    from pipeline import ray_backend
    from pipeline.build import build
    from pipeline.config import load_config
    from pipeline.synthweb import write_curated_run

    run = work / "run"
    side = args.grid * args.vq_factor
    write_curated_run(run, args.images, per_shard=100, sizes=((side * 5 // 4, side),), faults=False,
                      drop_every=None)
    vq = save_vq(work / "vq", args.vq_factor, args.codebook)
    text = save_text_encoder(work / "text", args.text_dim)
    cfg = load_config(None, [f"output={run}", f"build.resolution={side}", "build.samples_per_shard=100",
                             f"build.vq.model={vq}", f"build.text.model={text}",
                             f"build.text.max_length={args.text_len}", "build.latent_dtype=float16",
                             f"build.device={device}"])
    if args.inprocess:
        build_inprocess(cfg)
        return run
    try:
        build(cfg)
    finally:
        ray_backend.shutdown()
    return run


def trainer(run: Path, work: Path, args):
    from pipeline.config import load_config
    from training.ar import ARTrainer

    cfg = load_config(None, [f"output={run}", f"train_ar.output={work / 'train'}", f"train_ar.model={args.model}",
                             f"train_ar.data.batch_size={args.batch}", f"train_ar.data.workers={args.workers}",
                             f"train_ar.device={args.device}", f"train_ar.precision={args.precision}",
                             f"train_ar.text.max_length={args.text_len}", "train_ar.text.precomputed=always",
                             "train_ar.sample.every=0", "train_ar.data.shuffle_buffer=256",
                             f"train_ar.compile={args.compile}"])
    return ARTrainer(cfg)


def step(tr, batch) -> None:
    tr._micro(batch, 0, True)
    tr._optimizer_step()
    tr.step += 1


def sync(tr) -> None:
    import torch

    if tr.d.device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(tr, batches, n: int, warmup: int) -> float:
    """Optimizer steps per second over ``n`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):  # for the loader: more than its workers prefetch, so the clock sees steady state
        step(tr, next(batches))
    sync(tr)
    start = time.perf_counter()
    for _ in range(n):
        step(tr, next(batches))
    sync(tr)
    return n / (time.perf_counter() - start)


def loader_alone(tr, n: int, warmup: int) -> float:
    """Batches per second the loader delivers with no training step (a diagnostic, not an arm)."""
    batches = tr._batches()
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(n):
        next(batches)
    rate = n / (time.perf_counter() - start)
    batches.close()
    return rate


def sampler(tr, n: int):
    """A function drawing codes for ``n`` prompts (the config's sample prompts, cycled) with the
    trainer's guidance settings, with or without the KV cache; seeded the same every call."""
    import torch

    from training import distributed as D
    from training.ar_model import sample

    s, model = tr.t.sample, D.unwrap(tr.model)
    emb, mask = tr.text.prompts
    rows = torch.arange(n, device=emb.device) % len(emb)
    emb, mask = emb[rows], mask[rows]

    def draw(use_cache: bool):
        gen = torch.Generator(device=tr.d.device).manual_seed(s.seed)
        with tr.autocast:
            return sample(model, emb, mask, *tr.text.null, cfg_scale=s.cfg, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, generator=gen, use_cache=use_cache)
    return draw


def bench_sampling(tr, args) -> tuple[dict[str, list[float]], float]:
    """Images per second of each sampling arm per repeat, and the share of codes on which the last
    cached and uncached draws agree."""
    draw = sampler(tr, args.sample_batch)
    arms = {"cached": True, "uncached": False}
    codes = {name: draw(cache) for name, cache in arms.items()}  # warm-up (kernels, allocator)
    rates: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(args.sample_repeats):
        for name in list(arms) if r % 2 == 0 else list(arms)[::-1]:
            sync(tr)
            start = time.perf_counter()
            codes[name] = draw(arms[name])
            sync(tr)
            rates[name].append(args.sample_batch / (time.perf_counter() - start))
            print(f"sampling repeat {r + 1} {name:8s} {rates[name][-1]:.3f} images/s", flush=True)
    agree = (codes["cached"] == codes["uncached"]).float().mean().item()
    return rates, agree


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512, help="samples built into shards")
    p.add_argument("--grid", type=int, default=16, help="tokens per side of the image (the token grid)")
    p.add_argument("--vq-factor", type=int, default=4, choices=[4, 8, 16],
                   help="VQ downsampling: images are grid x factor pixels (LlamaGen's VQ: 16)")
    p.add_argument("--codebook", type=int, default=1024, help="VQ codes (LlamaGen: 16384)")
    p.add_argument("--text-dim", type=int, default=32, help="text encoder width (32: the tests' tiny T5; "
                   "4096: T5-XXL's, one random layer)")
    p.add_argument("--text-len", type=int, default=77, help="text tokens per caption (LlamaGen: 120)")
    p.add_argument("--model", default="tiny", help="AR size: tiny, B, L, XL")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the training process (0: torch's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--sample-batch", type=int, default=4, help="prompts per sampling call")
    p.add_argument("--sample-repeats", type=int, default=3, help="0: no sampling benchmark")
    p.add_argument("--inprocess", action="store_true", help="build the shards without Ray (a machine without it)")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = guarded_workdir("tapir-bench-train-ar-")
    from filters.clip import pick_device

    t0 = time.perf_counter()
    run = make_shards(work, args, pick_device(args.device))
    built = time.perf_counter() - t0
    tr = trainer(run, work, args)
    stream = tr._batches()
    memory = [next(stream) for _ in range(8)]
    stream.close()  # its DataLoader's workers stop
    tokens = tr.tokens_per_sample
    arms = {"synthetic": lambda: itertools.cycle(memory), "loader": tr._batches}
    warmup = 3 + 4 * args.workers
    rates: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(args.repeats):
        for name in list(arms) if r % 2 == 0 else list(arms)[::-1]:
            rates[name].append(timed(tr, arms[name](), args.steps, warmup))
            print(f"repeat {r + 1} {name:9s} {rates[name][-1] * args.batch * tokens:10.0f} tokens/s "
                  f"({rates[name][-1]:.2f} steps/s)", flush=True)
    alone = [loader_alone(tr, args.steps, warmup) for _ in range(args.repeats)]
    sampling, agree = bench_sampling(tr, args) if args.sample_repeats else ({}, 1.0)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    params = sum(p.numel() for p in tr.model.parameters())
    side = args.grid * args.vq_factor
    print(f"\ncommit {commit}; device {tr.d.device}; {torch.get_num_threads()} torch threads; model {args.model} "
          f"({params / 1e6:.1f}M params); batch {args.batch}; {side} px -> {tr.grid_hw[0]}x{tr.grid_hw[1]} tokens "
          f"of {args.codebook} codes; text {args.text_len}x{tr.text.dim}; precision {args.precision}; "
          f"compile {args.compile}; workers {args.workers}; {args.steps} steps x {args.repeats} repeats "
          f"after {warmup} warm-up steps; shards built in {built:.0f} s")
    med = {k: statistics.median(v) for k, v in rates.items()}
    from training.loop import peak_flops

    peak = peak_flops(tr.d.device)
    if tr.flops:
        print(f"training step: {tr.flops / 1e12:.2f} TFLOPs counted (FlopCounterMode, 2 per multiply-add); "
              f"peak {peak / 1e12:.0f} TFLOP/s bf16 dense")
    for k, v in rates.items():
        mfu = f"  MFU {tr.flops * med[k] / peak:.1%}" if tr.flops else ""
        print(f"{k:9s} median {med[k] * args.batch * tokens:10.0f} image tokens/s  "
              f"({min(v) * args.batch * tokens:.0f}-{max(v) * args.batch * tokens:.0f})  "
              f"= {med[k]:.2f} steps/s = {med[k] * args.batch:.1f} images/s{mfu}")
    print(f"loader alone (no training step): median {statistics.median(alone):.2f} batches/s "
          f"({min(alone):.2f}-{max(alone):.2f}) = {statistics.median(alone) / med['synthetic']:.2f}x "
          "the synthetic step rate")
    if sampling:
        smed = {k: statistics.median(v) for k, v in sampling.items()}
        for k, v in sampling.items():
            print(f"sampling {k:8s} median {smed[k]:.3f} images/s  ({min(v):.3f}-{max(v):.3f})  "
                  f"{args.sample_batch} prompts, cfg {tr.t.sample.cfg}, {tokens} codes each")
        print(f"sampling: KV-cached / uncached: {smed['cached'] / smed['uncached']:.2f}x; "
              f"codes agreeing: {agree:.1%}")
    if violations(work):
        print("NETWORK GUARD VIOLATIONS: see", work / "netguard.log")
    print(f"real loader / in-memory tensors: {med['loader'] / med['synthetic']:.3f}")


if __name__ == "__main__":
    main()
