"""The benchmarks compare like for like (issue 11, item 12): every arm runs in fresh processes of
the same layout, arms alternate their order over the repeats, and the summary's medians and
ratios are those of the runs. Benchmarks are not tests; these run them at toy sizes only to
check how they measure, not what they measure."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# bench/ holds recaption.py (and score.py, build.py...): first on sys.path it would shadow the
# recaption package for every later test, so it goes last (spawned arms need it there too)
sys.path.append(str(BENCH))

import _common  # noqa: E402


def fast_arm(spec: dict, part: int, procs: int):
    """A stand-in arm: reports the process it ran in and the thread setting it inherited."""
    def work() -> dict:
        return {"images": spec["images"] // procs, "omp": int(os.environ.get("OMP_NUM_THREADS", "0")),
                "part": part}
    return work


def other_arm(spec: dict, part: int, procs: int):
    return fast_arm(spec, part, procs)


def test_arms_run_in_fresh_processes_of_one_layout_in_alternating_order(monkeypatch, capsys):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "7")  # restored after the test
    _common.layout_env(3)
    runs = _common.compare({"a": fast_arm, "b": other_arm}, {"images": 12}, repeats=3, procs=2, threads=None)
    # alternating: a b, b a, a b
    order = sorted((r["order"], name) for name, rs in runs.items() for r in rs)
    assert [name for _, name in order] == ["a", "b", "b", "a", "a", "b"]
    pids = [p for rs in runs.values() for r in rs for p in r["pids"]]
    assert len(set(pids)) == len(pids) == 12 and os.getpid() not in pids  # fresh processes every run
    for rs in runs.values():
        for r in rs:
            assert r["images"] == 12 and r["omp"] == 2 * 3  # both processes, each with the same 3 threads
            assert r["part"] == 0 + 1  # parts 0 and 1: each process its own share
            assert r["rate"] == pytest.approx(r["images"] / r["seconds"])
    figures = _common.summarize(runs, "a", "b", 0.9, procs=2, threads=3, labels={}, load_before=0.0)
    ratios = [b["rate"] / a["rate"] for a, b in zip(runs["a"], runs["b"])]
    assert figures["ratio"]["median"] == pytest.approx(statistics.median(ratios))
    assert figures["arms"]["a"]["median"] == pytest.approx(statistics.median(r["rate"] for r in runs["a"]))
    out = capsys.readouterr().out
    assert "| ratio b / a, per repeat (goal >= 0.9) |" in out and "commit " in out and "command: python" in out
    assert "every arm 2 processes x 3 threads" in out


def test_a_failing_arm_stops_the_benchmark():
    with pytest.raises(SystemExit, match="KeyError"):
        _common.run_arm(fast_arm, {}, procs=2, threads=None)


def run_bench(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "figures.json"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--repeats", "2", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_like_for_like(figures: dict, images: int, procs: int, threads: int | None) -> None:
    runs = figures["runs"]
    assert len(runs) == 2
    for rs in runs.values():
        assert len(rs) == 2
        for r in rs:
            assert r["images"] == images and len(r["pids"]) == procs
            assert r["threads"] == [threads] * procs  # what each process's torch ran with, every arm
    assert figures["procs"] == procs and figures["threads"] == threads
    assert figures["ratio"]["min"] <= figures["ratio"]["median"] <= figures["ratio"]["max"]


@pytest.mark.slow
def test_score_bench_runs_the_stage_class_and_the_bare_model_alike(tmp_path):
    figures = run_bench("score.py", tmp_path, "--tiny", "--images", "8", "--per-shard", "4", "--batch", "4",
                        "--procs", "2", "--threads", "1")
    check_like_for_like(figures, 8, 2, 1)


@pytest.mark.slow
def test_build_bench_runs_the_stage_class_and_the_bare_model_alike(tmp_path):
    figures = run_bench("build.py", tmp_path, "--arch", "tiny", "--images", "8", "--per-shard", "4",
                        "--batch", "4", "--procs", "1", "--threads", "1")
    check_like_for_like(figures, 8, 1, 1)
    assert figures["runs"]["stage"][0]["encode_s"] > 0  # the stage's own timing, from its shard records


def test_scale_bench_data_goes_through_every_step(tmp_path, local_ray):
    """bench/scale.py's synthetic run folder is one the stages accept, at a toy size: the planner
    plans every input row, dedup marks as many rows as were planted as duplicates (exact, near,
    semantic, spread over other shards), the build plan holds the rows select kept, and the
    report's lineage breaks only where the build itself has not run."""
    import scale

    info = scale.generate(tmp_path, 1200, 300, 16, 0, 2)
    assert info["shards"] == 4 and all(info["planted"][k] == 12 for k in ("exact", "near", "semantic"))
    ctx = scale.Ctx(tmp_path, 300, 2)
    results = {name: scale.run_one(name, ctx, tmp_path) for name in scale.STEPS}
    assert results["plan"]["rows"] == 1200
    found = scale.dedup_found(tmp_path / "run" / "scores")
    assert set(found) == {"exact", "near", "semantic"}
    assert sum(found.values()) == sum(info["planted"][k] for k in ("exact", "near", "semantic"))
    kept = results["select"]["kept"]
    assert 0 < kept < 1200 and results["build_plan"]["samples"] == kept
    assert results["report"]["problems"] and all("build: shard" in p for p in results["report"]["problems"])
    assert scale.generate(tmp_path, 1200, 300, 16, 0, 2) == info  # reused, not written again


@pytest.mark.slow
def test_scale_bench_measures_each_step_in_its_own_process_and_ends_on_the_memory_ratio(tmp_path):
    out = tmp_path / "figures.json"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "scale.py"), "--small", "600", "--factor", "2",
                           "--per-shard", "200", "--steps", "dedup,select", "--repeats", "2", "--work", str(tmp_path / "w"),
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["sizes"] == [600, 1200] and set(figures["steps"]) == {"dedup", "select"}
    for step in figures["steps"].values():
        for run in (step["small"], step["large"]):
            assert run["seconds"] > 0 and run["driver_peak"] >= run["driver_base"] > 0
            assert len(run["all_seconds"]) == 2 and min(run["all_seconds"]) <= run["seconds"] <= max(run["all_seconds"])
        assert step["time_ratio"] == pytest.approx(step["large"]["seconds"] / step["small"]["seconds"])
    pids = {step[size]["pid"] for step in figures["steps"].values() for size in ("small", "large")}
    assert len(pids) == 4 and os.getpid() not in pids  # a fresh process for every step at every size
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("peak driver memory, large / small: ") and f"{figures['memory_ratio']:.3f}" in last
