"""Aesthetic score: a small head over the stored CLIP image embeddings (LAION's predictors).

Two weight formats are read, told apart by their state-dict keys:

- the *improved aesthetic predictor* (christophschuhmann/improved-aesthetic-predictor,
  ``sac+logos+ava1-l14-linearMSE.pth``): an MLP ``layers.0 .. layers.7``,
  Linear(d, 1024) - Dropout - Linear(1024, 128) - Dropout - Linear(128, 64) - Dropout -
  Linear(64, 16) - Linear(16, 1); any ``layers.N`` Linear stack of that shape is accepted;
- the *linear* head of LAION-Aesthetics v1 (``sa_0_4_vit_l_14_linear.pth``): one
  Linear(d, 1), keys ``weight`` and ``bias``.

Both read the L2-normalised CLIP image embedding, as they were trained. Weights come from a
path or URL (``.safetensors``, or a ``.pth`` loaded with ``torch.load(weights_only=True)``:
no pickle runs). The head runs on the embeddings ``scores/NNNNN.parquet`` already holds,
so no image is decoded again and no CLIP model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.schemas import EMBEDDING, SCORER_SCHEMAS

KEY = "score.aesthetic.weights"
_LAYER = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


def load_state_dict(weights: str) -> dict:
    """The tensors of a ``.safetensors`` or ``.pth`` file (local path or fsspec URL)."""
    import torch

    with storage.local_copy(weights) as path:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a state dict of tensors")
    return state


def build_head(state: dict):
    """The ``torch.nn`` head the state dict's keys describe, weights loaded, in eval mode."""
    import torch.nn as nn

    if set(state) == {"weight", "bias"}:
        out, dim = state["weight"].shape
        head = nn.Linear(dim, out)
    else:
        found = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
        if not found or any(not _LAYER.match(k) for k in state):
            raise ValueError(f"unrecognised keys {sorted(state)[:6]}: expected 'weight'/'bias' (linear head) or "
                             "'layers.N.weight'/'layers.N.bias' (the improved aesthetic predictor's MLP)")
        modules = []
        for i in range(max(found) + 1):  # Linear where the keys are, Dropout (identity in eval) between
            if i in found:
                out, dim = state[f"layers.{i}.weight"].shape
                modules.append(nn.Linear(dim, out))
            else:
                modules.append(nn.Dropout(0.0))
        head = nn.Sequential()
        head.layers = nn.Sequential(*modules)
    head.load_state_dict(state, strict=True)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    for a, b in zip(linears, linears[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"layer shapes do not chain: {a.out_features} outputs into {b.in_features} inputs")
    if linears[-1].out_features != 1:
        raise ValueError(f"the head gives {linears[-1].out_features} outputs; an aesthetic score is one")
    return head.eval().float()


def head_input_dim(head) -> int:
    import torch.nn as nn

    return next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features


_DIGESTS: dict = {}


def weights_digest(weights: str) -> str:
    """sha256 of the weights file: part of the score fingerprint, so new weights under the
    same name are seen. Read once per file and process (a local file rewritten is read again)."""
    key = storage.url(weights)
    if not storage.is_remote(weights):
        st = storage.path(weights).stat()
        key = (key, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with storage.open_read(weights) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def clip_embed_dim(model: str) -> int | None:
    """The image-embedding width an open_clip model name or ``local-dir:`` gives (None when
    it cannot be told without loading it)."""
    import open_clip

    if model.startswith("local-dir:"):
        try:
            cfg = json.loads((storage.path(model[len("local-dir:"):]) / "open_clip_config.json").read_text())
            return int(cfg["model_cfg"]["embed_dim"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    cfg = None if model.startswith("hf-hub:") else open_clip.get_model_config(model.replace("/", "-"))
    return int(cfg["embed_dim"]) if cfg else None


def check_aesthetic(weights: str, clip_model: str) -> None:
    """Load the head on the driver before any work; a missing file, unknown keys or an input
    width that is not the CLIP model's raise :class:`pipeline.config.ModelLoadError`."""
    from pipeline.config import ModelLoadError

    try:
        head = build_head(load_state_dict(weights))
    except Exception as e:  # missing, unreadable, pickled objects refused, wrong keys: the reason is the message
        raise ModelLoadError(KEY, weights, " ".join(f"{type(e).__name__}: {e}".split())[:400]) from None
    want = clip_embed_dim(clip_model)
    if want is not None and head_input_dim(head) != want:
        raise ModelLoadError(KEY, weights, f"the head reads {head_input_dim(head)}-d embeddings; score.clip.model "
                             f"{clip_model} gives {want}-d")


_HEADS: dict = {}  # (weights, digest) -> head: loaded once per process


class AestheticScorer:
    """``aesthetic_score`` for a score table from its ``clip_embedding`` column (null where the
    embedding is null: a row that could not be scored)."""

    name = "aesthetic"
    schema = SCORER_SCHEMAS["aesthetic"]

    def __init__(self, weights: str):
        self.weights = weights

    def setup(self) -> None:
        key = (storage.url(self.weights), weights_digest(self.weights))
        if key not in _HEADS:
            _HEADS[key] = build_head(load_state_dict(self.weights))
        self.head = _HEADS[key]

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, d) CLIP image embeddings -> (N,) scores (each embedding L2-normalised first)."""
        import torch

        x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
        x = torch.nn.functional.normalize(x, dim=-1)
        with torch.no_grad():
            return self.head(x)[:, 0].numpy()

    def __call__(self, table: pa.Table) -> pa.Table:
        """``table`` with its ``aesthetic_score`` column set (replaced when present)."""
        if "aesthetic_score" in table.column_names:
            table = table.drop_columns(["aesthetic_score"])
        col = table[EMBEDDING].combine_chunks() if EMBEDDING in table.column_names else None
        if col is None:
            raise ValueError("the score shard has no clip_embedding column (the aesthetic head needs the clip scorer)")
        values = np.full(table.num_rows, np.nan, dtype=np.float32)
        valid = np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), dtype=bool)
        if valid.any():
            emb = np.stack(col.filter(pc.is_valid(col)).to_numpy(zero_copy_only=False))
            values[valid] = self.score(emb)
        field = self.schema.field("aesthetic_score")
        return table.append_column(field, pa.array(values, type=field.type, mask=~valid))
