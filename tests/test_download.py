"""The download stage on the synthetic web, in-process with a local Ray."""

import datetime
import io
import json
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import make_config
from PIL import Image
from test_fetch import RawServer, answer, continue_forever, dribble_headers, never_answer, within

from pipeline import download as download_mod
from pipeline import shards
from pipeline.download import RETRYABLE, ShardTask, classify, download, download_settings, jobs, prepare
from pipeline.fetch import FetchPolicy, install
from pipeline.report import report
from pipeline.synthweb import WebServer, build_world


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
        if r["error_reason"] == "not_an_image":  # a guess at the content, never the server's bytes
            assert r["error_message"] == "tapir:not_an_image the body looks like html", r


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


def test_lost_shard_is_redone_with_same_bytes(local_ray, tmp_path):
    """Deleting a shard's completion record makes a rerun redo exactly that shard. (A server and
    a run of its own: the shared run's flaky rows must not have been fetched before.)"""
    world = build_world(8, seed=11, noisy=False)
    with WebServer(world) as server:
        cfg = make_config(tmp_path / "run", world.write_url_list(str(tmp_path / "urls.parquet"), server.base_url),
                          "download.samples_per_shard=4")
        download(cfg)
        sid = min(shards.done_shards(cfg.raw_dir))
        name = shards.shard_name(sid)
        tar_before = shards.read_tar(cfg.raw_dir / f"{name}.tar")
        other_before = (cfg.raw_dir / "00001.tar").read_bytes()
        shards.stats_path(cfg.raw_dir, sid).unlink()
        (cfg.raw_dir / f"{name}.tar").write_bytes(b"half-written garbage")
        download(cfg)
    assert shards.read_tar(cfg.raw_dir / f"{name}.tar") == tar_before
    assert (cfg.raw_dir / "00001.tar").read_bytes() == other_before


def test_a_failing_task_is_reported_and_the_others_finish(local_ray):
    from pipeline.ray_backend import run_tasks

    def _fails_on_two(item):  # nested: Ray ships it by value (tests/ is not importable in workers)
        if item == 2:
            raise RuntimeError("shard 2 is broken")
        return item * 10

    results = {item: result for item, result, _ in run_tasks(_fails_on_two, [1, 2, 3], desc="t")}
    assert results[1] == 10 and results[3] == 30
    assert isinstance(results[2], Exception) and "shard 2 is broken" in str(results[2])


def test_a_hanging_task_is_cancelled_at_its_timeout(local_ray):
    from pipeline.ray_backend import TaskTimeout, run_tasks

    def _hangs_on_two(item):
        if item == 2:
            time.sleep(10_000)
        return item * 10

    start = time.monotonic()
    results = {item: result for item, result, _ in run_tasks(_hangs_on_two, [1, 2, 3], desc="t", timeout=5)}
    assert time.monotonic() - start < 60
    assert results[1] == 10 and results[3] == 30
    assert isinstance(results[2], TaskTimeout) and "within 5s" in str(results[2])


@pytest.mark.parametrize("status,msg,reason", [
    ("failed_to_download", "tapir:http_5xx HTTP Error 503 ('Service Unavailable')", "http_5xx"),
    ("failed_to_download", "tapir:http_404 HTTP Error 404 ('timeout')", "http_404"),
    ("failed_to_download", "tapir:http_403 HTTP Error 403 ('tapir:timeout')", "http_403"),
    ("failed_to_download", "tapir:timeout not done within the 30s deadline", "timeout"),
    ("failed_to_download", "tapir:refused_address private address 10.0.0.1", "refused_address"),
    ("failed_to_download", "unknown url type: 'example.com/x.jpg'", "invalid_url"),  # img2dataset's own
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "opt_out"),
    ("failed_to_resize", "image too small", "too_small"),
    ("failed_to_download", "HTTP Error 404: timeout", "other"),  # an untagged message is never parsed for words
    ("failed_to_download", "Connection reset by peer, timed out", "other"),
    ("success", None, "success"),
])
def test_classify(status, msg, reason):
    assert classify(status, msg) == reason


# -- rows from hostile servers, through img2dataset's own fetch function -------------------


@pytest.fixture
def hardened():
    """The hardened opener installed as a download worker installs it (restored afterwards)."""
    saved = urllib.request._opener
    install(FetchPolicy(allow_loopback=True, deadline=2.0))
    yield
    urllib.request.install_opener(saved)


def _row(url, timeout=30):
    from img2dataset.downloader import download_image

    _, stream, err = download_image((0, url), timeout, "tapir", {"noai"})
    return classify("success" if err is None else "failed_to_download", err), err


@pytest.mark.parametrize("status_line,reason", [
    (b"HTTP/1.1 404 timeout", "http_404"),
    (b"HTTP/1.1 503 Not Found", "http_5xx"),
    (b"HTTP/1.1 500 Connection reset", "http_5xx"),
    (b"HTTP/1.1 410 image too small", "http_410"),
])
def test_row_class_comes_from_the_status_code_not_the_phrase(hardened, status_line, reason):
    with RawServer(answer(status_line, b"<html>nope</html>")) as server:
        got, err = _row(server.url())
    assert got == reason, err
    assert (got in RETRYABLE) == reason.startswith("http_5")


