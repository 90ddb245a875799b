"""Scale: the data half's global steps at two sizes eight times apart, time and driver memory.

Synthetic metadata, no images: a URL list of N rows (LAION's columns) and a run folder as
download and score leave it (``raw/NNNNN.parquet``, an empty ``NNNNN.tar`` and the
completion record; ``scores/NNNNN.parquet`` with the content hash, perceptual hashes, CLIP
score, sizes and a small CLIP embedding, committed with the score stage's fingerprints),
written shard by shard through ``pipeline.shards.commit``. 2% of the rows failed to
download; 3% are planted duplicates of a row anywhere in the dataset (1% exact, 1% near:
a few pHash bits flipped or the mirror image, 1% semantic: the embedding plus noise).

Each step of :data:`STEPS` then runs at each size in a fresh process (so its memory
high-water mark is its own) that starts Ray with ``--cpus`` CPUs, runs the step once on a
tiny run folder (:func:`warm_up`: code imported, Ray's workers started), resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``) and runs the step: the download planner over
the URL list, dedup, select (a threshold rule and a ``top N%`` rule), the build plan and
the report (funnels and lineage). The driver's peak is ``VmHWM`` after the step; the Ray
workers' peak (the largest single worker) is sampled beside it. Prints each step's time and
peak driver memory at both sizes, the ratios, and on its last line the ratio of the peak
driver memory over all steps, large to small. ``--repeats`` runs (3 by default) of every step
at both sizes, the sizes' order alternating, give each time as a median with its range, and
the time ratio as the ratio of the medians. Goals (issue 12): that ratio <= 1.25, each
step's time ratio <= 10.

    python bench/scale.py                                   # 500,000 and 4,000,000 rows
    python bench/scale.py --small 20000 --per-shard 2000    # a quick check of the harness

Generated folders are kept under ``--work`` (reused when made with the same settings). Not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

RULES = ["not duplicate", "min_side >= 128", "top 30% by clip_score"]
GEN_VERSION = 3
SOURCE = "bench"

# -- the synthetic rows: every value a pure function of (seed, row), so any shard is made alone ----

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 -> well mixed uint64 (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + _GOLD
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def rand(ids: np.ndarray, salt: int, seed: int) -> np.ndarray:
    return mix(mix(ids) ^ np.uint64((seed << 20) + salt))


def unit(u: np.ndarray) -> np.ndarray:
    return (u >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


# row % 100: below 94 an original, 94 an image that fails to decode (score_error), 95-96 a failed
# download, 97 an exact, 98 a near, 99 a semantic duplicate of an original
UNDECODABLE, FAILED, EXACT, NEAR = 94, 95, 97, 98


def kinds(rows: np.ndarray) -> np.ndarray:
    """0 original, 1 failed download, 2 exact, 3 near, 4 semantic duplicate, 5 undecodable."""
    slot = rows % 100
    return np.select([slot < UNDECODABLE, slot < FAILED, slot < EXACT, slot == EXACT, slot == NEAR],
                     [0, 5, 1, 2, 3], 4)


def targets(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The original row a duplicate copies: any scored original of the dataset."""
    blocks = np.uint64(max(1, n // 100))
    return (rand(rows, 1, seed) % blocks) * np.uint64(100) + rand(rows, 2, seed) % np.uint64(UNDECODABLE)


def embeddings(ids: np.ndarray, dim: int, salt: int, seed: int) -> np.ndarray:
    cells = ids.astype(np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)
    return unit(rand(cells, salt, seed)) * 2 - 1


def shard_rows(sid: int, n: int, per_shard: int, dim: int, seed: int) -> dict:
    """Columns of one shard's rows (downloaded or not), as download and score would record them."""
    r = np.arange(sid * per_shard, min(n, (sid + 1) * per_shard), dtype=np.uint64)
    kind, t = kinds(r), targets(r, n, seed)
    dup = (kind >= 2) & (kind <= 4)
    content = np.where(kind == 2, t, r)  # what the bytes are: an exact copy has its original's
    base = np.where(dup, t, r)  # what the picture shows
    ph, pm = rand(base, 3, seed), rand(base, 4, seed)
    own_ph, own_pm = rand(r, 3, seed), rand(r, 4, seed)
    flips = np.zeros(len(r), np.uint64)
    for k in range(3):  # 1 to 3 bits flipped
        bit = np.uint64(1) << (rand(r, 5 + k, seed) % np.uint64(64))
        flips |= np.where(rand(r, 8, seed) % np.uint64(3) >= np.uint64(k), bit, np.uint64(0))
    mirrored = (rand(r, 9, seed) & np.uint64(1)).astype(bool)
    near = kind == 3
    phash = np.where(near, np.where(mirrored, pm, ph) ^ flips, np.where(kind == 4, own_ph, ph))
    phash_mirror = np.where(near, np.where(mirrored, ph, pm) ^ flips, np.where(kind == 4, own_pm, pm))
    emb = embeddings(base, dim, 10, seed)
    emb = np.where(((kind == 3) | (kind == 4))[:, None], emb + 0.02 * embeddings(r, dim, 11, seed), emb)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # the CLIP scorer stores unit vectors
    min_side = (64 + rand(r, 13, seed) % np.uint64(449)).astype(np.int32)
    long_side = min_side + (rand(r, 14, seed) % np.uint64(256)).astype(np.int32)
    wide = (rand(r, 16, seed) & np.uint64(1)).astype(bool)
    ids = [int(x) for x in r]
    return {
        "row": r, "kind": kind, "target": t,
        "key": [f"{sid:05d}{i - sid * per_shard:0{len(str(per_shard - 1))}d}" for i in ids],
        "sha256": [hashlib.sha256(b"%d-%d" % (seed, c)).hexdigest() for c in content.tolist()],
        "phash": phash, "phash_mirror": phash_mirror, "embedding": emb.astype(np.float16),
        "clip_score": (0.15 + 0.25 * unit(rand(r, 12, seed))).astype(np.float32),
        "score_error": kind == 5,
        "width": np.where(wide, long_side, min_side), "height": np.where(wide, min_side, long_side),
        "min_side": min_side, "url": [f"https://img{i % 97}.example.com/{i:x}/{i * 7919 % 100003}.jpg" for i in ids],
        "caption": [f"photo {i}: a synthetic scene number {i % 1009} with {i % 13} shapes" for i in ids],
    }


def url_table(rows: dict):
    """Input rows in LAION's columns."""
    import pyarrow as pa

    r = rows["row"]
    return pa.table({"URL": rows["url"], "TEXT": rows["caption"], "WIDTH": rows["width"] * 2,
                     "HEIGHT": rows["height"] * 2, "similarity": unit(rand(r, 20, 0)).astype(np.float32),
                     "punsafe": unit(rand(r, 21, 0)).astype(np.float32),
                     "pwatermark": unit(rand(r, 22, 0)).astype(np.float32)})


def raw_table(rows: dict, inputs):
    """raw/NNNNN.parquet as download writes it: img2dataset's columns, LAION's extras, the source."""
    import pyarrow as pa

    from pipeline.download import classify
    from pipeline.fetch import TAG
    from pipeline.schemas import RAW

    ok = rows["kind"] != 1
    status = np.where(ok, "success", "failed_to_download").tolist()
    message = [None if o else f"{TAG}http_404: HTTP Error 404: Not Found" for o in ok]
    values = {
        "key": rows["key"], "url": rows["url"], "caption": rows["caption"], "status": status, "error_message": message,
        "width": pa.array(rows["width"], mask=~ok), "height": pa.array(rows["height"], mask=~ok),
        "original_width": inputs["WIDTH"], "original_height": inputs["HEIGHT"],
        "sha256": pa.array(rows["sha256"], mask=~ok), "error_reason": [classify(*m) for m in zip(status, message)],
        "attempts": np.ones(len(ok), np.int32)}
    table = pa.table({f.name: pa.array(values[f.name]).cast(f.type) for f in RAW})
    for c in ("similarity", "punsafe", "pwatermark"):
        table = table.append_column(c, inputs[c])
    return table.append_column("source", pa.array([SOURCE] * len(ok)))


def scores_table(rows: dict, dim: int):
    """scores/NNNNN.parquet as the score stage writes it (scorers basic, phash, clip) for the downloaded rows;
    a row whose image did not decode has an error and no scores."""
    import pyarrow as pa

    from pipeline.schemas import SCORER_SCHEMAS, SCORES_BASE

    ok = rows["kind"] != 1
    bad = rows["score_error"][ok]
    clip = pa.schema([("clip_score", pa.float32()), ("clip_embedding", pa.list_(pa.float16(), dim))])
    schema = pa.schema([*SCORES_BASE, *SCORER_SCHEMAS["basic"], *SCORER_SCHEMAS["phash"], *clip])
    w, h = rows["width"][ok], rows["height"][ok]
    captions = [c for c, o in zip(rows["caption"], ok) if o]
    values = {
        "key": [k for k, o in zip(rows["key"], ok) if o], "sha256": [s for s, o in zip(rows["sha256"], ok) if o],
        "score_error": ["decode error: UnidentifiedImageError: synthetic" if b else None for b in bad],
        "width": w, "height": h, "min_side": rows["min_side"][ok], "aspect_ratio": w / h, "file_size": w * h // 8,
        "caption_chars": [len(c) for c in captions], "caption_words": [len(c.split()) for c in captions],
        "junk_alt": np.zeros(len(w)), "phash": rows["phash"][ok], "phash_mirror": rows["phash_mirror"][ok],
        "clip_score": rows["clip_score"][ok],
        "clip_embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(rows["embedding"][ok].reshape(-1), pa.float16()), dim, mask=pa.array(bad))}
    keep = ("key", "score_error", "sha256", "clip_embedding")
    return pa.table({f.name: values[f.name] if f.name in keep else pa.array(values[f.name], mask=bad).cast(f.type)
                     for f in schema}, schema=schema)


def run_config(run: Path, urls: Path, per_shard: int, cpus: int, output: Path | None = None):
    from pipeline.config import RunConfig

    return RunConfig.model_validate({
        "output": str(output or run), "input": {"path": str(urls), "preset": "laion"},
        "download": {"samples_per_shard": per_shard}, "score": {"scorers": ["basic", "phash", "clip"]},
        "select": {"rules": RULES}, "resources": {"num_cpus": cpus}})


def generate(work: Path, n: int, per_shard: int, dim: int, seed: int, cpus: int) -> dict:
    """``work/urls/`` (the input list) and ``work/run/`` (raw/ and scores/), shard by shard."""
    from collections import Counter

    import pyarrow.parquet as pq

    from pipeline import shards
    from pipeline.download import download_settings
    from pipeline.score import shard_fingerprint

    settings = {"rows": n, "per_shard": per_shard, "dim": dim, "seed": seed, "version": GEN_VERSION}
    marker = work / "_generated.json"
    if marker.exists() and json.loads(marker.read_text())["settings"] == settings:
        return json.loads(marker.read_text())
    shutil.rmtree(work, ignore_errors=True)
    urls, run = work / "urls", work / "run"
    for folder in (urls, run / "raw" / "_input", run / "scores"):
        folder.mkdir(parents=True)
    cfg = run_config(run, urls, per_shard, cpus)
    raw_fp = shards.fingerprint(download_settings(cfg), {"raw/_input/input.parquet": "bench-synthetic"})
    planted = {"exact": 0, "near": 0, "semantic": 0, "failed": 0, "undecodable": 0}
    n_shards, writer, start = -(-n // per_shard), None, time.time()
    per_file = max(per_shard, 1_000_000 // per_shard * per_shard)  # URL list files of about a million rows
    for sid in range(n_shards):
        rows = shard_rows(sid, n, per_shard, dim, seed)
        for name, k in (("failed", 1), ("exact", 2), ("near", 3), ("semantic", 4), ("undecodable", 5)):
            planted[name] += int((rows["kind"] == k).sum())
        inputs = url_table(rows)
        if sid * per_shard % per_file == 0:  # the next file of the URL list
            if writer:
                writer.close()
            writer = pq.ParquetWriter(urls / f"part-{sid * per_shard // per_file:05d}.parquet", inputs.schema)
        writer.write_table(inputs)
        name = shards.shard_name(sid)
        raw = raw_table(rows, inputs)
        staging = shards.new_staging(run / "raw", sid)
        shards.write_tar(staging / f"{name}.tar", [])  # no images
        shards.write_parquet(staging / f"{name}.parquet", raw)
        ok = raw.num_rows - int((rows["kind"] == 1).sum())
        shards.commit(staging, run / "raw", sid, [f"{name}.tar", f"{name}.parquet"], {
            "count": raw.num_rows, "successes": ok, "failed_to_download": raw.num_rows - ok, "failed_to_resize": 0,
            "reasons": dict(Counter(raw["error_reason"].to_pylist())),
            "attempts": {"1": raw.num_rows}, "retried_and_succeeded": 0, "retryable": 0, "retry_passes_done": 2,
            "start_time": start, "end_time": start, "duration": 0.0},
            raw_fp)
        scores = scores_table(rows, dim)
        staging = shards.new_staging(run / "scores", sid)
        shards.write_parquet(staging / f"{name}.parquet", scores)
        errors = scores.num_rows - scores["score_error"].null_count
        shards.commit(staging, run / "scores", sid, [f"{name}.parquet"], {
            "count": scores.num_rows, "scored": scores.num_rows - errors, "errors": errors,
            "error_reasons": {"decode error": errors} if errors else {},
            "scorers": ["basic", "phash", "clip"], "duration": 0.0}, shard_fingerprint(cfg, sid))
    writer.close()
    shards.atomic_write(run / "raw" / "_input" / "input.json", json.dumps({"rows": n, "source": str(urls)}))
    info = {"settings": settings, "shards": n_shards, "planted": planted, "seconds": time.time() - start}
    marker.write_text(json.dumps(info, indent=2))
    return info


# -- the steps: the one table to fix when a stage's API moves ------------------------------------


def _plan(ctx) -> dict:
    from pipeline import download

    planner = download.prepare(ctx.plan_cfg)
    todo = [(sid, rows) for sid, _, _, rows in download.jobs(ctx.plan_cfg, planner)]  # planned as it is read
    return {"shards": len(todo), "rows": sum(n for _, n in todo)}


def _dedup(ctx) -> dict:
    from pipeline import dedup

    return dedup.run(ctx.cfg)


def _select(ctx) -> dict:
    from pipeline.select import select

    return select(ctx.cfg)


def _build_plan(ctx) -> dict:
    from pipeline import build, storage
    from pipeline.select import check_selection

    cfg = ctx.cfg  # what build()'s driver does before its actors start
    infos = build.encoder_infos(cfg.build)
    build.check_sizes(cfg.build, infos)
    check_selection(cfg)
    storage.path(cfg.shards_dir).mkdir(parents=True, exist_ok=True)
    digests = build._digests(cfg)
    plan = build.make_plan(cfg, infos, digests)
    build._check_done(cfg, plan, digests)
    build._write_plan(cfg.shards_dir, plan)
    plan = json.loads((storage.path(cfg.shards_dir) / "_plan.json").read_text())
    return {k: v for k, v in plan.items() if k != "sources"}


def _report(ctx) -> dict:
    from pipeline.report import report

    funnel, _ = report(Path(ctx.cfg.output), visuals=False)
    return {"lineage_ok": funnel["lineage"]["ok"], "problems": funnel["lineage"]["problems"][:3]}


# name -> (what runs, the step, the outputs it writes: removed before it runs, relative to the run folder)
STEPS = {
    "plan": ("the download planner over the URL list (pipeline.download.prepare + jobs)", _plan, ["../plan_run"]),
    "dedup": ("pipeline.dedup.run (exact, near, semantic)", _dedup, ["scores/_dedup", "scores/_dedup.parquet"]),
    "select": ("pipeline.select.select: " + ", ".join(RULES), _select, ["selection"]),
    "build_plan": ("the build stage's plan (no encoding)", _build_plan, ["shards"]),
    "report": ("pipeline.report.report: funnels and lineage", _report, ["report"]),
}
CHAIN = ["dedup", "select", "build_plan", "report"]  # each reads what the ones before it wrote
WARM_ROWS, WARM_PER_SHARD = 400, 100  # the warm-up run folder


def run_one(step: str, ctx: "Ctx", work: Path) -> dict:
    """Remove the step's outputs, then run it."""
    for rel in STEPS[step][2]:
        p = (work / "run" / rel).resolve()
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return STEPS[step][1](ctx)


def warm_up(step: str, warm: Path, cpus: int) -> None:
    """The step (and those it reads from) on a tiny run folder first, in the same process: every
    module it imports is loaded and Ray's workers have started and imported theirs, so the
    measured run's peak memory and time are those of its data, not of code or start-up."""
    ctx = Ctx(warm, WARM_PER_SHARD, cpus)
    for s in [step] if step not in CHAIN else CHAIN[:CHAIN.index(step) + 1]:
        run_one(s, ctx, warm)


def dedup_found(scores: Path) -> dict:
    """Rows marked as a duplicate, by kind (read after the step, one file at a time)."""
    from collections import Counter

    from pipeline import storage

    files = sorted((scores / "_dedup").glob("[0-9]*.parquet")) if (scores / "_dedup").is_dir() else (
        [scores / "_dedup.parquet"] if (scores / "_dedup.parquet").exists() else [])
    found = Counter()
    for f in files:
        found.update(storage.read_parquet(f, columns=["duplicate_kind"])["duplicate_kind"].drop_null().to_pylist())
    return dict(found)


# -- measuring one step in its own process ----------------------------------------------------------


def _status(pid: int | str, field: str) -> int:
    """A /proc/PID/status memory field, in bytes (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


class WorkerPeaks(threading.Thread):
    """Samples the RSS of this process's Ray workers (descendants named ray::... or running
    default_worker.py); at the end reads each live worker's own high-water mark too."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.me, self.every, self.stopped = psutil.Process(), every, threading.Event()
        self.peak: dict[int, int] = {}
        self.total = 0

    def workers(self):
        out = []
        for p in self.me.children(recursive=True):
            try:
                if p.name().startswith("ray::") or any("default_worker" in a for a in p.cmdline()):
                    out.append(p)
            except Exception:  # noqa: BLE001 - a process that ended meanwhile
                pass
        return out

    def sample(self) -> None:
        total = 0
        for p in self.workers():
            try:
                rss = p.memory_info().rss
            except Exception:  # noqa: BLE001
                continue
            total += rss
            self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
        self.total = max(self.total, total)

    def reset(self) -> None:
        for p in self.workers():  # their high-water marks start from now
            try:
                Path(f"/proc/{p.pid}/clear_refs").write_text("5")
            except OSError:
                pass

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.sample()

    def stop(self) -> dict:
        self.stopped.set()
        self.join()
        self.sample()
        for p in self.workers():
            self.peak[p.pid] = max(self.peak.get(p.pid, 0), _status(p.pid, "VmHWM"))
        return {"workers_peak": max(self.peak.values(), default=0), "workers_total_peak": self.total,
                "workers_seen": len(self.peak)}


class Ctx:
    def __init__(self, work: Path, per_shard: int, cpus: int):
        run, urls = work / "run", work / "urls"
        self.cfg = run_config(run, urls, per_shard, cpus)
        self.plan_cfg = run_config(run, urls, per_shard, cpus, output=work / "plan_run")


def child(step: str, work: Path, warm: Path, per_shard: int, cpus: int) -> dict:
    """Run one step in this (fresh) process and measure it."""
    import gc

    from pipeline import ray_backend

    started = time.perf_counter()
    ray_backend.init(num_cpus=cpus)
    ray_start = time.perf_counter() - started
    warm_up(step, warm, cpus)
    warm_seconds = time.perf_counter() - started - ray_start
    ctx = Ctx(work, per_shard, cpus)
    gc.collect()
    sampler = WorkerPeaks()
    sampler.reset()
    base = _status("self", "VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on is the step's
    sampler.start()
    start = time.perf_counter()
    result = run_one(step, ctx, work)
    seconds = time.perf_counter() - start
    peak = _status("self", "VmHWM")
    workers = sampler.stop()
    out = {"step": step, "pid": os.getpid(), "seconds": seconds, "driver_peak": peak, "driver_base": base,
           "ray_start": ray_start, "warm_up": warm_seconds, **workers, "result": result}
    if step == "dedup":
        out["found"] = dedup_found(work / "run" / "scores")
    ray_backend.shutdown()
    return out


def run_step(step: str, work: Path, warm: Path, per_shard: int, cpus: int) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--work", str(work), "--warm", str(warm),
           "--per-shard", str(per_shard), "--cpus", str(cpus)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"step {step} at {work.name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the report ---------------------------------------------------------------------------------------


def mib(b: int) -> str:
    return f"{b / 2**20:,.0f}"


def _merged(results: list[dict]) -> dict:
    """One step at one size over the repeats: the median time, every time, the highest peaks."""
    import statistics

    out = dict(results[-1])
    out["all_seconds"] = [r["seconds"] for r in results]
    out["seconds"] = statistics.median(out["all_seconds"])
    top = max(results, key=lambda r: r["driver_peak"])
    out["driver_peak"], out["driver_base"] = top["driver_peak"], top["driver_base"]
    out["workers_peak"] = max(r["workers_peak"] for r in results)
    return out


def _spread(r: dict) -> str:
    return f"{r['seconds']:.2f} ({min(r['all_seconds']):.2f}-{max(r['all_seconds']):.2f})"


def summarize(sizes: list[int], runs: dict[int, dict], gens: dict[int, dict], args) -> dict:
    from _common import git_commit

    small, large = sizes
    print(f"\ncommit {git_commit()}; load average {args.load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"{os.cpu_count()} CPUs, Ray with {args.cpus}")
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"data: {small:,} and {large:,} input rows, {args.per_shard:,} per shard ({gens[small]['shards']} and "
          f"{gens[large]['shards']} shards), {args.dim}-dim float16 embeddings, no images; each step in a fresh "
          "process; peak = the driver's VmHWM during the step (its RSS before the step in brackets; growth = peak - "
          "that); largest Ray worker = the highest RSS of one worker process during the step")
    for n in sizes:
        p = gens[n]["planted"]
        found = runs[n].get("dedup", [{}])[-1].get("found", {})
        print(f"  {n:,} rows: planted {p['exact']} exact, {p['near']} near, {p['semantic']} semantic duplicates, "
              f"{p['failed']} failed downloads; dedup marked {sum(found.values())} ({found})")
    print(f"\ntimes: median (min-max) over {args.repeats} repeats, sizes alternating; the time ratio is of the "
          "medians, its range the ratios of the repeats paired in order; peaks are the highest over the repeats")
    print(f"\n| step | s, {small:,} | s, {large:,} | time ratio (goal <= 10) | driver peak MiB, {small:,} | "
          f"driver peak MiB, {large:,} | memory ratio | growth MiB, small / large | "
          "largest Ray worker MiB, small / large |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    figures = {"commit": git_commit(), "command": f"python {shlex.join(sys.argv)}", "sizes": sizes, "steps": {},
               "generated": gens, "repeats": args.repeats}
    for step in runs[small]:
        a, b = _merged(runs[small][step]), _merged(runs[large][step])
        t, m = b["seconds"] / a["seconds"], b["driver_peak"] / a["driver_peak"]
        pairs = [y / x for x, y in zip(a["all_seconds"], b["all_seconds"])]
        figures["steps"][step] = {"small": a, "large": b, "time_ratio": t, "time_ratios": pairs, "memory_ratio": m}
        print(f"| {step} | {_spread(a)} | {_spread(b)} | {t:.2f} ({min(pairs):.2f}-{max(pairs):.2f})"
              f"{'' if t <= 10 else ' (over)'} | "
              f"{mib(a['driver_peak'])} ({mib(a['driver_base'])}) | {mib(b['driver_peak'])} ({mib(b['driver_base'])}) "
              f"| {m:.2f} | {mib(a['driver_peak'] - a['driver_base'])} / {mib(b['driver_peak'] - b['driver_base'])} "
              f"| {mib(a['workers_peak'])} / {mib(b['workers_peak'])} |")
    for step, (what, *_) in STEPS.items():
        if step in runs[small]:
            result = {k: v for k, v in runs[large][step][-1]["result"].items() if k not in ("fingerprint", "rules")}
            print(f"  {step}: {what}; at {large:,} rows: {json.dumps(result, default=str)[:400]}")
    peaks = {n: max(r["driver_peak"] for rs in runs[n].values() for r in rs) for n in sizes}
    ratio = peaks[large] / peaks[small]
    worst = max(figures["steps"], key=lambda s: figures["steps"][s]["memory_ratio"])
    figures |= {"driver_peak": peaks, "memory_ratio": ratio, "worst_step": worst,
                "worst_step_memory_ratio": figures["steps"][worst]["memory_ratio"]}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    print(f"\npeak driver memory over all steps: {mib(peaks[small])} MiB at {small:,} rows, {mib(peaks[large])} MiB "
          f"at {large:,}")
    print(f"peak driver memory, large / small: {ratio:.3f} (goal <= 1.25); step by step at most "
          f"{figures['worst_step_memory_ratio']:.3f} ({worst})")
    return figures


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=500_000, help="input rows of the small size")
    parser.add_argument("--factor", type=int, default=8, help="the large size is this many times the small")
    parser.add_argument("--per-shard", type=int, default=10_000, help="rows per shard (img2dataset's default)")
    parser.add_argument("--dim", type=int, default=16, help="CLIP embedding width (float16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the embedded Ray")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    parser.add_argument("--work", help="folder for the generated data (kept and reused; default: a fresh temp folder)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every step at each size (median and spread)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        out = child(args.child, Path(args.work), Path(args.warm), args.per_shard, args.cpus)
        print(json.dumps(out, default=str))
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import guarded_workdir, violations

    args.load_before = os.getloadavg()[0]
    guard = guarded_workdir("tapir-scale-")
    root = Path(args.work) if args.work else guard
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; known: {', '.join(STEPS)}")
    sizes = [args.small, args.small * args.factor]
    runs, gens = {n: {} for n in sizes}, {}
    warm = root / "warm-up"
    generate(warm, WARM_ROWS, WARM_PER_SHARD, args.dim, args.seed, args.cpus)
    for n in sizes:
        work = root / f"rows-{n}"
        gens[n] = generate(work, n, args.per_shard, args.dim, args.seed, args.cpus)
        print(f"{n:,} rows: {gens[n]['shards']} shards in {work} (generated in {gens[n]['seconds']:.0f} s)", flush=True)
    for rep in range(args.repeats):  # the sizes' order alternates from repeat to repeat
        for n in sizes if rep % 2 == 0 else sizes[::-1]:
            print(f"repeat {rep + 1}/{args.repeats}, {n:,} rows", flush=True)
            for step in steps:
                r = run_step(step, root / f"rows-{n}", warm, args.per_shard, args.cpus)
                runs[n].setdefault(step, []).append(r)
                print(f"  {step:<10} {r['seconds']:8.2f} s  driver peak {mib(r['driver_peak']):>7} MiB "
                      f"(before {mib(r['driver_base'])})  largest Ray worker {mib(r['workers_peak'])} MiB", flush=True)
    if violations(guard):
        print(f"non-loopback connection attempts refused by the guard: {violations(guard)}")
    return summarize(sizes, runs, gens, args)


if __name__ == "__main__":
    main()
