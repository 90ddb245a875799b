"""The loop every Tapir trainer runs: diffusion, autoregressive and autoencoder.

A subclass builds its model and data stream, then calls ``_setup`` (DDP or FSDP wrapping, EMA,
``torch.compile``, AdamW over one or more parameter groups) and ``_start`` (resume); it supplies
``_micro`` (forward and backward of one micro-batch, returning its scalars), the grids
(``sample_grid``), ``evaluate`` and ``_export``. This class owns what must be the same in all
of them: the step loop with gradient accumulation, warm-up and clipping, EMA updates, metrics
(TensorBoard, ``metrics.jsonl``, a progress bar), atomic checkpoints with the data position,
the resume checks, and the end-of-run summary. Every random draw of a micro-batch is seeded by
(seed, step, micro-batch, rank) and the data order by (seed, epoch), so a resumed run repeats an
uninterrupted one step for step.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from training import checkpoint as ckpt
from training import distributed as D
from training.loop import EMA, Metrics, lr_lambda, peak_flops

log = logging.getLogger(__name__)


def seed_of(*parts: int) -> int:
    return hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF  # ints hash deterministically


class BaseTrainer:
    kind = "train"  # the run kind recorded in run.json (what `tapir sample` dispatches on)
    stream = None   # the ShardStream of this rank's batches, set by the subclass

    def __init__(self, cfg, t, out: Path):
        self.cfg, self.t, self.out = cfg, t, Path(out)
        self.d = D.setup(t.device)
        precision = t.precision if t.precision != "auto" else ("bf16" if self.d.device.startswith("cuda") else "fp32")
        self.autocast = torch.autocast(self.d.device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")
        self.step, self.batches = 0, 0  # optimizer steps; micro-batches read by this rank
        self.kinds: Counter = Counter()
        self.faults: list[str] = []
        self.flops = None
        torch.manual_seed(t.seed)

    def _setup(self, model: torch.nn.Module, groups=None, ema_params=None, blocks=None,
               find_unused: bool = False) -> None:
        """Wrap ``model`` (DDP, or FSDP over ``blocks``), keep an EMA, compile, and make AdamW.
        ``groups(module)``: lists of parameters, one AdamW group each, clipped on its own (default:
        one group of every trainable parameter); ``ema_params(module)``: the parameters averaged
        (default: every trainable one). Both are called on the wrapped module, whose parameters
        FSDP has replaced."""
        t = self.t
        self.model = D.wrap(model, self.d, t.distributed, blocks=blocks, find_unused=find_unused)
        inner = D.unwrap(self.model)
        self.ema = EMA(self.model, t.ema_decay, ema_params(inner) if ema_params else None)
        self.fwd = torch.compile(self.model) if t.compile else self.model
        o = t.optim
        groups = groups(inner) if groups else [[p for p in self.model.parameters() if p.requires_grad]]
        self.opt = torch.optim.AdamW([{"params": g} for g in groups], lr=o.lr, betas=o.betas,
                                     weight_decay=o.weight_decay, fused=self.d.device.startswith("cuda"))
        self.lr = lr_lambda(o, t.max_steps)

    # -- state --------------------------------------------------------------------------------
    def _data_facts(self) -> dict:
        """What the data order depends on: a resume must find the same."""
        shard_list = json.dumps(list(zip(self.stream.names, self.stream.counts))).encode()
        return {"processes": self.d.world, "batch_size": self.t.data.batch_size, "loader_workers": self.stream.workers,
                "grad_accum": self.t.optim.grad_accum, "seed": self.t.seed, "batches_per_epoch": self.stream.n_batches,
                "shards_sha256": hashlib.sha256(shard_list).hexdigest()}

    def extra_state(self) -> dict:
        """Tensors of trainer state outside the model, saved with each checkpoint (the same on every rank)."""
        return {}

    def load_extra(self, tensors: dict) -> None:
        if tensors:
            raise ValueError(f"unexpected extra state {sorted(tensors)} in the checkpoint")

    def run_facts(self) -> dict:
        """What ``tapir sample`` needs to rebuild the model, written to run.json."""
        return {}

    def _start(self, resume: bool) -> None:
        found = ckpt.latest(self.out / "checkpoints")
        if found and not resume:
            raise ValueError(f"{self.out} already holds checkpoints ({found.name}): pass --resume to continue "
                             "it, or set the trainer's output to a new folder")
        if resume and found:
            state = ckpt.load(found)
            D.load_full_state(self.model, state["model"], self.opt, state["optimizer"])
            with self.ema.swapped():
                D.load_full_state(self.model, state["ema"])
            s = state["state"]
            then, now = s["data"], self._data_facts()
            changed = [k for k in now if then.get(k) != now[k]]
            if changed:
                raise ValueError(f"{found} was saved with other {', '.join(changed)} "
                                 f"({[then.get(k) for k in changed]}, now {[now[k] for k in changed]}): "
                                 "resume with the same to continue exactly")
            self.load_extra(state["extra"])
            self.faults = s.get("faults", [])
            self.step, self.batches = s["step"], s["batches"]
            self.kinds = Counter(s.get("caption_kinds", {}))
            log.info("resumed from %s: step %d, %d batches read", found, self.step, self.batches)
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
            facts = {"kind": self.kind, "config": self.cfg.model_dump(mode="json"), **self.run_facts()}
            (self.out / "run.json").write_text(json.dumps(facts, indent=1))
        self.metrics = Metrics(self.out, self.d.main, self.step)

    # -- one optimizer step -------------------------------------------------------------------
    def _micro(self, batch: dict, micro: int, last: bool) -> dict:
        """Forward and backward of one micro-batch (loss divided by grad_accum); its scalars,
        'loss' among them."""
        raise NotImplementedError

    def _generator(self, micro: int) -> torch.Generator:
        return torch.Generator(device=self.d.device).manual_seed(seed_of(self.t.seed, self.step, micro, self.d.rank))

    def _optimizer_step(self) -> float:
        """Set the learning rate, clip each group's gradient norm, step, update the EMA; the first
        group's norm."""
        clip = self.t.optim.grad_clip
        norms = []
        for g in self.opt.param_groups:
            g["lr"] = self.t.optim.lr * self.lr(self.step)
            params = [p for p in g["params"] if p.grad is not None]
            if params:
                norms.append(torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf")))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update()
        norm = norms[0] if norms else torch.zeros(())
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _batches(self):
        """Batches forever from the saved data position (one DataLoader, workers kept)."""
        from training.data import loader

        self.stream.set_start(self.batches)
        for batch in loader(self.stream):
            self.batches += 1
            yield batch

    def fit(self) -> dict:
        from tqdm import tqdm

        t, d = self.t, self.d
        batches = self._batches()
        bar = tqdm(total=t.max_steps, initial=self.step, desc=self.kind, unit="step", disable=not d.main)
        window, tick = 0, time.perf_counter()
        while self.step < t.max_steps:
            values: list[dict] = []
            for micro in range(t.optim.grad_accum):
                batch = next(batches)
                if "kind" in batch:
                    self.kinds.update("dropped" if dr else k for k, dr in zip(batch["kind"], batch["drop"].tolist()))
                self.faults += batch["faults"]
                values.append(self._micro(batch, micro, micro == t.optim.grad_accum - 1))
            norm = self._optimizer_step()
            self.step += 1
            window += 1
            scalars = {k: sum(v[k] for v in values) / len(values) for k in values[0]}
            self.metrics.step(self.step, {**scalars, "lr": self.opt.param_groups[0]["lr"], "grad_norm": norm})
            bar.update(1)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}")
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self._log(scalars, norm, window / (time.perf_counter() - tick))
                window, tick = 0, time.perf_counter()
            if t.sample.every and self.step % t.sample.every == 0 or self.step == t.max_steps:
                self.sample_grid()
            if t.eval.every and (self.step % t.eval.every == 0 or self.step == t.max_steps):
                self.evaluate()
            if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                self.save()
        bar.close()
        return self.finish()

    def _perf(self, steps_per_s: float) -> dict:
        """Throughput scalars: samples per second over all ranks, and MFU on a known GPU."""
        t, d = self.t, self.d
        values = {"perf/samples_per_s": steps_per_s * t.data.batch_size * t.optim.grad_accum * d.world}
        if self.flops:
            values["perf/mfu"] = self.flops * steps_per_s * t.optim.grad_accum / peak_flops(d.device)
        return values

    def _log(self, scalars: dict, norm: float, steps_per_s: float) -> None:
        total = sum(self.kinds.values()) or 1
        values = {**{f"train/{k}": D.mean(v, self.d) for k, v in scalars.items()},
                  "train/lr": self.opt.param_groups[0]["lr"], "train/grad_norm": norm,
                  "data/faults": len(self.faults), **self._perf(steps_per_s),
                  **{f"captions/{k}": n / total for k, n in self.kinds.items()}}
        self.metrics.scalars(self.step, values)

    # -- samples, evaluation, checkpoints -----------------------------------------------------
    def _module(self):
        """The module to sample with: DDP's inner one (no collectives); under FSDP the sharded
        module itself, which every rank runs together."""
        return D.unwrap(self.model) if self.t.distributed == "ddp" else self.model

    def _samples_here(self) -> bool:
        """Whether this rank samples: every rank under FSDP (the sharded model runs together),
        else rank 0 alone (DDP's inner module needs no collectives)."""
        return self.d.main or (self.t.distributed == "fsdp" and self.d.world > 1)

    def _save_grid(self, image, tag: str = "samples") -> Path:
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        self.metrics.image(tag, image, self.step)
        return path

    def sample_grid(self) -> Path | None:
        return None

    def evaluate(self) -> dict:
        return {}

    def _record_eval(self, result: dict, **extra) -> None:
        self.metrics.scalars(self.step, result)
        self.metrics.record("eval.jsonl", {"step": self.step, **result, **extra})
        log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.3f}" for k, v in result.items()))

    def save(self) -> None:
        msd, osd = D.full_state(self.model, self.opt)
        with self.ema.swapped():
            esd, _ = D.full_state(self.model)
        if self.d.main:
            state = {"batches": self.batches, "epoch": self.batches / self.stream.n_batches,
                     "caption_kinds": dict(self.kinds), "faults": self.faults, "data": self._data_facts()}
            path = ckpt.save(self.out / "checkpoints", self.step, msd, esd, osd, state, self.t.keep_checkpoints,
                             self.extra_state())
            log.info("checkpoint %s", path)
        D.barrier(self.d)

    def finish(self) -> dict:
        d = self.d
        with self.ema.swapped():
            esd, _ = D.full_state(self.model)  # a collective under FSDP: every rank takes part
        summary = {"steps": self.step, "batches": self.batches, "epoch": self.batches // self.stream.n_batches,
                   "batch_in_epoch": self.batches % self.stream.n_batches,
                   "rank": d.rank, "world": d.world, "caption_kinds": dict(self.kinds),
                   "faults": self.faults, "batches_per_epoch": self.stream.n_batches}
        self.metrics.close()
        D.barrier(d)  # the last collective: rank 0 exports alone, nobody waits on it
        if d.main:
            summary.update(self._export(esd))
        (self.out / f"rank-{d.rank}.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _export(self, ema_state: dict) -> dict:
        """Rank 0 writes the run's final artefact from the EMA weights; what to add to the summary."""
        return {}


def held_out_split(manifest: dict, folder, holdout: int, needed: bool) -> tuple[list[dict], dict]:
    """(the last ``holdout`` shard entries, the manifest without them) when ``needed``, else
    ([], the manifest): evaluation compares against shards that are never trained on."""
    if not needed:
        return [], manifest
    if len(manifest["shards"]) <= holdout:
        raise ValueError(f"{folder} has {len(manifest['shards'])} shard(s): too few to hold {holdout} out "
                         "for evaluation (eval.holdout_shards)")
    return manifest["shards"][-holdout:], {**manifest, "shards": manifest["shards"][:-holdout]}


def train(trainer_cls, cfg, resume: bool = False) -> dict:
    """Train (or resume) the run of ``cfg`` with ``trainer_cls`` in this process (or in each
    process torchrun started); return the run's summary."""
    try:
        return trainer_cls(cfg, resume).fit()
    finally:
        D.cleanup()


def train_on_ray(trainer_cls, cfg, resume: bool, workers: int, use_gpu: bool, out: Path) -> dict:
    """The same loop on a Ray cluster, one TorchTrainer worker per process; rank 0's summary."""
    from pipeline import ray_backend

    config = {"trainer": f"{trainer_cls.__module__}:{trainer_cls.__qualname__}",
              "config": cfg.model_dump(mode="json"), "resume": resume}
    ray_backend.run_torch_trainer(_ray_loop, config, workers, use_gpu, cfg.resources.ray_address,
                                  cfg.resources.num_cpus)
    return json.loads((Path(out) / "rank-0.json").read_text())


def _ray_loop(config: dict) -> None:
    from pipeline.config import RunConfig

    module, name = config["trainer"].split(":")
    trainer_cls = getattr(importlib.import_module(module), name)
    summary = trainer_cls(RunConfig.model_validate(config["config"]), config["resume"]).fit()
    log.info("rank %d finished at step %d", summary["rank"], summary["steps"])
