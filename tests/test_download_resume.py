"""Download resume against changed settings and inputs, URL-only and empty lists, and shard
tasks that hang: each run here has a server and a folder of its own."""

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_config

from pipeline import shards
from pipeline.download import download
from pipeline.synthweb import Resource, WebServer, World, build_world


def _run(tmp_path, world, server, *overrides, name="urls.parquet"):
    url_list = world.write_url_list(str(tmp_path / name), server.base_url)
    return make_config(tmp_path / "run", url_list, "download.samples_per_shard=3", *overrides)


def _with(cfg, **changes):
    """cfg with dotted keys changed (a rerun of the command with other settings)."""
    from pipeline.config import load_config

    return load_config(None, [f"{k}={v}" for k, v in changes.items()], base=cfg.model_dump(mode="json"))


def test_changed_settings_and_inputs_are_refused_naming_them(local_ray, tmp_path):
    world = build_world(7, seed=21, noisy=False)
    with WebServer(world) as server:
        cfg = _run(tmp_path, world, server)
        download(cfg)
        config_json = (cfg.raw_dir / "config.json").read_bytes()
        before = {p.name: p.read_bytes() for p in cfg.raw_dir.glob("0*")}
        for sid in shards.done_shards(cfg.raw_dir):  # every completion record says what made it
            fp = shards.read_stats(cfg.raw_dir, sid)["fingerprint"]
            assert fp["settings"]["download.samples_per_shard"] == 3 and "download.threads" not in fp["settings"]
            assert list(fp["upstream"]) == [f"raw/_input/{shards.shard_name(sid)}.parquet"]  # its planned rows
        assert json.loads((cfg.raw_dir / "_input" / "input.json").read_text())["fingerprint"]["settings"][
            "input.caption_col"] == "TEXT"

        for changes, message in [
            ({"download.samples_per_shard": 2}, "download.samples_per_shard was 3, now 2"),
            ({"download.image_size": 32}, "download.image_size was 64, now 32"),
            ({"download.encode_format": "png", "download.encode_quality": 9},
             "download.encode_format was 'jpg', now 'png'"),
            ({"input.caption_col": "null"}, "input.caption_col was 'TEXT', now None"),
        ]:
            with pytest.raises(shards.StageChanged, match=message):
                download(_with(cfg, **changes))
        assert (cfg.raw_dir / "config.json").read_bytes() == config_json  # never overwritten by a refused run
        # settings that change speed only are no change
        download(_with(cfg, **{"download.threads": 3, "download.fetch.read_deadline": 7, "download.retry_passes": 0}))
        assert {p.name: p.read_bytes() for p in cfg.raw_dir.glob("0*")} == before
        config_json = (cfg.raw_dir / "config.json").read_bytes()
        assert json.loads(config_json)["download"]["threads"] == 3
        # the input itself: one row less, same path
        pq.write_table(pq.read_table(cfg.input.path).slice(0, 6), cfg.input.path)
        with pytest.raises(shards.StageChanged, match=f"its input {tmp_path / 'urls.parquet'} changed since"):
            download(_with(cfg, **{"download.threads": 3}))
    assert (cfg.raw_dir / "config.json").read_bytes() == config_json
    assert {p.name: p.read_bytes() for p in cfg.raw_dir.glob("0*")} == before


def test_redo_reads_a_changed_input_and_reshards(local_ray, tmp_path):
    world = build_world(7, seed=22, noisy=False)
    with WebServer(world) as server:
        cfg = _run(tmp_path, world, server)
        download(cfg)
        assert sorted(shards.done_shards(cfg.raw_dir)) == [0, 1, 2]
        (cfg.raw_dir / "00002_failed.json").write_text("{}")  # a failure recorded under the old sharding
        table = world.table(server.base_url)
        pq.write_table(table.slice(1, 5), cfg.input.path)  # rows 1..5 now, 4 per shard
        redo = _with(cfg, **{"download.samples_per_shard": 4, "redo": "true"})
        funnel = download(redo)
        assert funnel["rows_in"] == funnel["rows_out"] == funnel["succeeded"] == 5 and funnel["lineage_ok"]
        assert sorted(shards.done_shards(cfg.raw_dir)) == [0, 1]
        assert not list(cfg.raw_dir.glob("00002*"))  # the old third shard is gone, files and all
        meta = shards.read_metadata(cfg.raw_dir).to_pylist()
        assert sorted(r["row_id"] for r in meta) == [1, 2, 3, 4, 5]
        assert json.loads((cfg.raw_dir / "config.json").read_text())["download"]["samples_per_shard"] == 4
        # the same settings again, without --redo: nothing to refuse, nothing redone
        before = {p.name: p.read_bytes() for p in cfg.raw_dir.glob("0*")}
        download(_with(redo, redo="false"))
    assert {p.name: p.read_bytes() for p in cfg.raw_dir.glob("0*")} == before


