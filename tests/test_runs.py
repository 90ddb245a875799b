"""One writer per run folder, durable commits, fingerprints and failure records
(pipeline.shards), literal CLI flags and a demo that never empties a folder it did not make."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import tapir_cmd

from pipeline import shards
from pipeline.cli import _load, build_parser

HOLD = """
import sys
from pipeline.shards import RunLock
with RunLock(sys.argv[1], "tapir score holder.yaml"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_command_on_a_run_folder_is_refused_and_nothing_is_touched(tmp_path):
    run = tmp_path / "run"
    staging = run / "scores" / "_staging" / "00000-abcd"
    staging.mkdir(parents=True)
    (staging / "00000.parquet").write_bytes(b"another run's work in progress")
    config = tmp_path / "c.yaml"
    config.write_text(f"output: {run}\n")
    holder = _holder(run)
    try:
        proc = subprocess.run(tapir_cmd("score", config), capture_output=True, text=True, timeout=120)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert proc.returncode == 3, proc.stderr
    assert "is in use by `tapir score holder.yaml`" in proc.stderr and "pid" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (staging / "00000.parquet").read_bytes() == b"another run's work in progress"  # not cleared


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = _holder(tmp_path)
    with pytest.raises(shards.RunLocked):
        with shards.RunLock(tmp_path):
            pass
    holder.kill()  # kill -9: no cleanup ran, the kernel drops the lock
    holder.wait(timeout=30)
    with shards.RunLock(tmp_path, "tapir next"):
        assert "tapir next" in (tmp_path / ".tapir.lock").read_text()


def test_commit_syncs_data_before_the_completion_record(tmp_path, monkeypatch):
    synced, events = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    out.mkdir()
    staging = shards.new_staging(out, 7)
    (staging / "00007.parquet").write_bytes(b"data")
    shards.commit(staging, out, 7, ["00007.parquet"], {"count": 1})
    data = str(staging / "00007.parquet")
    assert data in synced, "the data file was not fsynced"
    assert str(out) in synced, "the folder entry of the renamed file was not fsynced"
    record = [i for i, (_, b) in enumerate(events) if b.endswith("00007_stats.json")]
    assert record and events.index(("replace", str(out / "00007.parquet"))) < record[0]
    assert synced.index(data) < len(synced) - 1


def test_temp_names_are_unique_per_writer(tmp_path):
    a, b = shards.temp_name(tmp_path / "x.json"), shards.temp_name(tmp_path / "x.json")
    assert a != b and str(os.getpid()) in a.name and a.parent == tmp_path
    shards.atomic_write(tmp_path / "x.json", "{}")
    assert (tmp_path / "x.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left


def test_stale_shards_name_the_change_and_redo_only_those(tmp_path):
    def fp(model, upstream="u0"):
        return shards.fingerprint({"score.clip.model": model}, {"raw/00000": upstream})

    for sid, model in ((0, "ViT-B-32"), (1, "ViT-B-32")):
        st = shards.new_staging(tmp_path, sid)
        (st / f"{sid:05d}.parquet").write_bytes(b"x")
        shards.commit(st, tmp_path, sid, [f"{sid:05d}.parquet"], {"count": 1}, fingerprint=fp(model))
    assert shards.stale_shards(tmp_path, lambda s: fp("ViT-B-32"), redo=False, stage="score") == set()
    with pytest.raises(shards.StageChanged, match=r"score.clip.model was 'ViT-B-32', now 'ViT-L-14'.*--redo"):
        shards.stale_shards(tmp_path, lambda s: fp("ViT-L-14"), redo=False, stage="score")
    with pytest.raises(shards.StageChanged, match=r"00001.*its input raw/00000 changed since"):
        shards.stale_shards(tmp_path, lambda s: fp("ViT-B-32", "u1" if s == 1 else "u0"), redo=False, stage="score")
    assert shards.done_shards(tmp_path) == {0, 1}  # refusing changed nothing
    assert shards.stale_shards(tmp_path, lambda s: fp("ViT-B-32", "u1" if s == 1 else "u0"), redo=True,
                               stage="score") == {1}
    assert shards.done_shards(tmp_path) == {0}


def test_failure_records_until_the_shard_commits(tmp_path):
    shards.record_failure(tmp_path, 3, "score", "RuntimeError: CUDA out of memory")
    assert shards.failed_shards(tmp_path) == {3: "RuntimeError: CUDA out of memory"}
    st = shards.new_staging(tmp_path, 3)
    (st / "00003.parquet").write_bytes(b"x")
    shards.commit(st, tmp_path, 3, ["00003.parquet"], {"count": 1})
    assert shards.failed_shards(tmp_path) == {} and not (tmp_path / "00003_failed.json").exists()


def test_flags_are_literal_strings_not_yaml(tmp_path):
    out = tmp_path / "my runs #1"
    args = build_parser().parse_args(["download", "--url-list", str(tmp_path / "urls: v2.csv"), "--output", str(out),
                                      "--caption-col", "yes", "--set", "download.image_size=128"])
    cfg = _load(args)
    assert cfg.output == str(out)  # YAML would have cut it at " #"
    assert cfg.input.path == str(tmp_path / "urls: v2.csv")
    assert cfg.input.caption_col == "yes"  # YAML would have made it True
    assert cfg.download.image_size == 128  # --set still parses YAML
    assert not cfg.redo and _load(build_parser().parse_args(["select", str(_cfg(tmp_path)), "--redo"])).redo


def _cfg(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"output: {tmp_path / 'run'}\n")
    return path


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    proc = subprocess.run(tapir_cmd("demo", "--output", precious), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "not empty and was not made by `tapir demo`" in proc.stderr
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.tex"]  # not even a lock file


def test_demo_empties_only_its_own_folder(tmp_path):
    from pipeline.demo import MARK, _fresh

    own = tmp_path / "demo"
    with shards.RunLock(own):  # as demo() calls it: the lock file is in the folder first
        _fresh(own)
    (own / "raw").mkdir()
    (own / "raw" / "00000.tar").write_bytes(b"old")
    _fresh(own)
    assert sorted(p.name for p in own.iterdir()) == sorted([".tapir.lock", MARK])
    empty = tmp_path / "empty"
    empty.mkdir()
    _fresh(empty)
    assert (empty / MARK).exists()


def test_atomic_parquet_leaves_no_partial_file(tmp_path):
    path = tmp_path / "t.parquet"
    shards.atomic_write_parquet(path, pa.table({"a": [1, 2]}))
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def _stage(folder: Path, sid: int, **cols):
    folder.mkdir(parents=True, exist_ok=True)
    st = shards.new_staging(folder, sid)
    shards.write_parquet(st / f"{sid:05d}.parquet", pa.table(cols))
    shards.commit(st, folder, sid, [f"{sid:05d}.parquet"], {"count": len(next(iter(cols.values())))})


def _lineage_run(run: Path) -> None:
    import json

    (run / "raw" / "_input").mkdir(parents=True)
    (run / "raw" / "_input" / "input.json").write_text(json.dumps({"rows": 4}))
    _stage(run / "raw", 0, key=["a", "b", "c", "d"], status=["success", "success", "success", "failed_to_download"],
           error_reason=["success", "success", "success", "http_404"], attempts=[1, 1, 1, 1])
    _stage(run / "scores", 0, key=["a", "b", "c"])
    _stage(run / "selection", 0, key=["a", "b", "c"], keep=[True, True, False])
    _stage(run / "captions", 0, key=["a", "b"], status=["ok", "ok"])


def test_report_follows_every_row_from_input_to_training_sample(tmp_path):
    from pipeline.report import format_lineage, lineage

    run = tmp_path / "run"
    _lineage_run(run)
    good = lineage(run)
    assert good["ok"], good["problems"]
    assert good["counts"] == {"input": 4, "raw": 4, "downloaded": 3, "scored": 3, "selected": 3, "kept": 2,
                              "captioned": 2}
    assert format_lineage(good).startswith("lineage: ok: input 4 -> raw 4 -> downloaded 3")
    _stage(run / "captions", 0, key=["a"], status=["ok"])  # a kept row silently lost by the captioner
    _stage(run / "raw", 1, key=["e"], status=["success"], error_reason=["success"], attempts=[1])
    shards.record_failure(run / "scores", 1, "score", "RuntimeError: the CPU scorer died")
    bad = lineage(run)
    assert not bad["ok"]
    assert "recaption: shard 00000 has 1 row(s) of the stage before missing (e.g. b)" in bad["problems"]
    assert "score: shard 00001 FAILED: RuntimeError: the CPU scorer died" in bad["problems"]
    assert "download: 4 input rows, 5 recorded, 0 keys twice" in bad["problems"]


@pytest.mark.parametrize("sets, key", [
    ([], "score.clip"),  # the default CLIP's weights are not cached here, and HF_HUB_OFFLINE is set
    (["score.scorers=[basic]", "score.dedup.near=false", "score.dedup.semantic=false", "recaption.model=/nonexistent/captioner"], "recaption.model"),
    (["score.scorers=[basic]", "score.dedup.near=false", "score.dedup.semantic=false", "recaption.backend=openai", "recaption.base_url=http://127.0.0.1:9/v1",
      "build.vae.model=/nonexistent/vae"], "build.vae.model"),
])
def test_run_checks_every_model_before_the_first_stage(tmp_path, sets, key):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.jpg\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"output: {tmp_path / 'run'}\ninput: {{path: {urls}}}\n")
    args = [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(tapir_cmd("run", config, *args), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tapir: cannot load ") and f"({key}" in lines[0], lines
    assert not (tmp_path / "run" / "raw").exists()  # nothing downloaded


def test_failure_records_of_shards_no_longer_upstream_are_pruned(tmp_path):
    for sid in (1, 5):
        shards.record_failure(tmp_path, sid, "score", "boom")
    shards.prune_failures(tmp_path, {1, 2})
    assert shards.failed_shards(tmp_path) == {1: "boom"}


def test_recaption_fingerprint_follows_the_kept_rows_not_the_selection_record(tmp_path):
    from pipeline.config import load_config
    from pipeline.recaption import load_prompts, shard_fingerprint

    cfg = load_config(None, values={"output": str(tmp_path)})
    _stage(cfg.raw_dir, 0, key=["a", "b"], status=["success", "success"])
    _stage(cfg.selection_dir, 0, key=["a", "b"], keep=[True, False], reason=[None, "clip_score >= 0.2"])
    prompts = load_prompts(cfg)
    before = shard_fingerprint(cfg, prompts, 0)
    _stage(cfg.selection_dir, 0, key=["a", "b"], keep=[True, False], reason=[None, "clip_score >= 0.3"])
    assert shard_fingerprint(cfg, prompts, 0) == before  # another rule, the same kept rows: nothing to redo
    _stage(cfg.selection_dir, 0, key=["a", "b"], keep=[True, True], reason=[None, None])
    changed = shard_fingerprint(cfg, prompts, 0)
    assert changed != before and shards.explain_change(before, changed) == \
        "its input selection/00000 (kept rows) changed since"


def test_shard_digits_are_the_shortest_name_in_a_folder(tmp_path):
    """Past 10^5 shards a 5-digit folder holds 00001 and 100000: its digits are 5 whatever order
    the listing gives, and an 8-digit (DataComp) folder reads as 8."""
    from pipeline import shards

    five, eight = tmp_path / "five", tmp_path / "eight"
    five.mkdir()
    eight.mkdir()
    for name in ("100000", "100001", "100002", "00001"):  # the long names first, as a listing may give them
        (five / f"{name}_stats.json").write_text("{}")
    (eight / "00000003_stats.json").write_text("{}")
    assert shards.digits(five) == 5 and shards.shard_file(five, 1, ".parquet").name == "00001.parquet"
    assert shards.shard_file(five, 100001, ".parquet").name == "100001.parquet"
    assert shards.digits(eight) == 8 and shards.stats_path(eight, 3).exists()
