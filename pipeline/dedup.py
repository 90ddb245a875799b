"""Duplicates over every score shard, as Ray tasks: scores/_dedup/NNNNN.parquet per shard.

No process holds the dataset: each step is one Ray task per score shard or per partition
of a hash-partitioned group-by, and the driver keeps only per-shard and per-partition
counts. Partition files go to ``scores/_dedup/_work/`` (local or object store), removed at
the end.

1. scan (per score shard): exact records go to partition hash(sha256); near records, one
   per (hash, chunk) for the pHash and the mirror-image pHash, to partition hash(chunk
   index, chunk value): two hashes within ``near_max_distance`` bits agree on one of the
   ``near_max_distance + 1`` chunks, so they meet in one partition; a random sample of the
   CLIP embeddings (``kmeans_points_per_centroid / cluster_size`` of them) for k-means.
2. fit (one task): spherical k-means with faiss on the sample, on a GPU when faiss sees
   one; k = ceil(embedded rows / cluster_size).
3. assign (per score shard): nearest centroid; records to partition (cluster mod P).
4. group (per partition): the duplicates of its records (:mod:`filters.dedup`: exact
   groups, near pairs through faiss's multi-hash index, pairwise cosine per cluster),
   written partitioned by score shard.
5. merge (per score shard): per row the strongest kind, then the best-ranked row it
   duplicates; ``scores/_dedup/NNNNN.parquet`` (every key of the shard, in its order)
   written atomically; then ``_summary.json``, last.

``_summary.json`` carries the fingerprint (dedup settings and a digest of every score
record) and the counts by kind; it is removed before any work starts and written after the
last shard file, so a killed run leaves none, and :func:`staleness` then says "missing".
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters import dedup as dd
from pipeline import shards, storage
from pipeline.config import RunConfig

log = logging.getLogger(__name__)

SUMMARY = "_summary.json"
SPEED_ONLY = ("partition_rows",)  # settings that change how the work is cut, not its result
COLUMNS = ("key", "score_error", "sha256", "phash", "phash_mirror", "clip_score", "min_side")
KINDS = tuple(dd.KIND_RANK)
FLAT_K = 64  # up to this many clusters, one flat k-means; past it, two levels (sqrt(k) coarse)
MERGE_SHARDS = 32  # score shards per merge task (and per group result file)


def out_dir(cfg: RunConfig):
    return storage.path(cfg.scores_dir) / "_dedup"


def _score_records(folder) -> tuple[str, dict[int, int]]:
    """A digest of every committed score record (which shards, which version of each; the
    same as ``pipeline.score.scores_digest``) and each shard's row count, in one read each."""
    h, counts = hashlib.sha256(), {}
    for sid in sorted(shards.done_shards(folder)):
        data = shards.stats_path(folder, sid).read_bytes()
        h.update(f"{shards.shard_name(sid)} {hashlib.sha256(data).hexdigest()}\n".encode())
        count = json.loads(data).get("count")
        if count is None:
            count = storage.parquet_file(shards.shard_file(folder, sid, ".parquet")).metadata.num_rows
        counts[sid] = int(count)
    return h.hexdigest(), counts


def settings(cfg: RunConfig) -> dict:
    return shards.settings_of(cfg.score.dedup, "score.dedup", exclude=SPEED_ONLY)


def fingerprint(cfg: RunConfig, digest: str | None = None) -> dict:
    """What ``scores/_dedup/`` must have been computed from: the dedup settings and the
    digest of every score shard's record."""
    return shards.fingerprint(settings(cfg), {"scores": digest or _score_records(cfg.scores_dir)[0]})


def read_summary(scores_dir) -> dict | None:
    """``SCORES/_dedup/_summary.json`` (fingerprint, ``duplicates`` by kind, partitions), None
    while there is no complete dedup."""
    path = storage.path(scores_dir) / "_dedup" / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


def summary(cfg: RunConfig) -> dict | None:
    return read_summary(cfg.scores_dir)


def staleness(cfg: RunConfig) -> str | None:
    """Why ``scores/_dedup/`` must be recomputed (None when it matches the scores and settings)."""
    have = summary(cfg)
    if have is None:
        return "it is missing"
    want = fingerprint(cfg)
    if (have.get("fingerprint") or {}).get("hash") == want["hash"]:
        return None
    return shards.explain_change(have.get("fingerprint"), want)


def read(cfg: RunConfig, shard_id: int) -> pa.Table:
    """One score shard's duplicates: key, duplicate_of, duplicate_kind (nulls for kept rows),
    the shard's keys in its order."""
    name = shards.shard_name(shard_id, shards.digits(cfg.scores_dir))
    return storage.read_parquet(out_dir(cfg) / f"{name}.parquet")


