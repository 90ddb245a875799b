"""Checkpoints: safetensors only (no pickle), written aside and renamed, kept to a limit.

A checkpoint is a folder ``step-NNNNNNNN/`` holding ``model.safetensors`` and
``ema.safetensors`` (full, unsharded state dicts), ``optimizer.safetensors`` (every state
tensor, keyed ``PARAM::NAME``) and ``state.json`` (the optimizer's param groups, the step,
the data position and the run's facts). The folder is written under a temporary name and
renamed when complete, so a kill leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.shards import fsync_path

PREFIX = "step-"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for param, values in state["state"].items():
        for name, value in values.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{param}::{name}"] = t.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        param, name = key.rsplit("::", 1)
        state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": groups}


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save(folder: Path, step: int, model: dict, ema: dict, optimizer: dict, state: dict, keep: int,
         extra: dict | None = None) -> Path:
    """Write one checkpoint atomically; remove all but the newest ``keep``. ``extra``: tensors of
    trainer state outside the model (a VQ codebook's usage counters), ``extra.safetensors``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{PREFIX}{step:08d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_file(_contiguous(model), tmp / "model.safetensors")
    save_file(_contiguous(ema), tmp / "ema.safetensors")
    tensors, groups = _flatten_optimizer(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    if extra:
        save_file(_contiguous(extra), tmp / "extra.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "param_groups": groups}, indent=1))
    for f in tmp.iterdir():  # on disk before the folder appears under its final name
        fsync_path(f)
    fsync_path(tmp)
    final = folder / f"{PREFIX}{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(folder)
    for old in all_checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    if os.environ.get("TAPIR_KILL_AFTER_CHECKPOINT") == str(step):  # kill -9 tests: a deterministic point
        import signal

        os.killpg(os.getpgid(0), signal.SIGKILL)
    return final


def all_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob(f"{PREFIX}*") if p.is_dir() and (p / "state.json").exists())


def latest(folder: Path) -> Path | None:
    found = all_checkpoints(folder)
    return found[-1] if found else None


def load(path: Path) -> dict:
    """{'model', 'ema', 'optimizer', 'state', 'extra'} of a checkpoint folder (tensors on the CPU)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    extra = load_file(path / "extra.safetensors") if (path / "extra.safetensors").exists() else {}
    return {"model": load_file(path / "model.safetensors"), "ema": load_file(path / "ema.safetensors"),
            "optimizer": _unflatten_optimizer(load_file(path / "optimizer.safetensors"), state.pop("param_groups")),
            "state": state, "extra": extra}


def load_weights(path: Path, which: str = "ema") -> dict:
    return load_file(Path(path) / f"{which}.safetensors")
