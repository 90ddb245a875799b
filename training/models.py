"""The text-conditioned DiT: diffusers' ``PixArtTransformer2DModel`` at DiT's sizes.

Reference: Peebles and Xie, "Scalable Diffusion Models with Transformers" (DiT, 2023), and
Chen et al., "PixArt-alpha" (2023), whose block this is: self-attention over latent patches,
cross-attention to frozen text-encoder token embeddings (projected from the encoder's width
by ``caption_projection``), an MLP, and adaLN-single timestep modulation (one shared
timestep MLP, a learned per-block shift/scale/gate table). Shapes, for a batch of N latents
(C, H, W), patch p, width D, T text tokens of width E:

    x = pos_embed(patchify(latents))        # (N, H*W/p^2, D)
    y = caption_projection(text)            # (N, T, D)   from (N, T, E)
    t = adaln_single(timestep)              # (N, 6*D)    shift/scale/gate x (attn, mlp)
    x = block(x, y, t) for each block       # (N, H*W/p^2, D)
    out = unpatchify(proj_out(x))           # (N, C, H, W)

``init_dit`` applies DiT's adaLN-Zero initialisation (the timestep modulation, every gate and
the output projection start at zero, so each block starts as the identity). Using the
diffusers class means a trained run saves as a ``PixArtAlphaPipeline`` folder that
``DiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# DiT's sizes (Table 1 of the paper), as PixArt's arguments: layers, heads, head width (D = heads x width)
DIT_SIZES = {
    "tiny": {"num_layers": 2, "num_attention_heads": 4, "attention_head_dim": 16},   # tests and the demo
    "S/2": {"num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64},   # D = 384
    "B/2": {"num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64},  # D = 768
    "L/2": {"num_layers": 24, "num_attention_heads": 16, "attention_head_dim": 64},  # D = 1024
    "XL/2": {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72},  # D = 1152
}


def dit_arguments(name: str) -> dict:
    """PixArtTransformer2DModel arguments of a named size, or of a JSON file."""
    if name in DIT_SIZES:
        return {**DIT_SIZES[name], "patch_size": 2}
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return json.loads(path.read_text())
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(DIT_SIZES)} or a JSON file of "
                     "PixArtTransformer2DModel arguments")


def create_dit(name: str, latent_channels: int, latent_size: int, text_dim: int):
    """A PixArt-style DiT for (latent_channels, latent_size, latent_size) latents and text
    embeddings of width ``text_dim``, initialised as DiT (adaLN-Zero)."""
    from diffusers import PixArtTransformer2DModel

    args = dit_arguments(name)
    width = args["num_attention_heads"] * args["attention_head_dim"]
    model = PixArtTransformer2DModel(
        in_channels=latent_channels, out_channels=latent_channels, sample_size=latent_size,
        cross_attention_dim=width, caption_channels=text_dim, use_additional_conditions=False,
        norm_type="ada_norm_single", **args)
    init_dit(model)
    return model


@torch.no_grad()
def init_dit(model) -> None:
    """DiT's initialisation: Xavier-uniform linear layers, then adaLN-Zero (zero timestep
    modulation, zero gates, zero output layer)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    torch.nn.init.normal_(model.adaln_single.emb.timestep_embedder.linear_1.weight, std=0.02)
    torch.nn.init.normal_(model.adaln_single.emb.timestep_embedder.linear_2.weight, std=0.02)
    torch.nn.init.zeros_(model.adaln_single.linear.weight)
    torch.nn.init.zeros_(model.adaln_single.linear.bias)
    for block in model.transformer_blocks:
        block.scale_shift_table[2].zero_()  # gate of attention
        block.scale_shift_table[5].zero_()  # gate of the MLP
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)


def forward(model, latents, timesteps, text, mask):
    """The model's prediction for noisy ``latents`` (N, C, H, W) at ``timesteps`` (N,) given
    text embeddings (N, T, E) and their mask (N, T); same shape as ``latents``."""
    return model(latents, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=timesteps,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def count_train_flops(loss_fn, model=None) -> int:
    """FLOPs of one training step: ``loss_fn()``'s forward and its backward, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2 FLOPs); the
    gradients of ``model`` are cleared after."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    if model is not None:
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def train_flops(model, latents, text, mask) -> int:
    """FLOPs of one DiT training step at this batch (see ``count_train_flops``)."""
    t = torch.zeros(latents.shape[0], device=latents.device)
    return count_train_flops(lambda: forward(model, latents, t, text, mask).float().square().mean(), model)
