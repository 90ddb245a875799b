"""The autoregressive trainer on real shards: the CLI run and its artefacts, kill -9 and resume,
DDP and FSDP with gloo, evaluation in the loop, `tapir sample` (KV-cached equals uncached),
fingerprint refusal."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tapir_cmd

from pipeline.config import load_config
from pipeline.encoders import save_tiny_text_encoder, save_tiny_vq

FAST = ["train_ar.data.batch_size=8", "train_ar.data.shuffle_buffer=16", "train_ar.optim.lr=0.002",
        "train_ar.optim.warmup_steps=3", "train_ar.ema_decay=0.9", "train_ar.sample.every=0",
        "train_ar.sample.top_k=32", "train_ar.sample.cfg=2.0", "train_ar.log_every=4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, local_ray):
    """Shards of the real build stage: 51 samples in 4 uneven shards at 32 px, with the tokens of a
    tiny VQ model (8x8 grids of 64 codes) and tiny T5 embeddings of two caption kinds."""
    from pipeline.build import build
    from pipeline.synthweb import write_curated_run

    root = tmp_path_factory.mktemp("ar")
    write_curated_run(root / "run", 80, per_shard=20)
    models = {"vq": save_tiny_vq(root / "vq", codebook_size=64), "text": save_tiny_text_encoder(root / "text"),
              "vq_other": save_tiny_vq(root / "vq-other", seed=1, codebook_size=64)}
    cfg = load_config(None, [f"output={root / 'run'}", "build.resolution=32", "build.samples_per_shard=16",
                             "build.batch_size=16", f"build.vq.model={models['vq']}",
                             f"build.text.model={models['text']}", "resources.num_cpus=2"])
    build(cfg)
    return root, models


def _cfg(root: Path, out: str, *sets):
    return load_config(None, [f"output={root / 'run'}", f"train_ar.output={root / out}", *FAST, *sets])


def _write(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(shards):
    """One uninterrupted CLI run of 12 steps with 2 loader workers (the reference for resume)."""
    root, _ = shards
    path = _write(_cfg(root, "ref", "train_ar.max_steps=12", "train_ar.checkpoint_every=5",
                       "train_ar.data.workers=2", "train_ar.sample.every=6"), root / "ref.yaml")
    out = subprocess.run(tapir_cmd("train-ar", path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "ref", path, out.stdout


def test_cli_run_writes_checkpoints_grids_logs_and_the_model(trained):
    run, _, stdout = trained
    assert "trained 12 steps" in stdout and "descriptive" in stdout
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == \
        ["step-00000005", "step-00000010", "step-00000012"]
    assert (run / "samples" / "step-00000006.png").exists() and (run / "samples" / "step-00000012.png").exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    losses = _losses(run)
    assert len(losses) == 12 and losses[0] > np.log(64) * 0.9  # starts near chance over 64 codes
    assert np.mean(losses[-3:]) < losses[0]
    facts = json.loads((run / "model" / "tapir_ar.json").read_text())
    assert facts["grid"] == [8, 8] and facts["model"]["codebook_size"] == 64


def test_tapir_sample_draws_a_grid_kv_cached_as_uncached(trained, tmp_path):
    from PIL import Image

    from training.ar import sample_run

    run, _, _ = trained
    png = tmp_path / "grid.png"
    # one intra-op thread on both sides: a sampled token at a near-tie must not flip with the thread
    # count (earlier in-process tests, in random order, may have changed this process's)
    out = subprocess.run(tapir_cmd("sample", run, "--prompt", "a red circle", "--prompt", "two blue squares",
                                   "--temperature", "1", "--top-k", "16", "--cfg", "3", "--seed", "5",
                                   "--out", png), capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (32 + 4, 2 * 32 + 6, 3)  # two 32 px images side by side, make_grid's 2 px padding
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        uncached = sample_run(run, ["a red circle", "two blue squares"], temperature=1, top_k=16, cfg=3, seed=5,
                              out=tmp_path / "uncached.png", use_cache=False)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(image, np.asarray(Image.open(uncached).convert("RGB")))


def test_kill_9_then_resume_repeats_the_uninterrupted_losses(trained, tmp_path):
    ref, path, _ = trained
    data = yaml.safe_load(path.read_text())
    data["train_ar"]["output"] = str(tmp_path / "killed")
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    # the run kills itself (its process group: DataLoader workers too) right after its step-5 checkpoint:
    # a deterministic point, no polling race
    proc = subprocess.Popen(tapir_cmd("train-ar", cfg_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, TAPIR_KILL_AFTER_CHECKPOINT="5"))
    assert proc.wait(timeout=240) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "checkpoints" / "step-00000012").exists()
    out = subprocess.run(tapir_cmd("train-ar", cfg_path, "--resume"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _losses(tmp_path / "killed") == _losses(ref)  # exactly, step for step


def _torchrun(root: Path, kind: str) -> Path:
    run = root / kind
    if (run / "rank-1.json").exists():
        return run
    path = _write(_cfg(root, kind, "train_ar.max_steps=8", "train_ar.checkpoint_every=4",
                       "train_ar.data.batch_size=4", "train_ar.data.workers=1", "train_ar.sample.every=4",
                       f"train_ar.distributed={kind}"), root / f"{kind}.yaml")
    from test_train_diffusion import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "pipeline.cli", "train-ar", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    return run


def test_fsdp_trains_and_samples_like_ddp_across_two_processes(shards):
    from safetensors.torch import load_file

    root, _ = shards
    ddp, fsdp = _torchrun(root, "ddp"), _torchrun(root, "fsdp")
    for run in (ddp, fsdp):
        ranks = [json.loads((run / f"rank-{r}.json").read_text()) for r in (0, 1)]
        assert [(r["world"], r["steps"], r["batches_per_epoch"]) for r in ranks] == [(2, 8, 6)] * 2
        assert (run / "samples" / "step-00000004.png").exists()
    assert np.allclose(_losses(fsdp), _losses(ddp), rtol=1e-3, atol=1e-4)
    mine, theirs = load_file(fsdp / "model" / "model.safetensors"), load_file(ddp / "model" / "model.safetensors")
    assert mine.keys() == theirs.keys()
    assert all(torch.allclose(mine[k], theirs[k], rtol=1e-3, atol=1e-5) for k in mine)


def test_evaluation_in_the_loop_logs_clip_score_and_frechet_distance(shards):
    from filters.clip import save_local_clip
    from training.ar import train_ar

    root, _ = shards
    clip = save_local_clip(root / "clip")
    train_ar(_cfg(root, "eval", "train_ar.max_steps=4", "train_ar.data.workers=0", "train_ar.eval.every=2",
                  f"train_ar.eval.clip_model={clip}", "train_ar.eval.samples=6"))
    rows = [json.loads(line) for line in (root / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(0 <= r["eval/clip_score"] <= 100 and r["eval/frechet"] >= 0 for r in rows)
    summary = json.loads((root / "eval" / "rank-0.json").read_text())
    assert summary["batches_per_epoch"] == (13 + 16 + 16) // 8  # the last shard (6 samples) is held out


def test_tokens_from_another_vq_model_are_refused_naming_the_shard(shards):
    from pipeline.manifest import FingerprintMismatch
    from training.ar import train_ar

    root, models = shards
    with pytest.raises(FingerprintMismatch, match=r"shard 00000\.tar in .* was encoded by VQModel .*vq-other"):
        train_ar(_cfg(root, "refused", "train_ar.max_steps=1", f"train_ar.vq={models['vq_other']}"))


@pytest.mark.slow  # ~90 s; the diffusion trainer's twin test runs the same launch code (BaseTrainer) by default
def test_ray_train_runs_the_same_loop_as_torchrun(shards):
    """TorchTrainer with two CPU workers on the local Ray: the per-step losses of the two-process
    torchrun DDP run (same seed, data split and world size)."""
    from training.ar import ray_train_ar

    root, _ = shards
    ddp = _torchrun(root, "ddp")
    cfg = _cfg(root, "ray", "train_ar.max_steps=8", "train_ar.checkpoint_every=4", "train_ar.data.batch_size=4",
               "train_ar.data.workers=1", "train_ar.sample.every=4")
    summary = ray_train_ar(cfg, resume=False, workers=2, use_gpu=False)
    assert summary["world"] == 2 and summary["steps"] == 8 and summary["model"]
    assert np.allclose(_losses(root / "ray"), _losses(ddp), rtol=1e-3, atol=1e-4)


def test_compile_and_activation_checkpointing_train_like_eager(trained):
    """torch.compile (inductor) and activation checkpointing change how a step is computed, not
    what: the first losses equal the eager reference run's."""
    from pipeline.config import RunConfig
    from training.ar import train_ar

    ref, path, _ = trained
    data = yaml.safe_load(path.read_text())
    data["train_ar"].update(output=str(ref.parent / "compiled"), max_steps=3, compile=True,
                            gradient_checkpointing=True, sample={**data["train_ar"]["sample"], "every": 0})
    train_ar(RunConfig.model_validate(data))
    assert np.allclose(_losses(ref.parent / "compiled"), _losses(ref)[:3], rtol=1e-3, atol=1e-4)