@pytest.mark.parametrize("behave", [continue_forever, dribble_headers, never_answer])
def test_hostile_servers_end_as_timeout_rows(hardened, behave):
    with RawServer(behave) as server:
        (reason, err), took = within(2.0 + 3.0, lambda: _row(server.url()))  # socket timeout 30 s: the deadline ends it
    assert reason == "timeout", err


@pytest.mark.parametrize("body,looks", [
    (b"<!DOCTYPE html><html><body>" + b"secret" * 10, "html"),
    (b'{"error": "token abc123"}', "json"),
    (b"%PDF-1.7 ...", "pdf"),
    (b"\x1f\x8b\x08\x00" + bytes(range(40)), "gzip"),
    (b"<?xml version='1.0'?><rss/>", "xml"),
    (b"just words here", "text"),
    (bytes(range(256)), "binary data"),
    (b"", "empty"),
])
def test_non_image_bodies_are_named_not_copied(body, looks):
    cfg = make_config("/tmp/unused", "/tmp/unused.parquet")
    *_, err = download_mod._guarded_resizer(cfg, 10**8)(io.BytesIO(body))
    assert err == f"tapir:not_an_image the body looks like {looks}"
    assert classify("failed_to_resize", err) == "not_an_image"


# -- every planned row is accounted for ----------------------------------------------------


def _one_shard_in_process(cfg):
    """Plan and download shard 0 in this process (no Ray), as a download worker does."""
    saved = urllib.request._opener
    try:
        todo = list(jobs(cfg, prepare(cfg)))  # the whole plan (raw/_input/input.json then counts its rows)
        sid = todo[0][0]
        ShardTask(cfg.model_dump(), download_settings(cfg))(todo[0])
    finally:
        urllib.request.install_opener(saved)
    return pq.read_table(cfg.raw_dir / f"{shards.shard_name(sid)}.parquet").to_pylist()


def test_rows_img2dataset_drops_are_recorded_as_lost_and_retried(local_ray, tmp_path, monkeypatch):
    world = build_world(6, seed=12, noisy=False)
    bad = world.resources[world.rows[2]["path"]].body
    real = download_mod._guarded_resizer

    def raising_resizer(cfg, max_pixels):  # a resizer that raises (img2dataset then drops the row)
        inner = real(cfg, max_pixels)

        def resize(img_stream, bbox_list=None):
            if img_stream.getvalue() == bad:
                raise RuntimeError("resizer bug")
            return inner(img_stream, bbox_list)
        return resize

    with WebServer(world) as server:
        cfg = make_config(tmp_path / "run", world.write_url_list(str(tmp_path / "urls.parquet"), server.base_url),
                          "download.samples_per_shard=10", "download.retry_passes=0")
        monkeypatch.setattr(download_mod, "_guarded_resizer", raising_resizer)
        rows = _one_shard_in_process(cfg)
        monkeypatch.undo()
        assert len(rows) == 6
        lost = [r for r in rows if r["error_reason"] == "lost"]
        assert [r["row_id"] for r in lost] == [2] and lost[0]["status"] == "failed_to_download"
        assert lost[0]["url"] == server.base_url + world.rows[2]["path"]  # the input row, whole
        # the stage's funnel fails while the row stays lost ...
        funnel = download_mod._funnel(cfg, {}, set())
        assert funnel["lost_rows"] == 1 and "1 row(s)" in funnel["failed_shards"]["0"]
        assert funnel["rows_out"] == funnel["rows_in"] == 6
        # ... and a rerun fetches it again, even with no retry passes configured (the resizer works now)
        funnel = download(cfg)
    assert "failed_shards" not in funnel and funnel["lost_rows"] == 0
    row = [r for r in shards.read_metadata(cfg.raw_dir).to_pylist() if r["row_id"] == 2][0]
    assert row["status"] == "success" and row["attempts"] == 2


def test_rows_with_a_date_column_are_kept(tmp_path):
    """img2dataset's writer json-dumps each successful row's metadata; a date column made that raise
    and the row vanished without a record."""
    world = build_world(3, seed=13, noisy=False)
    with WebServer(world) as server:
        table = world.table(server.base_url)
        table = table.append_column("published", pa.array([datetime.date(2020, 1, i + 1) for i in range(3)]))
        pq.write_table(table, tmp_path / "urls.parquet")
        rows = _one_shard_in_process(make_config(tmp_path / "run", tmp_path / "urls.parquet"))
    assert [r["status"] for r in rows] == ["success"] * 3
    assert [r["published"] for r in rows] == [datetime.date(2020, 1, i + 1) for i in range(3)]


# -- several inputs, face blurring, input hashes, 8-digit shards ---------------------------