def test_url_only_lists_download_with_null_captions(local_ray, tmp_path):
    world = build_world(4, seed=23, noisy=False)
    with WebServer(world) as server:
        urls = [server.base_url + r["path"] for r in world.rows]
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "a.txt").write_text("\n".join(urls[:2]) + "\n")  # one URL per line, no header
        pq.write_table(pa.table({"url": urls[2:]}), tmp_path / "in" / "b.parquet")  # a url column only
        cfg = make_config(tmp_path / "run", tmp_path / "in", "input.preset=null", "input.caption_col=null")
        funnel = download(cfg)
    assert funnel["succeeded"] == 4
    meta = shards.read_metadata(cfg.raw_dir).to_pylist()
    assert sorted(r["url"] for r in meta) == sorted(urls) and all(r["caption"] is None for r in meta)


def test_a_hanging_shard_is_cancelled_and_recorded_as_failed(local_ray, tmp_path):
    world = build_world(2, seed=24, noisy=False)
    world.resources["/hang.jpg"] = Resource(delay=1e9)  # never answers
    rows = world.rows + [dict(world.rows[0], path="/hang.jpg", row_id=2)]
    world = World(rows, world.resources)
    with WebServer(world) as server:
        # a per-URL deadline and socket timeout far away: only the shard's timeout can end it
        cfg = _run(tmp_path, world, server, "download.samples_per_shard=2", "download.fetch.read_deadline=600",
                   "download.timeout=600")
        start = time.monotonic()
        funnel = download(cfg, shard_timeout=10)
    assert time.monotonic() - start < 120
    assert sorted(shards.done_shards(cfg.raw_dir)) == [0]
    assert "within 10s" in funnel["failed_shards"]["1"]
    assert "within 10s" in shards.failed_shards(cfg.raw_dir)[1]


def test_trial_run_then_the_rest_then_extend_fetches_each_row_once(local_ray, tmp_path):
    """--max-shards plans part of the input, a plain rerun the rest; rows appended to the file and a
    new file are then downloaded with --extend as new shards, and nothing before is fetched again."""
    world = build_world(10, seed=25, noisy=False)
    with WebServer(world) as server:
        table = world.table(server.base_url)
        (tmp_path / "in").mkdir()
        pq.write_table(table.slice(0, 4), tmp_path / "in" / "a.parquet")
        cfg = make_config(tmp_path / "run", tmp_path / "in", "download.samples_per_shard=3", "download.retry_passes=0")
        funnel = download(_with(cfg, **{"download.max_shards": 1}))
        assert funnel["shards"] == 1 and funnel["rows_in"] == funnel["rows_out"] == 3 and not funnel["complete"]
        funnel = download(cfg)
        assert funnel["rows_in"] == funnel["rows_out"] == 4 and funnel["complete"]
        before = {p.name: p.read_bytes() for p in cfg.raw_dir.glob("0*")}
        pq.write_table(table.slice(0, 6), tmp_path / "in" / "a.parquet")  # two rows appended
        pq.write_table(table.slice(6, 4), tmp_path / "in" / "b.parquet")  # and a new file
        with pytest.raises(shards.StageChanged, match="--extend"):
            download(cfg)
        funnel = download(_with(cfg, **{"download.extend": "true"}))
        hits = dict(server.hits)
    assert funnel["rows_in"] == funnel["rows_out"] == funnel["succeeded"] == 10 and funnel["lineage_ok"]
    assert {name: (cfg.raw_dir / name).read_bytes() for name in before} == before  # old shards untouched
    assert sorted(shards.done_shards(cfg.raw_dir)) == [0, 1, 2, 3]
    assert hits == {r["path"]: 1 for r in world.rows}  # every row fetched once, in one of the three runs
    new = [r["row_id"] for sid in (2, 3) for r in pq.read_table(cfg.raw_dir / f"0000{sid}.parquet").to_pylist()]
    assert sorted(new) == [4, 5, 6, 7, 8, 9]


def test_download_to_and_from_object_storage(local_ray, s3, tmp_path):
    """The input and raw/ on the loopback S3 server: shards committed there, and a rerun resumes."""
    from pipeline import storage

    world = build_world(4, seed=26, noisy=False)
    with WebServer(world) as server:
        local = world.write_url_list(str(tmp_path / "urls.parquet"), server.base_url)
        storage.upload(local, f"{s3}/lists/urls.parquet")
        cfg = make_config(f"{s3}/run", f"{s3}/lists/*.parquet", "download.samples_per_shard=3")
        funnel = download(cfg)
        assert funnel["rows_in"] == funnel["rows_out"] == funnel["succeeded"] == 4
        assert storage.url(cfg.raw_dir) == f"{s3}/run/raw"
        assert sorted(shards.done_shards(cfg.raw_dir)) == [0, 1]
        records = {sid: shards.read_stats(cfg.raw_dir, sid)["end_time"] for sid in (0, 1)}
        meta = storage.read_parquet(shards.shard_file(cfg.raw_dir, 1, ".parquet"))
        assert meta["status"].to_pylist() == ["success"] and meta["source"].to_pylist() == ["input"]
        assert len(shards.read_tar(shards.shard_file(cfg.raw_dir, 0, ".tar"))) == 3
        download(cfg)  # done: nothing redone
    assert {sid: shards.read_stats(cfg.raw_dir, sid)["end_time"] for sid in (0, 1)} == records