# -- the tasks ------------------------------------------------------------------------------


def _mkdir(p) -> None:
    if not storage.is_remote(p):
        storage.path(p).mkdir(parents=True, exist_ok=True)


def _rmtree(p) -> None:
    p = storage.path(p)
    if not storage.is_remote(p):
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.fs.rm(p.path, recursive=True)


def _write_parts(job: dict, kind: str, name: str, table: pa.Table, part: np.ndarray) -> None:
    """Write ``table``'s rows to ``_work/KIND/pNNNNN/NAME.parquet`` by partition."""
    order = np.argsort(part, kind="stable")
    part, table = part[order], table.take(order)
    starts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]]) if len(part) else []
    for s, e in zip(starts, np.r_[starts[1:], len(part)]):
        folder = storage.path(job["work"]) / kind / f"p{int(part[s]):05d}"
        _mkdir(folder)
        storage.write_parquet(folder / f"{name}.parquet", table.slice(s, e - s))


def _mix(values: np.ndarray, salt: int) -> np.ndarray:
    """A well-spread 64-bit hash of uint64 values (splitmix64's finaliser)."""
    x = values.astype(np.uint64) ^ np.uint64((salt * 0x9E3779B97F4A7C15) & (2**64 - 1))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _rows(job: dict, sid: int, columns: list[str]) -> tuple[pa.Table, pa.Table]:
    """A score shard's scored rows (no score_error): the columns asked for, and the rank
    columns every record carries (key, sid, clip, side)."""
    path = shards.shard_file(job["scores"], sid, ".parquet")
    t = storage.read_parquet(path, columns=[c for c in columns if c in job["columns"]])
    t = t.filter(pc.is_null(t["score_error"]))
    n = t.num_rows
    clip = t["clip_score"].cast(pa.float64()) if "clip_score" in t.column_names else pa.nulls(n, pa.float64())
    clip = pc.if_else(pc.is_nan(clip), None, clip).fill_null(-np.inf)  # no score ranks last
    side = t["min_side"].cast(pa.float64()).fill_null(0) if "min_side" in t.column_names else pa.repeat(0.0, n)
    base = pa.table({"key": t["key"], "sid": pa.repeat(pa.scalar(sid, pa.int64()), n), "clip": clip, "side": side})
    return t, base


def _scan(job: dict, sid: int) -> dict:
    name = shards.shard_name(sid, job["digits"])
    t, base = _rows(job, sid, [*COLUMNS, "clip_embedding"] if job["semantic"] else list(COLUMNS))
    out = {"rows": t.num_rows, "embedded": 0, "sample": 0}
    if job["exact"]:
        ok = pc.is_valid(t["sha256"])
        sha = t["sha256"].filter(ok)
        part = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                         for s in sha.to_pylist()], np.uint64) % np.uint64(job["partitions"]["exact"])
        _write_parts(job, "exact", name, base.filter(ok).append_column("sha256", sha), part)
    if job["near"]:
        tables, parts = [], []
        for col in [c for c in ("phash", "phash_mirror") if c in job["columns"]]:
            ok = pc.is_valid(t[col])
            h = t[col].filter(ok).to_numpy().astype(np.uint64)
            rows = base.filter(ok).append_column("hash", pa.array(h, pa.uint64()))
            for i, value in enumerate(dd.phash_chunks(h, job["max_distance"])):
                tables.append(rows.append_column("chunk", pa.array(np.full(len(h), i, np.int8))))
                parts.append(_mix(value, i + 1) % np.uint64(job["partitions"]["near"]))
        _write_parts(job, "near", name, pa.concat_tables(tables), np.concatenate(parts))
    if job["semantic"]:
        emb = t["clip_embedding"].filter(pc.is_valid(t["clip_embedding"]))
        pick = np.flatnonzero(np.random.default_rng(sid).random(len(emb)) < job["sample_fraction"])
        if len(pick):
            folder = storage.path(job["work"]) / "sample"
            _mkdir(folder)
            with (folder / f"{name}.npy").open("wb") as f:
                np.save(f, dd.embeddings(emb.take(pick)).astype(np.float16))
        out["embedded"], out["sample"] = len(emb), len(pick)
    return out


