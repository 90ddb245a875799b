"""`tapir` as a user runs it: subprocesses, every one under the socket guard (sitecustomize)."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import FAST, tapir_cmd

from pipeline import shards

ENV_TIMEOUT = 240


def _run(args, **kw):
    return subprocess.run(tapir_cmd(*args), capture_output=True, text=True, timeout=ENV_TIMEOUT, **kw)


def _sets(*extra):
    return [x for kv in (*FAST, *extra) for x in ("--set", kv)]


def _contents(raw: Path) -> tuple[dict, dict]:
    images, reasons = {}, {}
    for sid in sorted(shards.done_shards(raw)):
        for key, members in shards.read_tar(raw / f"{shards.shard_name(sid)}.tar").items():
            images[key] = members["jpg"]
    for row in shards.read_metadata(raw).to_pylist():
        reasons[row["key"]] = row["error_reason"]
    return images, reasons


@pytest.fixture(scope="module")
def reference_run(url_list, tmp_path_factory):
    """An uninterrupted `tapir download` from flags, img2dataset-style, 10-row shards."""
    out = tmp_path_factory.mktemp("reference")
    log = Path(os.environ["TAPIR_NETGUARD_LOG"])
    start = len(log.read_text().splitlines())
    proc = _run(["download", "--url-list", url_list, "--output", out, "--allow-loopback",
                 *_sets("download.samples_per_shard=10")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, log.read_text().splitlines()[start:]


def test_download_from_flags(reference_run, world):
    out, proc, _ = reference_run
    assert f"{len(world.rows)} rows in -> {len(world.rows)} rows recorded in 6 shards" in proc.stdout
    assert "http_404" in proc.stdout and "download:" in proc.stderr  # the funnel, and the progress bar


def test_whole_download_stays_on_loopback(reference_run):
    """Driver, Ray's dashboard and every worker ran with the guard; none tried to leave loopback."""
    _, _, lines = reference_run
    installed = [l for l in lines if " installed " in l]
    assert any("pipeline.cli" in l for l in installed), "guard missing in the driver"
    assert any("default_worker.py" in l for l in installed), "guard missing in Ray workers"
    assert any("dashboard" in l for l in installed), "guard missing in Ray's dashboard (the metadata probe)"
    assert not [l for l in lines if "VIOLATION" in l]
    workers = [l for l in installed if "default_worker.py" in l]
    assert all("--node-ip-address=127.0.0.1" in l for l in workers), "embedded Ray must bind loopback"


def test_kill_9_then_resume_matches_uninterrupted(reference_run, url_list, tmp_path):
    ref_out, _, _ = reference_run
    out = tmp_path / "killed"
    args = ["download", "--url-list", url_list, "--output", out, "--allow-loopback",
            *_sets("download.samples_per_shard=10", "resources.download_tasks=1")]
    # the command kills its own process group (driver and Ray workers) right after the second
    # shard commits: a deterministic point mid-run, no polling race
    proc = subprocess.Popen(tapir_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, TAPIR_KILL_AFTER_COMMITS="2"))
    assert proc.wait(timeout=ENV_TIMEOUT) == -signal.SIGKILL
    raw = out / "raw"
    done_at_kill = shards.done_shards(raw)
    assert 2 <= len(done_at_kill) < 6, done_at_kill
    resumed = _run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert shards.done_shards(raw) == set(range(6))
    images, reasons = _contents(raw)
    ref_images, ref_reasons = _contents(ref_out / "raw")
    assert images.keys() == ref_images.keys()
    assert images == ref_images  # same keys, same image bytes
    assert reasons == ref_reasons
    assert not list((raw / "_staging").glob("*"))


def test_bad_config_fails_before_work(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"output: {tmp_path / 'run'}\ninput: {{path: x.parquet}}\ndownload: {{treads: 4}}\n")
    proc = _run(["download", cfg])
    assert proc.returncode == 2 and "download.treads: unknown key" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_missing_input_column_fails_with_message(url_list, tmp_path):
    proc = _run(["download", "--url-list", url_list, "--output", tmp_path / "run", "--url-col", "nope"])
    assert proc.returncode == 2 and "has no column 'nope'" in proc.stderr


def test_report_command(reference_run):
    out, _, _ = reference_run
    proc = _run(["report", out])
    assert proc.returncode == 0, proc.stderr
    funnel = json.loads((out / "report" / "funnel.json").read_text())["download"]
    assert "lineage: ok: input 60 -> raw 60" in proc.stdout
    assert funnel["lineage_ok"] and f"succeeded  {funnel['succeeded']:>8}" in proc.stdout


