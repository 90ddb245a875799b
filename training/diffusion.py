"""`tapir train-diffusion`: a text-conditioned DiT trained on pre-encoded latents.

Per optimizer step, on every rank: a batch of latent distributions and captions from the
shards (``training.data``); z = mean + std * eps sampled here and scaled with the manifest's
factors; captions embedded (``training.text``); noise and timesteps from the objective's
diffusers scheduler (``training.objectives``); the loss through DDP/FSDP, bf16 autocast on
GPUs; AdamW with warm-up, clipping and accumulation; EMA. Every random draw is seeded by
(seed, step, micro-batch, rank), the data order by (seed, epoch), so a resumed run repeats an
uninterrupted one step for step. Rank 0 writes metrics, grids, evaluations, checkpoints and,
at the end, the diffusers pipeline folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from pipeline.config import RunConfig
from training import checkpoint as ckpt
from training import distributed as D
from training.data import ShardStream, loader
from training.loop import EMA, Metrics, lr_lambda, peak_flops
from training.models import create_dit, forward, train_flops
from training.objectives import Objective
from training.sample import decode, export_pipeline, generate, grid, load_vae, scale_latents
from training.text import TextConditioner

log = logging.getLogger(__name__)


def _seed(*parts: int) -> int:
    return hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF  # ints hash deterministically


def _geometry(manifest: dict, folder: Path) -> tuple[dict, int]:
    kl = manifest["encoders"].get("kl")
    if kl is None:
        raise ValueError(f"shards in {folder} hold no KL latents: build them with build.vae.model set")
    sizes = manifest["image"]["buckets"]
    if len(sizes) != 1 or sizes[0][0] != sizes[0][1]:
        raise ValueError(f"shards in {folder} hold sizes {sizes}: train-diffusion trains on one square size "
                         "(build.crop: center)")
    return kl, sizes[0][0] // kl["factor"]


class Trainer:
    """The state of one diffusion run; ``fit`` trains to ``max_steps``."""

    def __init__(self, cfg: RunConfig, resume: bool = False):
        from pipeline import manifest as shard_manifest

        t = self.t = cfg.train_diffusion
        self.cfg, self.d = cfg, D.setup(t.device)
        self.out = cfg.diffusion_dir
        self.shards = cfg.train_shards
        manifest = shard_manifest.load(self.shards)
        self.kl, self.latent_size = _geometry(manifest, self.shards)
        precision = t.precision if t.precision != "auto" else ("bf16" if self.d.device.startswith("cuda") else "fp32")
        self.autocast = torch.autocast(self.d.device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")
        vae_model = t.vae or self.kl["model"]
        vae_sub = t.vae_subfolder if t.vae else self.kl.get("subfolder")
        self.vae = load_vae(vae_model, vae_sub, "cpu")
        shard_manifest.check_encoder(self.shards, "kl", self.vae, vae_model)  # refuses, naming the shard
        self.vae.to(self.d.device)
        self.vae_source = {"model": vae_model, "subfolder": vae_sub}
        torch.manual_seed(t.seed)
        self.text = TextConditioner(t.text, manifest, list(t.data.caption_probs), self.d.device, t.sample.prompts,
                                    self.autocast, keep_encoder=bool(t.eval.every and t.eval.clip_model))
        model = create_dit(t.model, self.kl["channels"], self.latent_size, self.text.dim).to(self.d.device)
        if t.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.flops = self._flops(model) if peak_flops(self.d.device) else None
        self.model = D.wrap(model, self.d, t.distributed)
        self.ema = EMA(self.model, t.ema_decay)  # sharded like the model under FSDP
        self.fwd = torch.compile(self.model) if t.compile else self.model
        o = t.optim
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                                     fused=self.d.device.startswith("cuda"))
        self.lr = lr_lambda(o, t.max_steps)
        self.objective = Objective(t.diffusion)
        self.held_out = []
        if t.eval.every and t.eval.clip_model:
            if len(manifest["shards"]) <= t.eval.holdout_shards:
                raise ValueError(f"{self.shards} has {len(manifest['shards'])} shard(s): too few to hold "
                                 f"{t.eval.holdout_shards} out for evaluation (train_diffusion.eval.holdout_shards)")
            self.held_out = manifest["shards"][-t.eval.holdout_shards:]
            manifest = {**manifest, "shards": manifest["shards"][:-t.eval.holdout_shards]}
        self.stream = ShardStream(self.shards, manifest, t.data, t.seed, self.d.world, self.d.rank, self.text.kinds)
        self.step, self.batches = 0, 0  # optimizer steps; micro-batches read by this rank
        self.kinds: Counter = Counter()
        self.faults: list[str] = []
        self._start(resume)
        self.metrics = Metrics(self.out, self.d.main, self.step)
        self.evaluator, self.eval_prompts = None, None

    def _flops(self, model) -> int:
        b, c, s = self.t.data.batch_size, self.kl["channels"], self.latent_size
        x = torch.randn(b, c, s, s, device=self.d.device)
        emb, mask = self.text.prompts[0][:1].expand(b, -1, -1), self.text.prompts[1][:1].expand(b, -1)
        with self.autocast:
            return train_flops(model, x, emb, mask)

    def _data_facts(self) -> dict:
        """What the data order depends on: a resume must find the same."""
        import hashlib

        shard_list = json.dumps(list(zip(self.stream.names, self.stream.counts))).encode()
        return {"processes": self.d.world, "batch_size": self.t.data.batch_size, "loader_workers": self.stream.workers,
                "grad_accum": self.t.optim.grad_accum, "seed": self.t.seed, "batches_per_epoch": self.stream.n_batches,
                "shards_sha256": hashlib.sha256(shard_list).hexdigest()}

    def _start(self, resume: bool) -> None:
        found = ckpt.latest(self.out / "checkpoints")
        if found and not resume:
            raise ValueError(f"{self.out} already holds checkpoints ({found.name}): pass --resume to continue "
                             "it, or set train_diffusion.output to a new folder")
        if resume and found:
            state = ckpt.load(found)
            D.load_full_state(self.model, state["model"], self.opt, state["optimizer"])
            with self.ema.swapped():
                D.load_full_state(self.model, state["ema"])
            s = state["state"]
            then, now = s["data"], self._data_facts()
            changed = [k for k in now if then.get(k) != now[k]]
            if changed:
                raise ValueError(f"{found} was saved with other {', '.join(changed)} "
                                 f"({[then.get(k) for k in changed]}, now {[now[k] for k in changed]}): "
                                 "resume with the same to continue exactly")
            self.faults = s.get("faults", [])
            self.step, self.batches = s["step"], s["batches"]
            self.kinds = Counter(s.get("caption_kinds", {}))
            log.info("resumed from %s: step %d, %d batches read", found, self.step, self.batches)
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
            facts = {"config": self.cfg.model_dump(mode="json"), "kl": self.kl, "latent_size": self.latent_size,
                     "vae": self.vae_source, "text": self.text.source, "shards": str(self.shards)}
            (self.out / "run.json").write_text(json.dumps(facts, indent=1))

    # -- one optimizer step -----------------------------------------------------------------
    def _micro(self, batch: dict, micro: int, last: bool) -> float:
        d, t = self.d, self.t
        gen = torch.Generator(device=d.device).manual_seed(_seed(t.seed, self.step, micro, d.rank))
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(d.device), batch["latent_std"].to(d.device)
            z = mean + std * torch.randn(mean.shape, generator=gen, device=d.device)
        else:
            z = batch["latent"].to(d.device)
        x0 = scale_latents(z, self.kl)
        emb, mask = self.text.batch(batch, d.device)
        noise = torch.randn(x0.shape, generator=gen, device=d.device)
        ts, idx = self.objective.timesteps(len(x0), gen, d.device)
        xt, target = self.objective.noisy(x0, noise, ts, idx)
        with D.no_sync(self.model, not last), self.autocast:
            pred = forward(self.fwd, xt, ts, emb, mask)
            loss = self.objective.loss(pred, target, ts)
            (loss / t.optim.grad_accum).backward()
        return loss.item()

    def _optimizer_step(self) -> float:
        for g in self.opt.param_groups:
            g["lr"] = self.t.optim.lr * self.lr(self.step)
        clip = self.t.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update()
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _batches(self):
        """Batches forever from the saved data position (one DataLoader, workers kept)."""
        self.stream.set_start(self.batches)
        for batch in loader(self.stream):
            self.batches += 1
            yield batch

    def fit(self) -> dict:
        from tqdm import tqdm

        t, d = self.t, self.d
        batches = self._batches()
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train-diffusion", unit="step", disable=not d.main)
        window, tick = 0, time.perf_counter()
        while self.step < t.max_steps:
            losses = []
            for micro in range(t.optim.grad_accum):
                batch = next(batches)
                self.kinds.update("dropped" if dr else k for k, dr in zip(batch["kind"], batch["drop"].tolist()))
                self.faults += batch["faults"]
                losses.append(self._micro(batch, micro, micro == t.optim.grad_accum - 1))
            norm = self._optimizer_step()
            self.step += 1
            window += 1
            loss = sum(losses) / len(losses)
            self.metrics.step(self.step, {"loss": loss, "lr": self.opt.param_groups[0]["lr"], "grad_norm": norm})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                elapsed = time.perf_counter() - tick
                self._log(loss, norm, window / elapsed)
                window, tick = 0, time.perf_counter()
            if t.sample.every and self.step % t.sample.every == 0 or self.step == t.max_steps:
                self.sample_grid()
            if t.eval.every and (self.step % t.eval.every == 0 or self.step == t.max_steps):
                self.evaluate()
            if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                self.save()
        bar.close()
        return self.finish()

    def _log(self, loss: float, norm: float, steps_per_s: float) -> None:
        t, d = self.t, self.d
        images = steps_per_s * t.data.batch_size * t.optim.grad_accum * d.world
        total = sum(self.kinds.values()) or 1
        values = {"train/loss": D.mean(loss, d), "train/lr": self.opt.param_groups[0]["lr"],
                  "train/grad_norm": norm, "perf/images_per_s": images, "data/faults": len(self.faults),
                  **{f"captions/{k}": n / total for k, n in self.kinds.items()}}
        if self.flops:
            values["perf/mfu"] = self.flops * steps_per_s * t.optim.grad_accum / peak_flops(d.device)
        self.metrics.scalars(self.step, values)

    # -- samples, evaluation, checkpoints -------------------------------------------------
    def _module(self):
        """The module to sample with: DDP's inner one (no collectives); under FSDP the sharded
        module itself, which every rank runs together."""
        return D.unwrap(self.model) if self.t.distributed == "ddp" else self.model

    def _generate(self, emb, mask, steps: int, seed: int) -> torch.Tensor:
        s = self.t.sample
        with self.ema.swapped():
            return generate(self._module(), emb, mask, self.text.null, self.objective.scheduler, self.kl, self.vae,
                            (self.kl["channels"], self.latent_size, self.latent_size), sampler_name=s.sampler,
                            steps=steps, cfg=s.cfg, seed=seed, autocast=self.autocast)

    def _samples_here(self) -> bool:
        """Whether this rank samples: every rank under FSDP (the sharded model runs together),
        else rank 0 alone (DDP's inner module needs no collectives)."""
        return self.d.main or (self.t.distributed == "fsdp" and self.d.world > 1)

    def sample_grid(self) -> Path | None:
        if not self._samples_here():
            return None
        images = self._generate(*self.text.prompts, self.t.sample.steps, self.t.sample.seed)
        if not self.d.main:
            return None
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = grid(images)
        image.save(path)
        self.metrics.image("samples", image, self.step)
        return path

    def evaluate(self) -> dict:
        """CLIP score and Fréchet distance of samples of the held-out captions (scored on rank 0)."""
        from training.evaluate import Evaluator

        e = self.t.eval
        if e.clip_model is None or not self._samples_here():
            return {}
        if self.eval_prompts is None:
            self.real, self.eval_prompts = self._held_out(e.samples)
            if self.d.main:
                self.evaluator = Evaluator(e.clip_model, e.clip_pretrained, self.d.device, e.fid)
                log.info("evaluation: CLIP score with %s, Fréchet distance on %s", e.clip_model,
                         self.evaluator.feature_name)
        emb, mask = self.text.encode(self.eval_prompts)
        fake = self._generate(emb.to(self.d.device), mask.to(self.d.device), e.steps, self.t.sample.seed + 1)
        if not self.d.main:
            return {}
        result = {"eval/clip_score": self.evaluator.clip_score(fake, self.eval_prompts),
                  "eval/frechet": self.evaluator.frechet(self.real, fake)}
        self.metrics.scalars(self.step, result)
        self.metrics.record("eval.jsonl", {"step": self.step, **result, "features": self.evaluator.feature_name})
        log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
        return result

    def _held_out(self, n: int):
        """Real images and captions of ``n`` samples of the held-out shards, decoded from their
        latent means (the images the model can at best reproduce)."""
        from training.data import read_samples

        samples = read_samples(self.shards, self.held_out, n, self.stream.latent_members[0])
        z = torch.stack([s["latent"] for s in samples]).to(self.d.device)
        real = decode(self.vae, scale_latents(z, self.kl), self.kl)
        return real, [s["caption"] for s in samples]

    def save(self) -> None:
        msd, osd = D.full_state(self.model, self.opt)
        with self.ema.swapped():
            esd, _ = D.full_state(self.model)
        if self.d.main:
            state = {"batches": self.batches, "epoch": self.batches / self.stream.n_batches,
                     "caption_kinds": dict(self.kinds), "faults": self.faults, "data": self._data_facts()}
            path = ckpt.save(self.out / "checkpoints", self.step, msd, esd, osd, state, self.t.keep_checkpoints)
            log.info("checkpoint %s", path)
        D.barrier(self.d)

    def finish(self) -> dict:
        d = self.d
        with self.ema.swapped():
            esd, _ = D.full_state(self.model)  # a collective under FSDP: every rank takes part
        summary = {"steps": self.step, "batches": self.batches, "epoch": self.batches // self.stream.n_batches,
                   "batch_in_epoch": self.batches % self.stream.n_batches,
                   "rank": d.rank, "world": d.world, "caption_kinds": dict(self.kinds),
                   "faults": self.faults, "batches_per_epoch": self.stream.n_batches}
        self.metrics.close()
        D.barrier(d)  # the last collective: rank 0 exports alone, nobody waits on it
        if d.main:
            summary["pipeline"] = self._export(esd)
        (self.out / f"rank-{d.rank}.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _export(self, ema_state: dict) -> str | None:
        if self.t.text.hidden_layer != -1:
            log.warning("no diffusers pipeline exported: PixArtAlphaPipeline conditions on the text encoder's "
                        "last hidden state, this run on layer %d; sample with `tapir sample`", self.t.text.hidden_layer)
            return None
        module = create_dit(self.t.model, self.kl["channels"], self.latent_size, self.text.dim)
        module.load_state_dict(ema_state)
        path = export_pipeline(self.out / "pipeline", module, self.vae, self.text.source, self.objective.scheduler,
                               self.t.sample.sampler, self.t.text.max_length)
        return str(path)


def train_diffusion(cfg: RunConfig, resume: bool = False) -> dict:
    """Train (or resume) the diffusion run of ``cfg``; return the run's summary."""
    try:
        return Trainer(cfg, resume).fit()
    finally:
        D.cleanup()


def ray_train_diffusion(cfg: RunConfig, resume: bool, workers: int, use_gpu: bool) -> dict:
    """The same loop on a Ray cluster, one TorchTrainer worker per process."""
    from pipeline import ray_backend

    ray_backend.run_torch_trainer(_ray_loop, {"config": cfg.model_dump(mode="json"), "resume": resume},
                                  workers, use_gpu, cfg.resources.ray_address, cfg.resources.num_cpus)
    return json.loads((cfg.diffusion_dir / "rank-0.json").read_text())


def _ray_loop(config: dict) -> None:
    summary = Trainer(RunConfig.model_validate(config["config"]), config["resume"]).fit()
    log.info("rank %d finished at step %d", summary["rank"], summary["steps"])

