"""pipeline.storage and pipeline.shards on an object store: the loopback S3 server (moto), through s3fs."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline import shards, storage


def _stage(folder, sid: int, rows: int, tag: str = "a"):
    """Stage one shard (tar + parquet) the way a stage does; (staging, files, stats)."""
    staging = shards.new_staging(folder, sid)
    name = shards.shard_name(sid)
    samples = [(f"{name}{i:04d}", {"txt": f"{tag}{i}".encode(), "json": b"{}"}) for i in range(rows)]
    shards.write_tar(staging / f"{name}.tar", samples)
    shards.write_parquet(staging / f"{name}.parquet", pa.table({"key": [k for k, _ in samples]}))
    return staging, [f"{name}.tar", f"{name}.parquet"], {"rows": rows}


def test_paths_on_s3_are_remote_and_round_trip(s3):
    p = storage.path(s3) / "run" / "raw"
    assert storage.is_remote(p) and storage.local(p) is None
    assert storage.url(p) == f"{s3}/run/raw"
    assert not storage.is_remote("/tmp/x") and storage.local("/tmp/x") is not None
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"} <= set(storage.worker_env())


def test_commit_on_s3_then_done_read_and_resume(s3, tmp_path):
    folder = f"{s3}/run/raw"
    for sid in (0, 1):
        staging, files, stats = _stage(folder, sid, rows=3 + sid)
        assert not storage.is_remote(staging)  # staged locally, uploaded by the commit
        shards.commit(staging, folder, sid, files, stats, fingerprint=shards.fingerprint({"k": 1}))
        assert not staging.exists()
    assert shards.done_shards(folder) == {0, 1}
    record = shards.read_stats(folder, 1)
    assert record["rows"] == 4 and record["fingerprint"]["settings"] == {"k": 1}
    assert shards.read_tar(shards.shard_file(folder, 1, ".tar"))["000010003"]["txt"] == b"a3"
    assert shards.read_tar(shards.shard_file(folder, 1, ".tar"), keys={"000010000"}).keys() == {"000010000"}
    assert shards.read_metadata(folder).num_rows == 7
    assert storage.parquet_file(shards.shard_file(folder, 0, ".parquet")).metadata.num_rows == 3
    assert storage.read_schema(shards.shard_file(folder, 0, ".parquet")).names == ["key"]
    assert shards.record_digest(folder, 0) and shards.record_digest(folder, 7) is None
    # a settings change is found on the object store too, and --redo drops just those records
    with pytest.raises(shards.StageChanged, match="k was 1, now 2"):
        shards.stale_shards(folder, lambda sid: shards.fingerprint({"k": 2 if sid == 1 else 1}), redo=False,
                            stage="test")
    assert shards.stale_shards(folder, lambda sid: shards.fingerprint({"k": 2 if sid == 1 else 1}), redo=True,
                               stage="test") == {1}
    assert shards.done_shards(folder) == {0}


def test_an_interrupted_commit_leaves_no_record_and_a_rerun_overwrites(s3):
    folder = f"{s3}/run/scores"
    staging, files, stats = _stage(folder, 2, rows=2, tag="old")
    # the commit dies after the first data object went up (its second is missing)
    with pytest.raises(FileNotFoundError):
        shards.commit(staging, folder, 2, [files[0], "00002.missing"], stats)
    assert (storage.path(folder) / files[0]).exists()  # data objects went first...
    assert shards.done_shards(folder) == set()  # ... the record never: the shard is not done
    shards.record_failure(folder, 2, "test", "killed")
    assert shards.failed_shards(folder) == {2: "killed"}
    staging, files, stats = _stage(folder, 2, rows=2, tag="new")
    shards.commit(staging, folder, 2, files, stats)
    assert shards.done_shards(folder) == {2} and shards.failed_shards(folder) == {}
    assert not shards.failed_path(folder, 2).exists()
    assert shards.read_tar(shards.shard_file(folder, 2, ".tar"))["000020000"]["txt"] == b"new0"


def test_atomic_writes_failures_and_prune_on_s3(s3):
    folder = storage.path(f"{s3}/run/selection")
    shards.atomic_write(folder / "_summary.json", json.dumps({"rows": 5}))
    assert json.loads((folder / "_summary.json").read_text()) == {"rows": 5}
    shards.atomic_write_parquet(folder / "_plan.parquet", pa.table({"x": [1, 2]}))
    assert storage.read_parquet(folder / "_plan.parquet", columns=["x"]).column("x").to_pylist() == [1, 2]
    for sid in (3, 4):
        shards.record_failure(folder, sid, "select", f"bad {sid}")
    shards.prune_failures(folder, keep={4})
    assert shards.failed_shards(folder) == {4: "bad 4"}
    assert not list(folder.glob("*.tmp"))  # no temporary names on an object store


def test_shard_name_digits_are_read_from_an_s3_folder(s3):
    folder = f"{s3}/datacomp"
    storage.path(folder).mkdir(parents=True, exist_ok=True)
    (storage.path(folder) / "00000007_stats.json").write_text("{}")
    (storage.path(folder) / "00000007.parquet").write_bytes(b"")
    assert shards.digits(folder) == 8
    assert shards.shard_file(folder, 7, ".parquet").name == "00000007.parquet"
    assert shards.done_shards(folder) == {7}


def test_upload_and_local_copy(s3, tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"\x00weights")
    dest = storage.path(s3) / "models" / "w.bin"
    storage.upload(src, dest)
    with storage.local_copy(dest) as local:
        assert local.read_bytes() == b"\x00weights" and not storage.is_remote(local)
    with storage.open_read(dest) as f:
        assert f.read() == b"\x00weights"


def test_run_lock_on_a_url_is_exclusive_per_url(s3):
    run = f"{s3}/run"
    with shards.RunLock(run, "tapir score"):
        with pytest.raises(shards.RunLocked, match="tapir score"):
            with shards.RunLock(run, "tapir build"):
                pass
        with shards.RunLock(f"{s3}/other", "tapir build"):  # another run URL is free
            pass
    with shards.RunLock(run, "tapir build"):  # released
        pass


def test_a_subprocess_reaches_the_same_store(s3):
    """CLI subprocesses and Ray workers inherit the endpoint and keys from the environment."""
    shards.atomic_write(f"{s3}/hello.txt", "hi")
    code = f"from pipeline import storage; print(storage.path('{s3}/hello.txt').read_text())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hi"
