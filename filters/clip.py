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
import os

import pyarrow as pa

from pipeline.schemas import EMBEDDING, SCORER_SCHEMAS

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_clip(model: str, pretrained: str | None = None, device: str = "cpu"):
    """(model in eval mode, image preprocess, tokenizer) through open_clip's own loaders. A
    ``local-dir:`` folder or a checkpoint file on an object store (``local-dir:s3://...``) is
    copied to a temporary local folder for open_clip, then removed."""
    import open_clip

    from pipeline import storage

    remote = model[len("local-dir:"):] if model.startswith("local-dir:") else None
    if remote and storage.is_remote(remote):
        with storage.local_copy(remote) as folder:
            return load_clip(f"local-dir:{folder}", pretrained, device)
    if pretrained and storage.is_remote(pretrained):
        with storage.local_copy(pretrained) as path:
            return load_clip(model, str(path), device)
    if model.startswith(("local-dir:", "hf-hub:")):
        net, preprocess = open_clip.create_model_from_pretrained(model, device=device)
    else:
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    tokenizer = open_clip.get_tokenizer(model)
    return net.eval(), preprocess, tokenizer


def _one_line(err: BaseException) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 400 else text[:400] + "..."


def check_clip(model: str, pretrained: str | None = None) -> str | None:
    """Resolve what :func:`load_clip` will load without building the model, on the driver
    before any work; return the weights file (None for random weights).

    An unknown model name, a missing ``local-dir:`` folder or weights file, an unknown
    pretrained tag, or weights that are neither cached nor downloadable (no network, or
    ``HF_HUB_OFFLINE=1`` and not in the Hugging Face cache) raise
    :class:`pipeline.config.ModelLoadError` naming ``score.clip.model`` or
    ``score.clip.pretrained``. Weights are fetched through open_clip's own resolver, so a
    download happens once here and the actors find them cached.
    """
    import difflib
    import json

    import open_clip
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf, get_pretrained_cfg

    from pipeline.config import ModelLoadError

    def fail(key: str, value: str, reason: str):
        raise ModelLoadError(key, value, reason)

    from pipeline import storage

    if model.startswith("local-dir:"):
        folder = storage.path(model[len("local-dir:"):])  # a local folder or a URL (copied locally to load)
        if not folder.is_dir():
            fail("score.clip.model", model, f"folder {folder} does not exist")
        try:
            config = json.loads((folder / "open_clip_config.json").read_text())
            config["model_cfg"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail("score.clip.model", model, f"no valid open_clip_config.json with a model_cfg in {folder} "
                 f"({_one_line(e)})")
        weights = sorted(p for ext in ("safetensors", "bin", "pth") for p in folder.glob(f"*.{ext}"))
        if not weights:
            fail("score.clip.model", model, f"no weights file (*.safetensors, *.bin, *.pth) in {folder}")
        return str(weights[0])
    if model.startswith("hf-hub:"):
        repo = model[len("hf-hub:"):]
        try:
            download_pretrained_from_hf(repo, filename="open_clip_config.json")
            return download_pretrained_from_hf(repo)
        except Exception as e:  # offline and not cached, no such repo, no network: the reason is the message
            fail("score.clip.model", model, _offline_hint(_one_line(e)))
    name = model.replace("/", "-")  # as open_clip looks names up
    if open_clip.get_model_config(name) is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        fail("score.clip.model", model, "not an open_clip model name" +
             (f" (did you mean {', '.join(close)}?)" if close else "; see open_clip.list_models()"))
    if not pretrained:
        return None
    tag = get_pretrained_cfg(name, pretrained)
    if not tag:
        if storage.path(pretrained).is_file():  # a local or remote checkpoint file
            return pretrained
        tags = open_clip.list_pretrained_tags_by_model(name)
        fail("score.clip.pretrained", pretrained, f"neither a pretrained tag of {model} "
             f"(known: {', '.join(tags) or 'none'}) nor an existing checkpoint file")
    try:
        return download_pretrained(tag)
    except Exception as e:
        fail("score.clip.pretrained", pretrained, _offline_hint(f"weights of {model} not available: {_one_line(e)}"))


def _offline_hint(reason: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return reason + " (HF_HUB_OFFLINE is set and they are not in the Hugging Face cache)"
    return reason


class ClipScorer:
    """Image-caption cosine similarity and the image embedding, batched on one device."""

    name = "clip"
    schema = SCORER_SCHEMAS["clip"]  # after setup: the embedding as a fixed-size list of the model's width

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
        self.schema = pa.schema([("clip_score", pa.float32()), (EMBEDDING, pa.list_(pa.float16(), self.dim))])

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
        return {"clip_score": scores.cpu().tolist(), EMBEDDING: list(img.half().cpu().numpy())}


TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_local_clip(folder, model_cfg: dict, state_dict: dict) -> str:
    """Write an open_clip ``local-dir:`` folder (``open_clip_config.json`` and
    ``open_clip_model.safetensors``) and return its identifier for :func:`load_clip`."""
    import json
    from pathlib import Path

    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
    }, indent=2))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder.resolve()}"


def save_local_clip(folder, model_cfg: dict | None = None, seed: int = 0) -> str:
    """Build an open_clip model from a config (random weights, seeded), save it as an
    open_clip ``local-dir:`` folder and return that identifier. The demo and the tests
    load it through ``load_clip``, the same path as a pretrained model."""
    import open_clip
    import torch

    cfg = model_cfg or TINY_CLIP
    torch.manual_seed(seed)
    return write_local_clip(folder, cfg, open_clip.CLIP(**cfg).state_dict())
