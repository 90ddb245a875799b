"""The download stage on the synthetic web, in-process with a local Ray."""

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from conftest import make_config
from PIL import Image

from pipeline import shards
from pipeline.download import RETRYABLE, classify, download
from pipeline.report import report


@pytest.fixture(scope="module")
def own_web(world, tmp_path_factory):
    """A server of its own: flaky URLs must not have been fetched by other tests."""
    from pipeline.synthweb import WebServer

    with WebServer(world) as server:
        yield world.write_url_list(str(tmp_path_factory.mktemp("own") / "urls.parquet"), server.base_url)


@pytest.fixture(scope="module")
def run(local_ray, own_web, tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("run"), own_web)
    return cfg, download(cfg)


def test_every_row_gets_its_intended_fate(run, world):
    cfg, funnel = run
    meta = shards.read_metadata(cfg.raw_dir)
    rows = meta.to_pylist()
    assert len(rows) == len(world.rows) == funnel["rows_in"] == funnel["rows_out"]
    assert len({r["key"] for r in rows}) == len(rows)
    by_id = {r["row_id"]: r for r in rows}  # carried through from the input
    assert sorted(by_id) == [r["row_id"] for r in world.rows]
    wrong = [(r["kind"], r["fate"], by_id[r["row_id"]]["error_reason"], by_id[r["row_id"]]["error_message"])
             for r in world.rows if by_id[r["row_id"]]["error_reason"] != r["fate"]]
    assert not wrong, wrong
    for r in rows:
        assert (r["status"] == "success") == (r["error_reason"] == "success")
        if r["status"] != "success":
            assert r["error_message"], r


def test_retry_passes_record_attempts(run):
    cfg, _ = run
    rows = shards.read_metadata(cfg.raw_dir).to_pylist()
    flaky = [r for r in rows if r["kind"] == "flaky_503"]
    assert flaky and all(r["status"] == "success" and r["attempts"] == 2 for r in flaky)
    for r in rows:
        if r["error_reason"] in RETRYABLE:
            assert r["attempts"] == 1 + cfg.download.retry_passes, r
        elif r["kind"] not in ("flaky_503",):
            assert r["attempts"] == 1, r


def test_shards_read_back_with_webdataset(run):
    cfg, funnel = run
    tars = sorted(str(p) for p in cfg.raw_dir.glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert len(samples) == funnel["succeeded"]
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and meta["status"] == "success"
        assert s["txt"].decode() == (meta["caption"] or "")
        img = Image.open(io.BytesIO(s["jpg"]))
        assert min(img.size) == 64  # keep_ratio: the shorter side is resized to image_size
    for sid in shards.done_shards(cfg.raw_dir):
        stats = shards.read_stats(cfg.raw_dir, sid)
        assert stats["count"] == stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"]
        assert sum(stats["reasons"].values()) == stats["count"]


def test_report_writes_the_funnel(run):
    cfg, funnel = run
    out, path = report(Path(cfg.output))
    on_disk = json.loads(path.read_text())["download"]
    assert on_disk["lineage_ok"] and on_disk["rows_in"] == funnel["rows_in"]
    assert on_disk["failed_by_reason"]["http_404"] >= 1
    assert on_disk["succeeded"] + on_disk["failed"] == on_disk["rows_out"]


def test_rerun_of_a_finished_run_changes_nothing(run):
    cfg, _ = run
    before = {p.name: p.read_bytes() for p in cfg.raw_dir.glob("0*")}
    download(cfg)
    after = {p.name: p.read_bytes() for p in cfg.raw_dir.glob("0*")}
    assert before == after


def test_lost_shard_is_redone_with_same_bytes(run):
    """Deleting a shard's completion record makes a rerun redo exactly that shard."""
    cfg, _ = run
    sid = min(shards.done_shards(cfg.raw_dir))
    name = shards.shard_name(sid)
    tar_before = shards.read_tar(cfg.raw_dir / f"{name}.tar")
    shards.stats_path(cfg.raw_dir, sid).unlink()
    (cfg.raw_dir / f"{name}.tar").write_bytes(b"half-written garbage")
    download(cfg)
    tar_after = shards.read_tar(cfg.raw_dir / f"{name}.tar")
    assert {k: v["jpg"] for k, v in tar_after.items()} == {k: v["jpg"] for k, v in tar_before.items()}


def test_a_failing_task_is_reported_and_the_others_finish(local_ray):
    from pipeline.ray_backend import run_tasks

    def _fails_on_two(item):  # nested: Ray ships it by value (tests/ is not importable in workers)
        if item == 2:
            raise RuntimeError("shard 2 is broken")
        return item * 10

    results = {item: result for item, result, _ in run_tasks(_fails_on_two, [1, 2, 3], desc="t")}
    assert results[1] == 10 and results[3] == 30
    assert isinstance(results[2], Exception) and "shard 2 is broken" in str(results[2])


@pytest.mark.parametrize("status,msg,reason", [
    ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_5xx"),
    ("failed_to_download", "HTTP Error 403: Forbidden", "http_403"),
    ("failed_to_download", "<urlopen error timed out>", "timeout"),
    ("failed_to_download", "Remote end closed connection without response", "connection_error"),
    ("failed_to_download", "<urlopen error tapir-refused: private address 10.0.0.1>", "refused_address"),
    ("failed_to_download", "unknown url type: 'example.com/x.jpg'", "invalid_url"),
    ("failed_to_resize", "image too small", "too_small"),
    ("failed_to_download", "something new", "other"),
    ("success", None, "success"),
])
def test_classify(status, msg, reason):
    assert classify(status, msg) == reason