def apportion(k: int, sizes: np.ndarray) -> np.ndarray:
    """Split ``k`` centroids over groups of ``sizes`` points in proportion (largest remainder),
    at least one and at most its size for every non-empty group."""
    sizes = np.asarray(sizes, np.int64)
    quota = k * sizes / max(1, sizes.sum())
    out = np.minimum(np.maximum(np.floor(quota).astype(np.int64), sizes > 0), sizes)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    while out.sum() < k and (out < sizes).any():
        for i in order:
            if out.sum() >= k:
                break
            if out[i] < sizes[i]:
                out[i] += 1
    for i in np.argsort(-out, kind="stable"):  # past k only by the one-per-group floor
        while out.sum() > k and out[i] > 1:
            out[i] -= 1
    return out


def _kmeans(x: np.ndarray, k: int, job: dict, gpu: bool) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=job["iterations"], seed=1, spherical=True, gpu=gpu,
                      min_points_per_centroid=1, max_points_per_centroid=len(x), verbose=False)
    km.train(x)
    return km.centroids


def _mean(x: np.ndarray) -> np.ndarray:
    m = x.mean(axis=0, keepdims=True)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def _nearest(x: np.ndarray, centroids: np.ndarray, block: int = 8192) -> np.ndarray:
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), block):
        out[s:s + block] = np.argmax(x[s:s + block] @ centroids.T, axis=1)
    return out


def _fit(job: dict, _item) -> dict:
    """Two-level spherical k-means on the sample the scan tasks wrote (at most ``max_sample``
    of it), on a GPU when faiss sees one: ceil(sqrt(k)) coarse centroids, then each coarse
    cluster's share of the k fine ones fitted on its own points. Fitting and assigning then
    cost O(N sqrt(k)) rather than O(N k), which at a fixed cluster size would be O(N^2).
    The centroids go to ``_work/centroids.npz`` (coarse, fine, and where each coarse
    centroid's fine ones start)."""
    import os

    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    parts = []
    for p in sorted((storage.path(job["work"]) / "sample").glob("*.npy")):
        with p.open("rb") as f:
            x = np.load(f)
        parts.append(x[:math.ceil(len(x) * job["sample_ratio"])])
    x = np.concatenate(parts).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k, gpu = min(job["k"], len(x)), faiss.get_num_gpus() > 0
    k1 = math.ceil(math.sqrt(k)) if k > job["flat_k"] else 1
    coarse = _kmeans(x, k1, job, gpu) if k1 > 1 else x[:1] * 0
    near = _nearest(x, coarse) if k1 > 1 else np.zeros(len(x), np.int64)
    share = apportion(k, np.bincount(near, minlength=len(coarse)))
    keep = np.flatnonzero(share)  # a coarse centroid that drew no sample point has no fine ones
    coarse, share = coarse[keep], share[keep]
    near = np.searchsorted(keep, near)
    fine = [_kmeans(x[near == c], int(n), job, gpu) if n > 1 else _mean(x[near == c])
            for c, n in enumerate(share)]
    start = np.r_[0, np.cumsum(share)].astype(np.int64)
    with (storage.path(job["work"]) / "centroids.npz").open("wb") as f:
        np.savez(f, coarse=coarse, fine=np.concatenate(fine).astype(np.float32), start=start)
    return {"k": int(start[-1]), "coarse": k1, "sample": len(x), "gpu": gpu}


def _assign(job: dict, sid: int) -> None:
    name = shards.shard_name(sid, job["digits"])
    t, base = _rows(job, sid, ["key", "score_error", "clip_score", "min_side", "clip_embedding"])
    ok = pc.is_valid(t["clip_embedding"])
    emb, base = t["clip_embedding"].filter(ok), base.filter(ok)
    if not len(emb):  # a shard with no embedded row (every download failed, say): no records
        return
    with (storage.path(job["work"]) / "centroids.npz").open("rb") as f:
        saved = np.load(f)
        coarse, fine, start = saved["coarse"], saved["fine"], saved["start"]
    x = dd.embeddings(emb).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    near = _nearest(x, coarse) if len(coarse) > 1 else np.zeros(len(x), np.int64)
    cluster = np.empty(len(x), np.int64)
    for c in np.unique(near):
        rows = np.flatnonzero(near == c)
        cluster[rows] = start[c] + _nearest(x[rows], fine[start[c]:start[c + 1]])
    records = base.append_column("cluster", pa.array(cluster, pa.int64())).append_column("emb", emb)
    part = cluster.astype(np.uint64) % np.uint64(job["partitions"]["semantic"])
    _write_parts(job, "semantic", name, records, part)


