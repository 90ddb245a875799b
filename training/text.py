"""Text conditioning: a frozen text encoder run online, or the shards' pre-computed embeddings.

The unconditional input of classifier-free guidance is the encoder's embedding of the empty
caption (as SD and PixArt's pipelines encode the empty negative prompt), so an exported
pipeline samples exactly as training conditioned. With pre-computed embeddings the encoder is
loaded once at start to embed that empty caption and the fixed sample prompts, then freed:
the training steps run with no text encoder in memory.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from training.config import TextConditionConfig

log = logging.getLogger(__name__)


class TextEncoder:
    """A loaded tokenizer + encoder; ``encode`` gives (hidden states (N, T, E), mask (N, T))."""

    def __init__(self, model: str, subfolder: str | None, tokenizer_subfolder: str | None, max_length: int,
                 hidden_layer: int, device: str, autocast=None):
        from pipeline.encoders import load_text_encoder, text_dim

        self.tokenizer, self.model = load_text_encoder(model, subfolder, tokenizer_subfolder)
        self.model = self.model.to(device).requires_grad_(False)
        self.name, self.subfolder, self.tokenizer_subfolder = model, subfolder, tokenizer_subfolder
        self.max_length, self.hidden_layer, self.device = max_length, hidden_layer, device
        self.dim = text_dim(self.model.config)
        self.autocast = autocast or contextlib.nullcontext()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        with self.autocast:
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=self.hidden_layer != -1)
        hidden = out.last_hidden_state if self.hidden_layer == -1 else out.hidden_states[self.hidden_layer]
        return hidden.float(), mask


def precomputed_kinds(cfg: TextConditionConfig, manifest: dict, kinds: list[str]) -> list[str] | None:
    """The caption kinds to read embeddings for, or None to encode online (see ``precomputed``)."""
    rec = manifest["encoders"].get("text")
    stored = set((manifest.get("captions") or {}).get("text_embedding") or [])
    reasons = []
    if rec is None:
        reasons.append("the shards hold no text embeddings (build.text.model)")
    else:
        if not set(kinds) <= stored:
            reasons.append(f"they hold kinds {sorted(stored)}, the blend draws {sorted(kinds)}")
        if cfg.encoder and (cfg.encoder, cfg.subfolder) != (rec["model"], rec.get("subfolder")):
            reasons.append(f"they were encoded by {rec['model']}, this run's encoder is {cfg.encoder}")
        if rec.get("max_length") != cfg.max_length or rec.get("hidden_layer", -1) != cfg.hidden_layer:
            reasons.append(f"their max_length/hidden_layer {rec.get('max_length')}/{rec.get('hidden_layer', -1)} "
                           f"differ from {cfg.max_length}/{cfg.hidden_layer}")
    if cfg.precomputed == "never" or (reasons and cfg.precomputed == "auto"):
        if reasons and rec is not None:
            log.info("encoding captions online: %s", "; ".join(reasons))
        return None
    if reasons:
        raise ValueError("text.precomputed is 'always' but the shards' embeddings cannot be used: "
                         + "; ".join(reasons))
    return list(kinds)


class TextConditioner:
    """Embeddings for training batches and prompts, with the null (empty-caption) embedding."""

    def __init__(self, cfg: TextConditionConfig, manifest: dict, kinds: list[str], device: str,
                 prompts: list[str], autocast=None, keep_encoder: bool = False):
        rec = manifest["encoders"].get("text") or {}
        self.kinds = precomputed_kinds(cfg, manifest, kinds)
        model = cfg.encoder or rec.get("model")
        if model is None:
            raise ValueError("no text encoder: set train_diffusion.text.encoder (a Hugging Face id or folder), "
                             "or build shards with build.text.model")
        sub = cfg.subfolder if cfg.encoder else rec.get("subfolder")
        tok_sub = cfg.tokenizer_subfolder if cfg.encoder else None
        encoder = TextEncoder(model, sub, tok_sub, cfg.max_length, cfg.hidden_layer, device, autocast)
        self.source = {"model": model, "subfolder": sub, "tokenizer_subfolder": tok_sub}
        self.dim = encoder.dim
        self.null = encoder.encode([""])
        self.prompts = encoder.encode(prompts)
        # pre-computed: free the encoder, unless evaluation needs it for held-out prompts
        self.encoder = None if self.kinds is not None and not keep_encoder else encoder
        log.info("text conditioning: %s (%s)", model,
                 f"pre-computed embeddings of {self.kinds}" if self.kinds is not None else "encoded online")

    def batch(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, mask) of a training batch; dropped captions get the null embedding."""
        if self.kinds is None:
            return self.encoder.encode(batch["caption"])  # a dropped caption is "" already
        emb, mask = batch["text_emb"].to(device), batch["text_mask"].to(device)
        drop = batch["drop"].to(device)
        emb = torch.where(drop[:, None, None], self.null[0], emb)
        mask = torch.where(drop[:, None], self.null[1], mask)
        return emb, mask

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder is None:
            raise RuntimeError("the text encoder was freed (pre-computed embeddings)")
        return self.encoder.encode(texts)
