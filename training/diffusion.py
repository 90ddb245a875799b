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

import logging
from pathlib import Path

import torch

from pipeline.config import RunConfig
from training import distributed as D
from training.data import ShardStream
from training.loop import peak_flops
from training.models import create_dit, forward, train_flops
from training.objectives import Objective
from training.sample import decode, export_pipeline, generate, grid, load_vae, scale_latents
from training.text import TextConditioner
from training.trainer import BaseTrainer, held_out_split, train, train_on_ray

log = logging.getLogger(__name__)


def _geometry(manifest: dict, folder: Path) -> tuple[dict, int]:
    kl = manifest["encoders"].get("kl")
    if kl is None:
        raise ValueError(f"shards in {folder} hold no KL latents: build them with build.vae.model set")
    sizes = manifest["image"]["buckets"]
    if len(sizes) != 1 or sizes[0][0] != sizes[0][1]:
        raise ValueError(f"shards in {folder} hold sizes {sizes}: train-diffusion trains on one square size "
                         "(build.crop: center)")
    return kl, sizes[0][0] // kl["factor"]


class Trainer(BaseTrainer):
    """The state of one diffusion run; ``fit`` trains to ``max_steps``."""

    kind = "diffusion"

    def __init__(self, cfg: RunConfig, resume: bool = False):
        from pipeline import manifest as shard_manifest

        super().__init__(cfg, cfg.train_diffusion, cfg.diffusion_dir)
        t = self.t
        self.shards = cfg.train_shards
        manifest = shard_manifest.load(self.shards)
        self.kl, self.latent_size = _geometry(manifest, self.shards)
        vae_model = t.vae or self.kl["model"]
        vae_sub = t.vae_subfolder if t.vae else self.kl.get("subfolder")
        self.vae = load_vae(vae_model, vae_sub, "cpu")
        shard_manifest.check_encoder(self.shards, "kl", self.vae, vae_model)  # refuses, naming the shard
        self.vae.to(self.d.device)
        self.vae_source = {"model": vae_model, "subfolder": vae_sub}
        self.text = TextConditioner(t.text, manifest, list(t.data.caption_probs), self.d.device, t.sample.prompts,
                                    self.autocast, keep_encoder=bool(t.eval.every and t.eval.clip_model))
        model = create_dit(t.model, self.kl["channels"], self.latent_size, self.text.dim).to(self.d.device)
        if t.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.flops = self._flops(model) if peak_flops(self.d.device) else None
        self._setup(model)
        self.objective = Objective(t.diffusion)
        self.held_out, manifest = held_out_split(manifest, self.shards, t.eval.holdout_shards,
                                                 bool(t.eval.every and t.eval.clip_model))
        self.stream = ShardStream(self.shards, manifest, t.data, t.seed, self.d.world, self.d.rank, self.text.kinds)
        self._start(resume)
        self.evaluator, self.eval_prompts = None, None

    def _flops(self, model) -> int:
        b, c, s = self.t.data.batch_size, self.kl["channels"], self.latent_size
        x = torch.randn(b, c, s, s, device=self.d.device)
        emb, mask = self.text.prompts[0][:1].expand(b, -1, -1), self.text.prompts[1][:1].expand(b, -1)
        with self.autocast:
            return train_flops(model, x, emb, mask)

    def run_facts(self) -> dict:
        return {"kl": self.kl, "latent_size": self.latent_size, "vae": self.vae_source, "text": self.text.source,
                "shards": str(self.shards)}

    def _micro(self, batch: dict, micro: int, last: bool) -> dict:
        d, t = self.d, self.t
        gen = self._generator(micro)
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
        return {"loss": loss.item()}

    def _perf(self, steps_per_s: float) -> dict:
        values = super()._perf(steps_per_s)
        values["perf/images_per_s"] = values.pop("perf/samples_per_s")
        return values

    # -- samples, evaluation, export --------------------------------------------------------
    def _generate(self, emb, mask, steps: int, seed: int) -> torch.Tensor:
        s = self.t.sample
        with self.ema.swapped():
            return generate(self._module(), emb, mask, self.text.null, self.objective.scheduler, self.kl, self.vae,
                            (self.kl["channels"], self.latent_size, self.latent_size), sampler_name=s.sampler,
                            steps=steps, cfg=s.cfg, seed=seed, autocast=self.autocast)

    def sample_grid(self) -> Path | None:
        if not self._samples_here():
            return None
        images = self._generate(*self.text.prompts, self.t.sample.steps, self.t.sample.seed)
        return self._save_grid(grid(images)) if self.d.main else None

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
        self._record_eval(result, features=self.evaluator.feature_name)
        return result

    def _held_out(self, n: int):
        """Real images and captions of ``n`` samples of the held-out shards, decoded from their
        latent means (the images the model can at best reproduce)."""
        from training.data import read_samples

        samples = read_samples(self.shards, self.held_out, n, self.stream.members[0])
        z = torch.stack([s["latent"] for s in samples]).to(self.d.device)
        real = decode(self.vae, scale_latents(z, self.kl), self.kl)
        return real, [s["caption"] for s in samples]

    def _export(self, ema_state: dict) -> dict:
        if self.t.text.hidden_layer != -1:
            log.warning("no diffusers pipeline exported: PixArtAlphaPipeline conditions on the text encoder's "
                        "last hidden state, this run on layer %d; sample with `tapir sample`", self.t.text.hidden_layer)
            return {"pipeline": None}
        module = create_dit(self.t.model, self.kl["channels"], self.latent_size, self.text.dim)
        module.load_state_dict(ema_state)
        path = export_pipeline(self.out / "pipeline", module, self.vae, self.text.source, self.objective.scheduler,
                               self.t.sample.sampler, self.t.text.max_length)
        return {"pipeline": str(path)}


def train_diffusion(cfg: RunConfig, resume: bool = False) -> dict:
    """Train (or resume) the diffusion run of ``cfg``; return the run's summary."""
    return train(Trainer, cfg, resume)


def ray_train_diffusion(cfg: RunConfig, resume: bool, workers: int, use_gpu: bool) -> dict:
    """The same loop on a Ray cluster, one TorchTrainer worker per process."""
    return train_on_ray(Trainer, cfg, resume, workers, use_gpu, cfg.diffusion_dir)