def _group(job: dict, item: tuple[str, int]) -> dict:
    """The duplicates among one partition's records, written per bucket of score shards to
    ``_work/out/bNNNNN/KIND-pNNNNN.parquet`` (sid, key, duplicate_of, kind, and the rank of
    the row it duplicates, so the merge picks the best-ranked over all partitions). Buckets
    of ``merge_shards`` shards keep the file count at partitions x shards / merge_shards."""
    import faiss

    faiss.omp_set_num_threads(1)  # one CPU per task
    kind, part = item
    folder = storage.path(job["work"]) / kind / f"p{part:05d}"
    files = sorted(folder.glob("*.parquet")) if folder.exists() else []
    if not files:  # no record hashed here
        return {"kind": kind, "records": 0, "rows": 0, "duplicates": 0}
    records = pa.concat_tables([storage.read_parquet(p) for p in files])
    if kind == "exact":
        records, row, best = dd.exact_best(records)
    elif kind == "near":
        records, row, best = dd.near_best(records, job["max_distance"])
    else:
        records, row, best = dd.semantic_partition_best(records, job["threshold"])
    rows = records.select(["key", "sid", "clip", "side"]).take(np.flatnonzero(np.r_[True, row[1:] != row[:-1]]))
    dup = np.flatnonzero(best >= 0)
    found, of = rows.take(dup), rows.take(best[dup])
    result = pa.table({"sid": found["sid"], "key": found["key"], "duplicate_of": of["key"],
                       "kind_rank": pa.repeat(pa.scalar(dd.KIND_RANK[kind], pa.int8()), len(dup)),
                       "of_clip": of["clip"], "of_side": of["side"]})
    bucket = found["sid"].to_numpy() // job["merge_shards"]
    for b in np.unique(bucket):
        dest = storage.path(job["work"]) / "out" / f"b{int(b):05d}"
        _mkdir(dest)
        storage.write_parquet(dest / f"{kind}-p{part:05d}.parquet", result.filter(pa.array(bucket == b)))
    return {"kind": kind, "records": records.num_rows, "rows": rows.num_rows, "duplicates": len(dup)}


def _merge(job: dict, sids: tuple[int, ...]) -> dict:
    """``scores/_dedup/NAME.parquet`` for each score shard of one bucket: every key of the
    shard with the best result found for it (strongest kind, then the best-ranked row it
    duplicates), written atomically."""
    folder = storage.path(job["work"]) / "out" / f"b{sids[0] // job['merge_shards']:05d}"
    found = [storage.read_parquet(p) for p in sorted(folder.glob("*.parquet"))] if folder.exists() else []
    everything = pa.concat_tables(found) if found else None
    counts: dict[str, int] = {}
    for sid in sids:
        name = shards.shard_name(sid, job["digits"])
        keys = storage.read_parquet(shards.shard_file(job["scores"], sid, ".parquet"), columns=["key"])["key"]
        of, kind = pa.nulls(len(keys), pa.string()), pa.nulls(len(keys), pa.string())
        r = everything.filter(pc.equal(everything["sid"], sid)) if everything is not None else None
        if r is not None and r.num_rows:
            r = r.take(pc.sort_indices(r, sort_keys=[("key", "ascending"), ("kind_rank", "ascending"),
                                                     ("of_clip", "descending"), ("of_side", "descending"),
                                                     ("duplicate_of", "ascending")]))
            k = r["key"].to_numpy(zero_copy_only=False)
            r = r.take(np.flatnonzero(np.r_[True, k[1:] != k[:-1]]))  # the first, best, result per key
            at = pc.index_in(keys, value_set=r["key"])
            of = r["duplicate_of"].take(at)
            kind = pa.array(KINDS, pa.string()).take(r["kind_rank"].cast(pa.int32()).take(at))
            for i, n in enumerate(np.bincount(r["kind_rank"].to_numpy(), minlength=3)):
                if n:
                    counts[KINDS[i]] = counts.get(KINDS[i], 0) + int(n)
        table = pa.table({"key": keys, "duplicate_of": of, "duplicate_kind": kind}, schema=dd.SCHEMA)
        shards.atomic_write_parquet(storage.path(job["out"]) / f"{name}.parquet", table)
    return counts


# -- the driver -----------------------------------------------------------------------------


def _tasks(fn, items: list, desc: str, unit: str = "shard") -> list:
    """Run ``fn`` over ``items`` as Ray tasks; any failure fails the whole dedup (a rerun
    recomputes it)."""
    from pipeline import ray_backend

    results = []
    for item, result, _ in ray_backend.run_tasks(fn, items, desc=desc, unit=unit):
        if isinstance(result, BaseException):
            raise RuntimeError(f"{desc} failed on {item}: {type(result).__name__}: {result}") from result
        results.append(result)
    return results