def test_demo(tmp_path):
    proc = _run(["demo", "--output", tmp_path / "demo", "--rows", "80", "--set", "train_diffusion.max_steps=40",
                 "--set", "train_diffusion.sample.every=20", "--set", "train_diffusion.data.batch_size=8",
                 "--set", "train_autoencoder.max_steps=12", "--set", "train_autoencoder.sample.every=6",
                 "--set", "train_ar.max_steps=20", "--set", "train_ar.sample.every=10"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    funnel = json.loads((tmp_path / "demo" / "report" / "funnel.json").read_text())
    download, score, select = funnel["download"], funnel["score"], funnel["select"]
    assert download["rows_in"] == 80 and download["lineage_ok"] and download["succeeded"] > 40
    assert score["rows_in"] == download["succeeded"] == select["rows_in"]
    assert 0 < select["kept"] < select["rows_in"] and score["duplicates_by_kind"].get("exact", 0) >= 1
    assert (tmp_path / "demo" / "report" / "index.html").exists()
    assert "raw shards:" in proc.stdout and "select:" in proc.stdout
    import pyarrow.parquet as pq

    captions = [c for p in sorted((tmp_path / "demo" / "captions").glob("[0-9]*.parquet"))
                for c in pq.read_table(p, columns=["descriptive"])["descriptive"].to_pylist() if c]
    # written by the world captioner (models/world), not a random one
    assert captions and sum(c.endswith("background.") for c in captions) >= 0.8 * len(captions), captions[:5]
    recaption = funnel["recaption"]  # every kept row captioned or recorded failed, every stage's funnel checked
    assert recaption["rows_in"] == select["kept"] == recaption["captioned"] + recaption["partial"] + recaption["failed"]
    build = funnel["build"]
    assert build["rows_in"] == select["kept"] and build["written"] == build["rows_in"] - build["failed"] > 0
    lineage = funnel["lineage"]  # from input row to training sample, shard by shard
    assert lineage["ok"], lineage["problems"]
    assert lineage["counts"]["input"] == 80 and lineage["counts"]["written"] == build["written"]
    assert lineage["counts"]["kept"] == select["kept"] == lineage["counts"]["captioned"]
    assert "lineage: ok: input 80 -> raw 80" in proc.stdout
    manifest = json.loads((tmp_path / "demo" / "shards" / "manifest.json").read_text())
    assert set(manifest["encoders"]) == {"kl", "vq", "text"} and manifest["complete"]
    assert "latent_mean.npy" in manifest["members"] and "tokens.npy" in manifest["members"]
    from training import world

    runs = tmp_path / "demo" / "runs"  # the build encoded with the VQ the demo trained and the world's KL
    assert manifest["encoders"]["vq"]["model"] == str(runs / "autoencoder-vq" / "model")
    assert manifest["encoders"]["kl"]["model"] == world.models()["autoencoder"]
    assert manifest["encoders"]["kl"]["scaling_factor"] != 1.0  # measured on its training images
    assert not (runs / "autoencoder-kl").exists()
    assert (runs / "ar" / "model" / "tapir_ar.json").exists() and (runs / "ar" / "samples" / "step-00000020.png").exists()
    html = (tmp_path / "demo" / "report" / "index.html").read_text()
    assert all(f"runs/{name}" in html for name in ("autoencoder-vq", "diffusion", "ar"))
    run = tmp_path / "demo" / "runs" / "diffusion"
    assert "diffusion:" in proc.stdout and (run / "pipeline" / "model_index.json").exists()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000020.png", "step-00000040.png"]
    page = (tmp_path / "demo" / "report" / "index.html").read_text()
    assert "diffusion_loss.png" in page and (tmp_path / "demo" / "report" / "diffusion_step-00000040.png").exists()
    from training import attributes
    from training.sample import load_sampler

    sample, _ = load_sampler(run, device="cpu")  # the closed loop's measure on the demo's generator
    scored = attributes.prompt_following(sample, world.models()["attributes"], n=8, steps=4)
    assert scored["images"].shape == (8, 3, 64, 64) and set(scored["accuracy"]) == set(attributes.ATTRIBUTES)
    assert all(0 <= v <= 1 for v in scored["accuracy"].values())
    verified = _run(["verify", tmp_path / "demo" / "shards"])
    assert verified.returncode == 0 and "ok," in verified.stdout, verified.stdout + verified.stderr
