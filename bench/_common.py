"""Shared by the benchmarks: a work folder under the test socket guard, synthetic shards, and
the like-for-like harness.

The harness (:func:`compare`) runs every arm the same way: each run of an arm is ``procs``
fresh processes (spawned, so nothing is inherited but the environment) of ``threads``
OpenMP/torch threads each, given the same static share of the work (``part`` of ``procs``).
Each process sets itself up (model load, pre-decoding, warm-up: not timed), waits at a
barrier with its siblings, then does its share; the run's rate is the images done over the
span from the barrier to the last process's end. Repeats alternate the arms' order (A B,
B A, ...), and the summary prints each arm's median with its spread and the median of the
per-repeat ratios, so a ratio only ever compares runs made back to back.
"""

from __future__ import annotations

import json
import os
import queue as queues
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
GUARD = ROOT / "tests" / "netguard"


def guarded_workdir(prefix: str) -> Path:
    """A fresh temp folder; the socket guard installed here and, through PYTHONPATH and
    sitecustomize, in every process started from now on (Ray's included)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["TAPIR_NETGUARD_LOG"] = str(work / "netguard.log")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GUARD), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(GUARD))
    import tapir_netguard

    tapir_netguard.install()
    from pipeline.ray_backend import quiet_env

    quiet_env()
    return work


def violations(work: Path) -> int:
    log = work / "netguard.log"
    return sum("VIOLATION" in line for line in log.read_text().splitlines()) if log.exists() else 0


def write_shards(folder: Path, n: int, per_shard: int) -> list[tuple[bytes, str]]:
    """Synthetic scenes written as img2dataset would: NNNNN.tar/.parquet/_stats.json."""
    import pyarrow as pa

    from pipeline import shards
    from pipeline.synthweb import build_world

    world = build_world(n, seed=0, noisy=False)
    items = [(world.resources[r["path"]].body, r["alt"]) for r in world.rows]
    folder.mkdir(parents=True)
    for sid in range(0, -(-n // per_shard)):
        rows = items[sid * per_shard:(sid + 1) * per_shard]
        keys = [f"{sid:05d}{i:04d}" for i in range(len(rows))]
        shards.write_tar(folder / f"{sid:05d}.tar",
                         [(k, {"jpg": b, "txt": c.encode()}) for k, (b, c) in zip(keys, rows)])
        shards.write_parquet(folder / f"{sid:05d}.parquet", pa.table({
            "key": keys, "caption": [c for _, c in rows], "status": ["success"] * len(rows)}))
        (folder / f"{sid:05d}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
    return items


def share(ids, part: int, procs: int) -> list:
    """Process ``part``'s static share of ``ids`` (every arm splits the work the same way)."""
    return sorted(ids)[part::procs]


# -- the harness ------------------------------------------------------------------------------------

Arm = Callable[[dict, int, int], Callable[[], dict]]  # (spec, part, procs) -> work() -> {"images": n, ...}


def _child(arm: Arm, spec: dict, part: int, procs: int, threads: int | None, barrier, results) -> None:
    import traceback

    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        work = arm(spec, part, procs)  # setup, pre-decoding, warm-up: not timed
        barrier.wait()
        start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
        out = work()
        out.update(start=start, end=time.monotonic(), pid=os.getpid())
        if threads:
            out["threads"] = torch.get_num_threads()  # what the arm's work ran with (a stage may set its own)
        results.put((part, out))
    except BaseException:  # noqa: BLE001 - reported to the parent, which stops the benchmark
        barrier.abort()
        results.put((part, {"error": traceback.format_exc()}))