def _job(cfg: RunConfig, counts: dict[int, int]) -> dict:
    d, folder = cfg.score.dedup, cfg.scores_dir
    columns = storage.read_schema(shards.shard_file(folder, min(counts), ".parquet")).names
    total = max(1, sum(counts.values()))
    hashes = 2 if "phash_mirror" in columns else 1
    records = {"exact": total, "near": hashes * (d.near_max_distance + 1) * total, "semantic": total}
    return {
        "scores": storage.url(folder), "out": storage.url(out_dir(cfg)), "work": storage.url(out_dir(cfg) / "_work"),
        "digits": shards.digits(folder), "columns": columns,
        "exact": d.exact and "sha256" in columns, "near": d.near and "phash" in columns,
        "semantic": d.semantic and "clip_embedding" in columns,
        "partitions": {k: max(1, math.ceil(n / d.partition_rows)) for k, n in records.items()},
        "max_distance": d.near_max_distance, "threshold": d.semantic_threshold, "iterations": d.kmeans_iterations,
        "sample_fraction": min(1.0, d.kmeans_points_per_centroid / d.cluster_size),
        "flat_k": FLAT_K, "merge_shards": MERGE_SHARDS,
    }


def run(cfg: RunConfig) -> dict:
    """Compute ``scores/_dedup/`` from every committed score shard; return the summary."""
    from pipeline import ray_backend

    folder, out = cfg.scores_dir, out_dir(cfg)
    digest, counts = _score_records(folder)
    if not counts:
        raise FileNotFoundError(f"no scored shards in {folder} to find duplicates in (every shard failed, see "
                                f"its NNNNN_failed.json, or none was scored yet)")
    made_from = fingerprint(cfg, digest)  # before reading: a shard redone meanwhile makes it stale, never mixed
    start = time.monotonic()
    _mkdir(out)
    (out / SUMMARY).unlink(missing_ok=True)  # from here until the new summary, dedup reads as missing
    if not storage.is_remote(out):
        shards.fsync_path(out)
    job = _job(cfg, counts)
    _rmtree(job["work"])
    ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
    ids = sorted(counts)
    scanned = _tasks(functools.partial(_scan, job), ids, "dedup: scan")
    kmeans, embedded, sample = None, sum(s["embedded"] for s in scanned), sum(s["sample"] for s in scanned)
    if job["semantic"] and embedded >= 2 and sample >= 1:
        d = cfg.score.dedup
        job["sample_ratio"] = min(1.0, d.kmeans_max_sample / sample)
        job["k"] = max(1, min(math.ceil(embedded / d.cluster_size), d.kmeans_max_sample // d.kmeans_points_per_centroid))
        (kmeans,) = _tasks(functools.partial(_fit, job), [0], "dedup: k-means", unit="fit")
        _tasks(functools.partial(_assign, job), ids, "dedup: assign clusters")
    done = {"exact": job["exact"], "near": job["near"], "semantic": kmeans is not None}
    todo = [(k, p) for k in KINDS if done[k] for p in range(job["partitions"][k])]  # empty ones return at once
    grouped = _tasks(functools.partial(_group, job), todo, "dedup: group", unit="partition")
    counts_by_kind: dict[str, int] = {}
    buckets: dict[int, list[int]] = {}
    for sid in ids:
        buckets.setdefault(sid // job["merge_shards"], []).append(sid)
    merges = [tuple(b) for b in buckets.values()]
    for c in _tasks(functools.partial(_merge, job), merges, "dedup: merge", unit="bucket"):
        for k, n in c.items():
            counts_by_kind[k] = counts_by_kind.get(k, 0) + n
    for p in out.glob("*.parquet"):  # files of score shards that no longer exist
        if p.stem.isdigit() and int(p.stem) not in counts:
            p.unlink()
    _rmtree(job["work"])
    (storage.path(folder) / "_dedup.parquet").unlink(missing_ok=True)  # the whole-dataset file of older Tapirs
    result = {
        "fingerprint": made_from, "shards": len(ids), "rows": sum(s["rows"] for s in scanned),
        "duplicates": {k: counts_by_kind[k] for k in KINDS if k in counts_by_kind},
        "partitions": {k: {"count": job["partitions"][k], "largest": max(g["records"] for g in grouped if g["kind"] == k)}
                       for k in KINDS if done[k]},
        "kmeans": kmeans, "seconds": round(time.monotonic() - start, 3),
    }
    shards.atomic_write(out / SUMMARY, json.dumps(result, indent=2, sort_keys=True))
    log.info("duplicates: %s over %d rows (%.1fs)", result["duplicates"] or "none", result["rows"], result["seconds"])
    return result
