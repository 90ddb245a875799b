"""The autoregressive text-to-image model: transformers' ``LlamaForCausalLM`` over a text prefix and VQ codes.

Reference: Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation"
(LlamaGen, 2024): a decoder-only Llama over a prefix of projected text-encoder token embeddings
followed by the image's VQ codes in raster order, trained with next-token cross-entropy and sampled
with classifier-free guidance on the logits. The LLM's ``embed_tokens`` embeds codes and its
``lm_head`` predicts them; Llama's 1D RoPE runs over the whole sequence, and learned row and column
embeddings add the 2D position of each code. Shapes, for a batch of B, T text tokens of width E, an
(h, w) grid of N = h*w codes from a codebook of V, width D:

    prefix = text_proj(text) * mask          # (B, T, D)     from (B, T, E); padding zeroed and masked out
    codes  = embed(tokens[:, :-1]) + pos2d   # (B, N-1, D)   row_embed(i // w) + col_embed(i % w)
    x      = llama([prefix, codes])          # (B, T+N-1, D) causal; position T-1+i predicts code i
    logits = lm_head(x[:, T-1:])             # (B, N, V)

``sample`` decodes with a KV cache (one prefill over the prefix, then one code per step), guidance
running the conditional and unconditional (empty-caption) streams as one batch of 2B.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)


def _swiglu(width: int) -> int:
    """LlamaGen's SwiGLU width: 2/3 of 4x the model width, rounded up to a multiple of 256."""
    return 256 * math.ceil(int(8 * width / 3) / 256)


# LlamaGen's sizes (Table 1 of the paper) as LlamaConfig arguments
AR_SIZES: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 192},
    **{name: {"hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": _swiglu(d)}
       for name, d, layers, heads in [("B", 768, 12, 12), ("L", 1024, 24, 16), ("XL", 1280, 36, 20)]},
}
AR_SIZES |= {"100M": AR_SIZES["B"], "300M": AR_SIZES["L"], "700M": AR_SIZES["XL"]}


def ar_arguments(name: str) -> dict:
    """LlamaConfig arguments of a named size, or of a JSON file."""
    if name in AR_SIZES:
        return dict(AR_SIZES[name])
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return json.loads(path.read_text())
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(AR_SIZES)} or a JSON file of "
                     "LlamaConfig arguments")


class ARTransformer(torch.nn.Module):
    """LlamaGen's text-to-image transformer for an (h, w) ``grid`` of codes from ``codebook_size`` codes,
    conditioned on ``text_len`` text-encoder tokens of width ``text_dim``."""

    def __init__(self, size: str, codebook_size: int, grid: tuple[int, int], text_dim: int, text_len: int):
        super().__init__()
        self.size, self.codebook_size, self.grid = size, codebook_size, tuple(grid)
        self.text_dim, self.text_len = text_dim, text_len
        h, w = self.grid
        config = LlamaConfig(**{**ar_arguments(size), "vocab_size": codebook_size,
                                "max_position_embeddings": text_len + h * w, "tie_word_embeddings": False,
                                "attn_implementation": "sdpa"})
        self.llm = LlamaForCausalLM(config)  # initialised as Llama: normal(0, 0.02), zero biases, unit norms
        d = config.hidden_size
        # LlamaGen's caption embedder
        self.text_proj = torch.nn.Sequential(torch.nn.Linear(text_dim, d), torch.nn.GELU(approximate="tanh"),
                                             torch.nn.Linear(d, d))
        self.row_embed, self.col_embed = torch.nn.Embedding(h, d), torch.nn.Embedding(w, d)
        with torch.no_grad():
            for linear in self.text_proj[::2]:
                torch.nn.init.normal_(linear.weight, std=config.initializer_range)
                torch.nn.init.zeros_(linear.bias)
            torch.nn.init.normal_(self.row_embed.weight, std=config.initializer_range / 2)
            torch.nn.init.normal_(self.col_embed.weight, std=config.initializer_range / 2)

    def config(self) -> dict:
        """The arguments that rebuild this model: ``ARTransformer(**model.config())``."""
        return {"size": self.size, "codebook_size": self.codebook_size, "grid": list(self.grid),
                "text_dim": self.text_dim, "text_len": self.text_len}

    def blocks(self) -> torch.nn.ModuleList:
        """The decoder layers (the units of FSDP's per-block sharding)."""
        return self.llm.model.layers

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Activation checkpointing of every decoder layer (``activation_checkpointing_enable``'s arguments;
        transformers 5 deprecates its own ``gradient_checkpointing_enable``)."""
        self.llm.activation_checkpointing_enable(**kwargs)

    def condition(self, text_emb: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The text prefix (B, T, D). Padding is zeroed as well as masked out of attention: with right padding
        position T-1 (which predicts the first code) is padding, and its own input reaches its output."""
        x = self.text_proj(text_emb)
        return x * text_mask[..., None].to(x.dtype)

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Input embeddings (B, n, D) of codes (B, n) at raster positions start .. start+n-1."""
        i = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        w = self.grid[1]
        return self.llm.model.embed_tokens(tokens) + self.row_embed(i // w) + self.col_embed(i % w)

    def hidden(self, inputs: torch.Tensor, mask: torch.Tensor, start: int = 0,
               cache: DynamicCache | None = None) -> torch.Tensor:
        """The LLM's last hidden states for ``inputs`` (B, n, D) at sequence positions start .. start+n-1;
        ``mask`` (B, start+n) covers the whole sequence so far, ``cache`` holds positions before start."""
        positions = torch.arange(start, start + inputs.shape[1], device=inputs.device)[None]
        return self.llm.model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, cache=cache,
                              use_cache=cache is not None).last_hidden_state

    def forward(self, tokens: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, N, V) of every code of ``tokens`` (B, N) given the text (B, T, E) and mask (B, T)."""
        t = text_emb.shape[1]
        x = torch.cat([self.condition(text_emb, text_mask), self.embed(tokens[:, :-1])], 1)
        mask = torch.cat([text_mask, text_mask.new_ones(tokens.shape[0], tokens.shape[1] - 1)], 1)
        return self.llm.lm_head(self.hidden(x, mask)[:, t - 1:]).float()


def loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-code cross-entropy of logits (B, N, V) against tokens (B, N)."""
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())


@torch.no_grad()
def sample(model: ARTransformer, text_emb: torch.Tensor, text_mask: torch.Tensor, null_emb: torch.Tensor,
           null_mask: torch.Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None,
           use_cache: bool = True) -> torch.Tensor:
    """Codes (B, N) for texts (B, T, E) with masks (B, T), in raster order. With ``cfg_scale`` != 1 the
    unconditional stream (``null_emb`` (1, T, E), ``null_mask`` (1, T)) runs alongside and the logits are
    guided as LlamaGen's: uncond + cfg_scale * (cond - uncond). ``temperature`` 0 is greedy; otherwise
    temperature, top-k and top-p filter the logits before a draw from ``generator``. ``use_cache=False``
    recomputes the whole sequence at every step (the reference for the cache)."""
    return _sample(model, text_emb, text_mask, null_emb, null_mask, float(cfg_scale), float(temperature), top_k,
                   top_p, generator, use_cache, guided=cfg_scale != 1.0)


def _sample(model: ARTransformer, text_emb, text_mask, null_emb, null_mask, cfg_scale, temperature, top_k, top_p,
            generator, use_cache: bool, guided: bool) -> torch.Tensor:
    """``sample``, with ``guided`` saying whether the unconditional stream runs (so tests can force it at scale 1)."""
    b, t = text_mask.shape
    if guided:
        text_emb = torch.cat([text_emb, null_emb.to(text_emb.dtype).expand(b, -1, -1)])
        text_mask = torch.cat([text_mask, null_mask.to(text_mask.dtype).expand(b, -1)])
    n = model.grid[0] * model.grid[1]
    mask = torch.cat([text_mask, text_mask.new_ones(text_mask.shape[0], n - 1)], 1)
    warpers = LogitsProcessorList(
        ([TemperatureLogitsWarper(temperature)] if temperature > 0 else [])
        + ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p is not None else []))
    training = model.training
    model.eval()
    try:
        prefix = model.condition(text_emb, text_mask)
        cache = DynamicCache(config=model.llm.config) if use_cache else None
        tokens = text_mask.new_zeros(b, 0, dtype=torch.long)
        for i in range(n):
            streams = tokens.repeat(2, 1) if guided else tokens
            if not use_cache:  # the whole sequence so far
                x, start = torch.cat([prefix, model.embed(streams)], 1), 0
            elif i == 0:  # prefill: the text prefix
                x, start = prefix, 0
            else:  # the newest code, after the cached positions
                x, start = model.embed(streams[:, -1:], i - 1), t + i - 1
            logits = model.llm.lm_head(model.hidden(x, mask[:, :t + i], start, cache)[:, -1]).float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            if temperature == 0:
                code = logits.argmax(-1, keepdim=True)
            else:
                probs = warpers(tokens, logits).softmax(-1)
                code = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, code], 1)
    finally:
        model.train(training)
    return tokens
