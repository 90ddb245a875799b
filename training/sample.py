"""Sampling from a diffusion run, sample grids, and export as a diffusers pipeline folder.

``tapir sample RUN --prompt ... --steps N --cfg S --seed K`` loads the run's newest checkpoint
(EMA weights), samples with a diffusers scheduler and classifier-free guidance, decodes with
the run's autoencoder and writes a grid PNG. ``export_pipeline`` writes a
``PixArtAlphaPipeline`` folder (transformer, VAE, text encoder, tokenizer, scheduler) that
``diffusers.DiffusionPipeline.from_pretrained`` loads. That pipeline divides latents by the
VAE's scaling factor but ignores a shift factor: a non-zero shift is folded into the exported
VAE's ``post_quant_conv`` bias (exact: that layer is a 1x1 convolution applied first).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from training.objectives import sample_latents, sampler


def load_vae(model: str, subfolder: str | None, device: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model, **({"subfolder": subfolder} if subfolder else {})).eval().to(device)


def scale_latents(z: torch.Tensor, kl: dict) -> torch.Tensor:
    """Unscaled autoencoder latents -> the model's space: (z - shift) * scale."""
    return (z - (kl.get("shift_factor") or 0.0)) * kl["scaling_factor"]


@torch.no_grad()
def decode(vae, latents: torch.Tensor, kl: dict) -> torch.Tensor:
    """Model-space latents -> uint8 images (N, 3, H, W)."""
    z = latents / kl["scaling_factor"] + (kl.get("shift_factor") or 0.0)
    x = vae.decode(z.to(next(vae.parameters()).dtype)).sample.float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def grid(images: torch.Tensor, nrow: int | None = None):
    """uint8 (N, 3, H, W) -> one PIL image, ``nrow`` per row (default: about square)."""
    from PIL import Image
    from torchvision.utils import make_grid

    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(images)))))
    g = make_grid(images, nrow=nrow, padding=2, pad_value=255)
    return Image.fromarray(g.permute(1, 2, 0).numpy())


def generate(model, text_emb, text_mask, null, train_sched, kl: dict, vae, latent_shape: tuple, *,
             sampler_name: str, steps: int, cfg: float, seed: int, autocast=None) -> torch.Tensor:
    """uint8 images (N, 3, H, W) for N prompt embeddings; the same seed gives the same images."""
    device = text_emb.device
    sched = sampler(sampler_name, train_sched, steps)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        lat = sample_latents(model, sched, text_emb, text_mask, null[0], null[1],
                             (len(text_emb), *latent_shape), cfg, gen, autocast or contextlib.nullcontext())
    finally:
        model.train(was_training)
    return decode(vae, lat, kl)


def export_pipeline(folder: Path, transformer, vae, text_source: dict, train_sched, sampler_name: str,
                    max_length: int) -> Path:
    """Write a PixArtAlphaPipeline folder; return its path. Sample it with
    ``max_sequence_length=max_length`` (recorded in ``tapir_export.json``) and
    ``clean_caption=False``, as training encoded captions."""
    import copy

    import diffusers
    from diffusers import PixArtAlphaPipeline

    from pipeline.encoders import load_text_encoder
    from training.objectives import SAMPLERS

    tokenizer, text_encoder = load_text_encoder(text_source["model"], text_source.get("subfolder"),
                                                text_source.get("tokenizer_subfolder"))
    vae = copy.deepcopy(vae).float().cpu()
    shift = vae.config.get("shift_factor") or 0.0
    if shift:
        if vae.post_quant_conv is None:
            raise ValueError("this VAE has a shift factor and no post_quant_conv: PixArtAlphaPipeline, which "
                             "ignores shift factors, cannot decode its latents; sample with `tapir sample`")
        with torch.no_grad():  # post_quant_conv(z' + shift) = W z' + (b + shift * sum_in W)
            vae.post_quant_conv.bias += shift * vae.post_quant_conv.weight.sum(dim=(1, 2, 3))
        vae.register_to_config(shift_factor=None)
    sched = getattr(diffusers, SAMPLERS[sampler_name]).from_config(train_sched.config)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               transformer=transformer.cpu().float(), scheduler=sched)
    pipe.save_pretrained(folder, safe_serialization=True)
    (Path(folder) / "tapir_export.json").write_text(json.dumps(
        {"max_sequence_length": max_length, "clean_caption": False, "use_resolution_binning": False,
         "height": transformer.config.sample_size * vae_scale(vae), "width": transformer.config.sample_size *
         vae_scale(vae), "text_encoder": text_source}, indent=1))
    return Path(folder)


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_sampler(run_dir: Path, checkpoint: Path | None = None, device: str = "auto"):
    """A callable ``(prompts, steps=None, cfg=None, seed=0, sampler_name=None) -> uint8 images
    (N, 3, H, W)`` over a run folder's newest (or a given) checkpoint's EMA weights, decoded
    through the run's VAE; and the checkpoint's path."""
    from filters.clip import pick_device
    from pipeline.config import RunConfig
    from training import checkpoint as ckpt
    from training.models import create_dit
    from training.objectives import train_scheduler
    from training.text import TextEncoder

    run_dir = Path(run_dir)
    facts = json.loads((run_dir / "run.json").read_text())
    t = RunConfig.model_validate(facts["config"]).train_diffusion
    device = pick_device(device)
    path = checkpoint or ckpt.latest(run_dir / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}")
    kl = facts["kl"]
    text = TextEncoder(facts["text"]["model"], facts["text"]["subfolder"], facts["text"]["tokenizer_subfolder"],
                       t.text.max_length, t.text.hidden_layer, device)
    model = create_dit(t.model, kl["channels"], facts["latent_size"], text.dim)
    model.load_state_dict(ckpt.load_weights(path, "ema"))
    model.to(device)
    vae = load_vae(facts["vae"]["model"], facts["vae"]["subfolder"], device)
    null = text.encode([""])

    def sample(prompts: list[str], steps: int | None = None, cfg: float | None = None, seed: int = 0,
               sampler_name: str | None = None) -> torch.Tensor:
        emb, mask = text.encode(prompts)
        return generate(model, emb, mask, null, train_scheduler(t.diffusion), kl, vae,
                        (kl["channels"], facts["latent_size"], facts["latent_size"]),
                        sampler_name=sampler_name or t.sample.sampler, steps=steps or t.sample.steps,
                        cfg=t.sample.cfg if cfg is None else cfg, seed=seed)

    return sample, path


def sample_run(run_dir: Path, prompts: list[str], steps: int | None = None, cfg: float | None = None,
               seed: int = 0, sampler_name: str | None = None, out: Path | None = None,
               checkpoint: Path | None = None, device: str = "auto") -> Path:
    """Sample a grid from a run folder's newest (or a given) checkpoint; return the PNG's path."""
    sample, path = load_sampler(run_dir, checkpoint, device)
    images = sample(prompts, steps=steps, cfg=cfg, seed=seed, sampler_name=sampler_name)
    out = Path(out) if out else Path(run_dir) / "samples" / f"sample-{path.name}-seed{seed}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(images).save(out)
    return out
