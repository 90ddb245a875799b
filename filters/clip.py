"""CLIP score with open_clip, as DataComp and LAION compute it.

``clip_score`` is the cosine similarity between the L2-normalised image and caption
embeddings (not scaled by 100, not clamped). The normalised image embedding is stored
too (float16), for semantic dedup and later rescoring without recomputing the model.

``load_clip`` takes what a user would write: an open_clip model name with a pretrained
tag (``ViT-L-14`` + ``datacomp_xl_s13b_b90k``), a name with a local checkpoint path,
a ``local-dir:/path`` folder (``open_clip_config.json`` + weights) or an
``hf-hub:org/repo`` id.
"""

from __future__ import annotations

import logging

import pyarrow as pa

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_clip(model: str, pretrained: str | None = None, device: str = "cpu"):
    """(model in eval mode, image preprocess, tokenizer) through open_clip's own loaders."""
    import open_clip

    if model.startswith(("local-dir:", "hf-hub:")):
        net, preprocess = open_clip.create_model_from_pretrained(model, device=device)
    else:
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    tokenizer = open_clip.get_tokenizer(model)
    return net.eval(), preprocess, tokenizer


class ClipScorer:
    """Image-caption cosine similarity and the image embedding, batched on one device."""

    name = "clip"

    def __init__(self, model: str, pretrained: str | None = None, device: str = "auto", precision: str = "auto"):
        self.model_name, self.pretrained = model, pretrained
        self.device, self.precision = device, precision

    def setup(self) -> None:
        import torch

        self.device = pick_device(self.device)
        self.model, self.preprocess, self.tokenizer = load_clip(self.model_name, self.pretrained, self.device)
        if self.precision == "auto":
            self.precision = "bf16" if self.device.startswith("cuda") else "fp32"
        self.autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                                       enabled=self.precision == "bf16")
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])
        self.schema = pa.schema([("clip_score", pa.float32()), ("clip_embedding", pa.list_(pa.float16(), self.dim))])

    def prepare(self, images):
        """CPU work (resize, crop, normalise): the stage runs it ahead of the model."""
        import torch

        return torch.stack([self.preprocess(im) for im in images])

    def __call__(self, batch: dict) -> dict:
        import torch

        pixels = batch.get("clip_pixels")
        if pixels is None:
            pixels = self.prepare(batch["image"])
        tokens = self.tokenizer([c or "" for c in batch["caption"]])
        with torch.no_grad(), self.autocast:
            img = self.model.encode_image(pixels.to(self.device, non_blocking=True))
            txt = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        scores = (img * txt).sum(-1)
        return {"clip_score": scores.cpu().tolist(), "clip_embedding": list(img.half().cpu().numpy())}


TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_local_clip(folder, model_cfg: dict | None = None, seed: int = 0) -> str:
    """Build an open_clip model from a config (random weights, seeded), save it as an
    open_clip ``local-dir:`` folder and return that identifier. The demo and the tests
    load it through ``load_clip``, the same path as a pretrained model."""
    import json
    from pathlib import Path

    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model_cfg or TINY_CLIP
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
    }, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder.resolve()}"
