"""Small pieces every trainer shares: EMA, the learning-rate schedule, metrics and MFU."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from training.config import OptimConfig


class EMA:
    """Exponential moving average of a model's parameters, kept beside them (sharded like them
    under FSDP): ema <- decay * ema + (1 - decay) * param after each optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float, params: list | None = None):
        self.decay, self.model = decay, model
        self.params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self):
        """The model holds the EMA weights inside this block (for sampling, evaluation, saving)."""
        self._reshard()
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)
        try:
            yield
        finally:
            self._reshard()
            for p, s in zip(self.params, self.shadow):
                tmp = p.detach().clone()
                p.copy_(s)
                s.copy_(tmp)


    def _reshard(self) -> None:
        """FSDP keeps the root module's parameters gathered after a forward; the swap writes the
        shards, so drop the gathered copies first, or the next forward would use stale values."""
        if hasattr(self.model, "reshard"):
            self.model.reshard()


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Linear warm-up to 1, then constant or cosine down to ``min_lr_ratio`` at ``max_steps``."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# dense bf16 tensor-core peaks, FLOP/s, for MFU
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class Metrics:
    """TensorBoard scalars and a ``metrics.jsonl`` line per step (rank 0 only). On resume the
    lines past the checkpoint's step are dropped, since those steps run again."""

    def __init__(self, folder: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(folder) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        for path in (self.path, self.path.parent / "eval.jsonl"):
            if path.exists():
                keep = [line for line in path.read_text().splitlines()
                        if line and json.loads(line)["step"] <= resume_step]
                path.write_text("".join(line + "\n" for line in keep))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(folder) / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def step(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def record(self, name: str, values: dict) -> None:
        """Append one JSON line to another file of the run folder (e.g. eval.jsonl)."""
        if self.enabled:
            with open(self.path.parent / name, "a") as f:
                f.write(json.dumps(values) + "\n")

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def image(self, tag: str, grid, step: int) -> None:
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
