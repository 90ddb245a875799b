"""FLOPs of DiT models at 256 px (32x32x4 latents), counted, not timed: what MFU divides by.

Counts one forward pass at batch 1 with ``torch.utils.flop_counter.FlopCounterMode`` (which
counts a multiply-add as 2 FLOPs) for diffusers' class-conditional ``DiTTransformer2DModel``
at DiT-XL/2's configuration (the paper's model) and for Tapir's text-conditioned DiTs
(``PixArtTransformer2DModel`` with cross-attention to 120 T5-XXL tokens, as PixArt-alpha),
and a training step (forward and backward, about 3x the forward) as the trainer counts it.
The DiT paper lists 118.6 GFLOPs for XL/2 at 256 px; the ratio printed says whether that
figure counts multiply-adds (ratio ~2) or FLOPs (ratio ~1). Runs on the CPU in a minute.

    python bench/flops.py
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(fn, *args, **kwargs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def main() -> None:
    from diffusers import DiTTransformer2DModel

    from training.models import DIT_SIZES, create_dit, forward, train_flops

    x = torch.randn(1, 4, 32, 32)
    dit = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    paper = forward_flops(dit, x, timestep=torch.tensor([500]), class_labels=torch.tensor([1]))
    print(f"DiT-XL/2 (diffusers DiTTransformer2DModel), forward, batch 1: {paper / 1e9:.1f} GFLOPs counted; "
          f"the paper's 118.6 -> ratio {paper / 1e9 / 118.6:.2f}")
    text, mask = torch.randn(1, 120, 4096), torch.ones(1, 120, dtype=torch.long)
    for name in ("S/2", "B/2", "L/2", "XL/2"):
        model = create_dit(name, 4, 32, 4096)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        fwd = forward_flops(forward, model, x, torch.tensor([500]), text, mask)
        step = train_flops(model, x, text, mask)
        print(f"tapir {name:5s} ({DIT_SIZES[name]['num_layers']} layers, {params:.0f}M params, T5-XXL text): "
              f"forward {fwd / 1e9:.1f} GFLOPs, training step {step / 1e9:.1f} GFLOPs per image")


if __name__ == "__main__":
    main()