def run_arm(arm: Arm, spec: dict, procs: int, threads: int | None) -> dict:
    """One run of one arm: ``procs`` fresh processes, started together after their setup."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    children = [ctx.Process(target=_child, args=(arm, spec, part, procs, threads, barrier, results))
                for part in range(procs)]
    for c in children:
        c.start()
    outs: dict[int, dict] = {}
    while len(outs) < procs:
        try:
            part, out = results.get(timeout=5)
            outs[part] = out
        except queues.Empty:
            dead = {i: c.exitcode for i, c in enumerate(children) if c.exitcode not in (None, 0) and i not in outs}
            if dead:  # killed without a word (out of memory, a signal): release its siblings too
                barrier.abort()
                outs.update({i: {"error": f"process exited with code {code}"} for i, code in dead.items()})
    for c in children:
        c.join()
    errors = [o["error"] for o in outs.values() if "error" in o]
    if errors:
        raise SystemExit(f"arm {getattr(arm, '__name__', arm)} failed:\n" + "\n".join(errors))
    parts = [outs[p] for p in range(procs)]
    seconds = max(o["end"] for o in parts) - min(o["start"] for o in parts)
    merged = {"images": sum(o["images"] for o in parts), "seconds": seconds,
              "pids": [o["pid"] for o in parts], "threads": [o.get("threads") for o in parts]}
    for key in {k for o in parts for k in o} - {"images", "start", "end", "pid", "threads"}:
        merged[key] = sum(o[key] for o in parts)  # further counts (tokens, ...)
    merged["rate"] = merged["images"] / seconds
    return merged


def compare(arms: dict[str, Arm], spec: dict, *, repeats: int, procs: int, threads: int | None) -> dict[str, list]:
    """Every arm ``repeats`` times, the order alternating; per-run lines printed as they come."""
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(repeats):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            run = run_arm(arms[name], spec, procs, threads)
            run["repeat"], run["order"] = r + 1, sum(len(v) for v in runs.values())
            runs[name].append(run)
            print(f"  repeat {r + 1} {name:<10} {run['images']:>6} images in {run['seconds']:7.2f} s = "
                  f"{run['rate']:8.2f} images/s  (pids {run['pids']}, threads {run['threads']})", flush=True)
    return runs


def spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q[0], "q3": q[2],
            "values": values}


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else "")


def summarize(runs: dict[str, list[dict]], baseline: str, stage: str, goal: float | None, *, procs: int,
              threads: int | None, labels: dict[str, str], load_before: float, notes: list[str] = (),
              json_path: str | None = None, unit: str = "images/s") -> dict:
    """Print the table (markdown) with the commit, the command and the layout; return the figures."""
    ratios = [s["rate"] / b["rate"] for s, b in zip(runs[stage], runs[baseline])]  # repeat by repeat
    stats = {name: spread([r["rate"] for r in rs]) for name, rs in runs.items()}
    ratio = spread(ratios)
    layout = f"{procs} process{'es' if procs > 1 else ''}" + (
        f" x {threads} thread{'s' if threads > 1 else ''} (OpenMP/torch)" if threads else "")
    print(f"\ncommit {git_commit()}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"layout: every arm {layout}, fresh processes for every run; {len(ratios)} repeats, "
          "the arms' order alternating")
    for line in notes:
        print(line)
    print(f"\n| arm | median {unit} | min-max | IQR |\n| --- | --- | --- | --- |")
    for name, s in stats.items():
        print(f"| {labels.get(name, name)} | {s['median']:.2f} | {s['min']:.2f}-{s['max']:.2f} | "
              f"{s['q1']:.2f}-{s['q3']:.2f} |")
    goal_txt = f" (goal >= {goal})" if goal is not None else ""
    print(f"| ratio {stage} / {baseline}, per repeat{goal_txt} | {ratio['median']:.3f} | "
          f"{ratio['min']:.3f}-{ratio['max']:.3f} | {ratio['q1']:.3f}-{ratio['q3']:.3f} |")
    figures = {"commit": git_commit(), "command": f"python {shlex.join(sys.argv)}", "procs": procs,
               "threads": threads, "arms": stats, "ratio": ratio, "runs": runs, "goal": goal}
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2))
    return figures


def layout_env(threads: int | None) -> None:
    """OpenMP/MKL threads for every process spawned from now on (torch reads them at import)."""
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)


def add_layout_args(parser) -> None:
    parser.add_argument("--procs", type=int, default=1, help="processes per arm, each taking an equal share")
    parser.add_argument("--threads", type=int, default=2, help="OpenMP/torch threads per process, every arm")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each arm, the order alternating")
    parser.add_argument("--json", help="also write the figures (every run) to this JSON file")
