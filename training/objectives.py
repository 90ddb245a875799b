"""Training noise, targets and loss weights, and guided sampling, through diffusers schedulers.

Epsilon prediction is DDPM's Algorithm 1 (Ho et al. 2020): t ~ U{0..T-1}, eps ~ N(0, I),
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (``DDPMScheduler.add_noise``), loss
||eps - eps_theta(x_t, t)||^2. v prediction targets v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
(``get_velocity``). Rectified flow (SD3) uses ``FlowMatchEulerDiscreteScheduler``:
x_t = (1 - sigma) x_0 + sigma eps (``scale_noise``), target eps - x_0. Sampling runs a
diffusers scheduler's ``step`` with classifier-free guidance: DDPM ancestral (Algorithm 2),
DDIM, or flow-matching Euler.
"""

from __future__ import annotations

import torch

from training.config import DiffusionObjectiveConfig
from training.models import forward


def train_scheduler(cfg: DiffusionObjectiveConfig):
    """The diffusers scheduler that defines training noise (and the sampler's config)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if cfg.objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.flow_shift)
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type="epsilon" if cfg.objective == "epsilon" else "v_prediction",
                         clip_sample=False)


class Objective:
    """Noisy inputs, targets and per-sample loss weights for one batch of clean latents."""

    def __init__(self, cfg: DiffusionObjectiveConfig):
        self.cfg = cfg
        self.scheduler = train_scheduler(cfg)

    def timesteps(self, n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps the model sees, indices into the schedule), one per sample."""
        T = self.cfg.num_train_timesteps
        if self.cfg.objective != "flow":
            idx = torch.randint(0, T, (n,), generator=generator, device=device)
            return idx, idx
        if self.cfg.timestep_sampling == "logit_normal":  # SD3's density, as diffusers.training_utils draws it
            u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
        else:
            u = torch.rand(n, generator=generator, device=device)
        idx = (u * T).long().clamp(max=T - 1)
        return self.scheduler.timesteps.to(device)[idx], idx

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, idx: torch.Tensor):
        """(x_t, target) for clean latents x0, noise and timesteps."""
        if self.cfg.objective == "flow":
            return self.scheduler.scale_noise(x0, t, noise), noise - x0
        xt = self.scheduler.add_noise(x0, noise, t)
        target = noise if self.cfg.objective == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        return xt, target

    def weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weights (None: uniform)."""
        if self.cfg.min_snr_gamma is None:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t)
        clipped = torch.minimum(snr, torch.full_like(snr, self.cfg.min_snr_gamma))
        return clipped / snr if self.cfg.objective == "epsilon" else clipped / (snr + 1)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        per_sample = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
        w = self.weights(t)
        return (per_sample * w).mean() if w is not None else per_sample.mean()


SAMPLERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "FlowMatchEulerDiscreteScheduler"}


def sampler(name: str, train_sched, steps: int):
    """A diffusers sampling scheduler configured like the training one, set to ``steps``."""
    import diffusers

    flow = type(train_sched).__name__.startswith("FlowMatch")
    if (name == "euler") != flow:
        raise ValueError(f"sampler {name!r} does not fit a model trained with {type(train_sched).__name__}: "
                         "use 'euler' for flow, 'ddpm' or 'ddim' for epsilon and v")
    sched = getattr(diffusers, SAMPLERS[name]).from_config(train_sched.config)
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample_latents(model, sched, text, mask, null_text, null_mask, shape, cfg: float,
                   generator: torch.Generator, autocast=None) -> torch.Tensor:
    """Denoise from N(0, I) with classifier-free guidance: eps = u + cfg * (c - u), where c and
    u are the model's outputs with the prompt and with the empty prompt (one batched call)."""
    import contextlib

    autocast = autocast or contextlib.nullcontext()
    device = text.device
    x = torch.randn(shape, generator=generator, device=device) * getattr(sched, "init_noise_sigma", 1.0)
    guided = cfg != 1.0
    if guided:
        n = shape[0]
        text = torch.cat([text, null_text.expand(n, -1, -1)])
        mask = torch.cat([mask, null_mask.expand(n, -1)])
    for t in sched.timesteps:
        inp = torch.cat([x, x]) if guided else x
        if hasattr(sched, "scale_model_input"):  # flow-matching Euler has none
            inp = sched.scale_model_input(inp, t)
        with autocast:
            out = forward(model, inp, t.to(device).expand(inp.shape[0]), text, mask).float()
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + cfg * (cond - uncond)
        x = sched.step(out, t, x, generator=generator).prev_sample
    return x