def _checkerboard_png() -> bytes:
    import numpy as np

    cells = (np.indices((64, 64)) // 8).sum(axis=0) % 2
    buf = io.BytesIO()
    Image.fromarray((cells * 255).astype("uint8")).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed(local_ray, tmp_path_factory):
    """Two inputs in one run: a DataComp-like parquet (face boxes, sha256) and a LAION-like csv.gz."""
    import hashlib

    import pyarrow.csv as pcsv

    from pipeline.config import load_config
    from pipeline.synthweb import Resource, World

    from conftest import FAST

    world = build_world(6, seed=14, noisy=False)
    sharp = _checkerboard_png()
    world = World(world.rows, {**world.resources, "/sharp.png": Resource(sharp, content_type="image/png")})
    tmp = tmp_path_factory.mktemp("mixed")
    with WebServer(world) as server:
        url = [server.base_url + r["path"] for r in world.rows]
        box = [[0.375, 0.375, 0.625, 0.625]]
        pq.write_table(pa.table({
            "uid": ["blurred", "plain", "wrong_hash", "no_hash"],
            "url": [server.base_url + "/sharp.png"] * 2 + url[:2],
            "text": ["a", "b", "c", "d"],
            "face_bboxes": [box, None, None, box[:0]],
            "sha256": [hashlib.sha256(sharp).hexdigest()] * 2 + ["00" * 32, None],
        }), tmp / "datacomp.parquet")
        laion = world.table(server.base_url).slice(2, 4).select(["URL", "TEXT", "row_id"])
        pcsv.write_csv(laion, tmp / "laion.csv")
        with open(tmp / "laion.csv", "rb") as src, pa.CompressedOutputStream(str(tmp / "laion.csv.gz"), "gzip") as dst:
            dst.write(src.read())
        inputs = [{"name": "datacomp", "path": str(tmp / "*.parquet"), "preset": "datacomp"},
                  {"name": "laion", "path": str(tmp / "laion.csv.gz"), "preset": "laion"}]
        cfg = load_config(None, [o for o in FAST if not o.startswith("input.")] + [
            "download.samples_per_shard=3", "download.shard_digits=8", "download.blur_bbox_col=face_bboxes",
            "download.resize_mode='no'", "download.encode_format=png", "download.encode_quality=9",
            "download.retry_passes=0"], base={"output": str(tmp / "run"), "input": inputs})
        funnel = download(cfg)
    return cfg, funnel, shards.read_metadata(cfg.raw_dir).to_pylist()


def test_two_sources_mix_with_distinct_keys_and_a_source_tag(mixed):
    cfg, funnel, rows = mixed
    assert funnel["rows_in"] == funnel["rows_out"] == 8 and funnel["lineage_ok"]
    assert sorted(p.name for p in cfg.raw_dir.glob("*.tar")) == [f"{i:08d}.tar" for i in range(4)]
    assert len({r["key"] for r in rows}) == 8 and all(len(r["key"]) == 8 + 1 for r in rows)
    by_source = {s: sorted(r["key"][:8] for r in rows if r["source"] == s) for s in ("datacomp", "laion")}
    assert by_source == {"datacomp": ["00000000"] * 3 + ["00000001"], "laion": ["00000002"] * 3 + ["00000003"]}
    for sid in range(4):  # the source reaches each sample's json too
        for key, sample in shards.read_tar(shards.shard_file(cfg.raw_dir, sid, ".tar")).items():
            assert json.loads(sample["json"])["source"] == ("datacomp" if sid < 2 else "laion")


def test_input_hash_is_kept_and_checked(mixed):
    _, _, rows = mixed
    dc = {r["uid"]: r for r in rows if r["source"] == "datacomp"}
    assert dc["wrong_hash"]["error_reason"] == "hash_mismatch" and dc["wrong_hash"]["input_sha256"] == "00" * 32
    assert dc["plain"]["status"] == "success" and dc["plain"]["input_sha256"] == dc["plain"]["sha256"]
    assert dc["no_hash"]["status"] == "success" and dc["no_hash"]["input_sha256"] is None  # nothing to check


def test_a_face_box_is_blurred(mixed):
    import numpy as np

    cfg, _, rows = mixed
    keys = {r["uid"]: r["key"] for r in rows if r["source"] == "datacomp"}
    tar = shards.read_tar(shards.shard_file(cfg.raw_dir, 0, ".tar"))
    blurred, plain = (np.asarray(Image.open(io.BytesIO(tar[keys[k]]["png"]))).astype(int) for k in ("blurred", "plain"))
    assert blurred.shape == plain.shape == (64, 64, 3)
    assert np.abs(blurred[24:40, 24:40] - plain[24:40, 24:40]).mean() > 20  # the box: smoothed edges
    outside = np.ones((64, 64), bool)
    outside[14:50, 14:50] = False
    assert (blurred[outside] == plain[outside]).all()  # the rest: untouched
