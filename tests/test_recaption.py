"""The recaption stage with a tiny BLIP built from a config, saved locally and loaded by
path through the auto classes; the OpenAI-compatible backend against a loopback server
that serves the same model."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_config, tapir_cmd
from PIL import Image

from pipeline import shards
from pipeline.synthweb import WebServer, build_world
from recaption.clean import degenerate


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from recaption.tiny import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="module")
def selected(local_ray, tmp_path_factory):
    """A downloaded run (12 synthetic scenes, 2 shards) with a selection that drops 2 rows."""
    from pipeline.download import download

    tmp = tmp_path_factory.mktemp("recap")
    world = build_world(12, seed=21, noisy=False)
    with WebServer(world) as server:
        urls = world.write_url_list(str(tmp / "urls.parquet"), server.base_url)
        cfg = make_config(tmp / "run", urls, "download.samples_per_shard=6")
        download(cfg)
    dropped = set()
    for sid in sorted(shards.done_shards(cfg.raw_dir)):
        keys = pq.read_table(cfg.raw_dir / f"{shards.shard_name(sid)}.parquet")["key"].to_pylist()
        keep = [i != 0 for i in range(len(keys))]
        dropped.add(keys[0])
        staging = shards.new_staging(cfg.selection_dir, sid)
        pq.write_table(pa.table({"key": keys, "keep": keep, "reason": [None if k else "rule" for k in keep]}),
                       staging / f"{shards.shard_name(sid)}.parquet")
        shards.commit(staging, cfg.selection_dir, sid, [f"{shards.shard_name(sid)}.parquet"],
                      {"count": len(keys), "kept": sum(keep)})
    return cfg, dropped


def _config(selected_cfg, out, *overrides):
    from pipeline.config import load_config

    data = selected_cfg.model_dump()
    for folder in ("raw", "selection"):
        (out / folder).parent.mkdir(parents=True, exist_ok=True)
        if not (out / folder).exists():
            os.symlink(Path(selected_cfg.output) / folder, out / folder)
    data["output"] = str(out)
    return load_config(None, list(overrides), base=data)


def _captions(cfg):
    return {r["key"]: r for sid in sorted(shards.done_shards(cfg.captions_dir))
            for r in pq.read_table(cfg.captions_dir / f"{shards.shard_name(sid)}.parquet").to_pylist()}


def test_captions_for_kept_rows_with_provenance(selected, tiny_blip, tmp_path):
    from pipeline.recaption import recaption

    base, dropped = selected
    cfg = _config(base, tmp_path, f"recaption.model={tiny_blip}", "recaption.token_counter=words",
                  "recaption.min_words=1")
    funnel = recaption(cfg)
    rows = _captions(cfg)
    assert len(rows) == 10 and not dropped & set(rows)  # only kept rows are captioned
    assert funnel["rows_in"] == 10 and funnel["captioned"] + funnel["failed"] == 10
    for r in rows.values():
        assert r["model"] == tiny_blip and r["backend"] == "transformers"
        assert (r["prompt_descriptive"], r["prompt_short"]) == ("descriptive@1", "short@1")
        assert r["alt_text"] and r["created_at"]
        if r["status"] == "ok":
            for kind in ("descriptive", "short"):
                assert degenerate(r[kind], "", 1) is None  # nothing junk is stored
            assert set(json.loads(r["generation"])) == {"descriptive", "short"}
        else:
            assert r["reason"] and (r["descriptive"] is None or r["short"] is None)
    assert any(r["status"] == "ok" for r in rows.values()), "the tiny model should caption something"
    # the report: funnel with failure reasons, caption lengths before/after, the caption grid
    from pipeline.report import report

    full, path = report(cfg.output)
    assert full["recaption"]["captioned"] == funnel["captioned"]
    assert sum(full["recaption"]["failed_by_reason"].values()) >= funnel["failed"]
    for png in ("hist_caption_lengths.png", "captions.png"):
        assert Image.open(path.parent / png).size[0] > 100
    assert "captions.png" in (path.parent / "index.html").read_text()


def test_degenerate_output_is_retried_then_recorded_failed(selected, tiny_blip, tmp_path):
    from pipeline.recaption import recaption

    base, _ = selected
    # two new tokens can never make the three words a caption needs: every attempt is degenerate
    cfg = _config(base, tmp_path, f"recaption.model={tiny_blip}", "recaption.max_new_tokens=2",
                  "recaption.token_counter=words", "recaption.min_words=3")
    funnel = recaption(cfg)
    rows = _captions(cfg)
    attempts = 1 + len(cfg.recaption.retry_sampling)
    assert funnel["captioned"] == 0 and funnel["failed"] == 10
    for r in rows.values():
        assert r["status"] == "failed" and r["descriptive"] is None and r["short"] is None
        assert r["descriptive_attempts"] == r["short_attempts"] == attempts
        assert "descriptive: " in r["reason"] and f"after {attempts} attempts" in r["reason"]
        assert r["descriptive_raw"] is not None  # what the model said is kept for inspection


def test_resume_after_kill_gives_same_captions(selected, tiny_blip, tmp_path):
    from pipeline.recaption import recaption

    base, _ = selected
    args = [f"recaption.model={tiny_blip}", "recaption.token_counter=words", "recaption.min_words=1",
            "recaption.retry_sampling=[]", "recaption.actors=1", "recaption.batch_size=2"]
    reference = _config(base, tmp_path / "ref", *args)
    recaption(reference)
    killed = _config(base, tmp_path / "killed", *args)
    path = tmp_path / "recap.yaml"
    path.write_text(killed.model_dump_json())
    proc = subprocess.Popen(tapir_cmd("recaption", path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (killed.captions_dir.exists() and shards.done_shards(killed.captions_dir)):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(shards.done_shards(killed.captions_dir)) == 1
    resumed = subprocess.run(tapir_cmd("recaption", path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, got = _captions(reference), _captions(killed)
    assert ref.keys() == got.keys()
    for key in ref:
        for col in ("descriptive", "short", "status", "reason", "descriptive_raw", "short_raw"):
            assert ref[key][col] == got[key][col], (key, col)


@pytest.fixture(scope="module")
def images():
    world = build_world(4, seed=5, noisy=False)
    import io

    return [Image.open(io.BytesIO(world.resources[r["path"]].body)).convert("RGB") for r in world.rows]


def test_openai_backend_matches_local_model(tiny_blip, images):
    from recaption.backends import OpenAICaptioner, TransformersCaptioner
    from recaption.server import CaptionServer

    local = TransformersCaptioner(tiny_blip, device="cpu", max_new_tokens=12)
    local.setup()
    expected = local.generate(images, ["describe"] * 4, [""] * 4, {})
    with CaptionServer(tiny_blip) as server:
        client = OpenAICaptioner(server.base_url, "tiny", concurrency=2, timeout=10, retries=0, max_new_tokens=12)
        client.setup()
        got = client.generate(images, ["describe"] * 4, [""] * 4, {})
    assert [t for t, _, _ in got] == [t for t, _, _ in expected]
    assert all(err is None for _, _, err in got)


@pytest.mark.parametrize("fault,expect_ok", [
    ({"fail_first": 2}, True),    # 503 twice, then answers: retried with backoff
    ({"drop_first": 1}, True),    # connection dropped without an answer: retried
    ({"fail_first": 10}, False),  # keeps failing: the rows record the server's error
    ({"delay": 1.5}, False),      # slower than the client's timeout on every attempt
])
def test_openai_backend_faults(tiny_blip, images, fault, expect_ok):
    from recaption.backends import OpenAICaptioner
    from recaption.server import CaptionServer

    with CaptionServer(tiny_blip, **fault) as server:
        client = OpenAICaptioner(server.base_url, "tiny", concurrency=1, timeout=0.5, retries=2, backoff=0.05,
                                 max_new_tokens=8)
        client.setup()
        started = time.perf_counter()
        [(text, _, error)] = client.generate(images[:1], ["describe"], [""], {})
        elapsed = time.perf_counter() - started
    if expect_ok:
        assert error is None and text is not None
    else:
        assert text is None and error.startswith("server: gave up after 3 attempts")
    assert elapsed < 10


def test_recaption_stage_over_openai_backend(selected, tiny_blip, tmp_path):
    from pipeline.recaption import recaption
    from recaption.server import CaptionServer

    base, _ = selected
    with CaptionServer(tiny_blip, fail_first=1) as server:
        cfg = _config(base, tmp_path, "recaption.backend=openai", f"recaption.base_url={server.base_url}",
                      "recaption.model=tiny-blip", "recaption.token_counter=words", "recaption.min_words=1",
                      "recaption.backoff=0.05", "recaption.actors=1")
        funnel = recaption(cfg)
    rows = _captions(cfg)
    assert len(rows) == 10 and funnel["rows_in"] == 10
    assert all(r["backend"] == "openai" and r["model"] == "tiny-blip" for r in rows.values())
    assert any(r["status"] == "ok" for r in rows.values())
