"""Processes, devices and wrapping: one code path for one CPU, torchrun and Ray Train.

``setup`` joins the process group when several processes run (``torchrun`` sets WORLD_SIZE;
Ray Train's TorchTrainer creates the group before calling the loop), with NCCL on GPUs and
gloo on CPUs. ``wrap`` applies DDP or FSDP (``fully_shard`` per transformer block, then the
root). ``full_state`` gathers full, unsharded model and optimizer state dicts for checkpoints
through ``torch.distributed.checkpoint.state_dict``, the same call for DDP and FSDP.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Dist:
    from filters.clip import pick_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo",
                                timeout=timedelta(minutes=60))  # rank 0 writes checkpoints while others wait
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count() or 1)))
    else:
        rank, local = 0, 0
    dev = pick_device(device)
    if dev == "cuda" or (dev.startswith("cuda") and world > 1):
        dev = f"cuda:{local}"
        torch.cuda.set_device(dev)
    return Dist(rank, world, local, dev)


def wrap(model: torch.nn.Module, d: Dist, kind: str, blocks=None, find_unused: bool = False) -> torch.nn.Module:
    """DDP, or FSDP2 with ``fully_shard`` on each of ``blocks`` (default: the model's
    ``transformer_blocks``) and then the root. ``find_unused``: DDP tolerates parameters that a
    backward does not reach (a GAN's generator and discriminator passes)."""
    if d.world == 1:
        return model
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in (model.transformer_blocks if blocks is None else blocks):
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(d.device).index] if d.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)      # DDP


def no_sync(model: torch.nn.Module, skip: bool):
    """DDP's no_sync for micro-batches before the last of an accumulation (FSDP: plain context)."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def full_state(model: torch.nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # copies: on a CPU the returned tensors are the live parameters, which an EMA swap rewrites
    msd = {k: v.detach().clone() for k, v in get_model_state_dict(model, options=opts).items()}
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_full_state(model: torch.nn.Module, msd: dict, optimizer=None, osd: dict | None = None) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, msd, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, osd, options=opts)


def mean(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
