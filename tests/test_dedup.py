"""Duplicate detection: the per-partition kernels (filters.dedup) against brute force, and the
distributed dedup (pipeline.dedup) on score shards made from real images, on local disk and
on the loopback S3 server.

The planted set: exact copies (same bytes), near copies (mirrored and recompressed, recompressed
at another quality, cropped 3%), semantic copies (rotated a quarter turn: a different pHash, an
embedding next to the original's) among 100 distinct synthetic scenes and five photos.
"""

import hashlib
import io
import json
import math
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps
from skimage import data

from filters import dedup as dd
from filters.basic import PhashScorer
from pipeline import dedup, shards
from pipeline.schemas import SCORER_SCHEMAS, SCORES_BASE
from pipeline.synthweb import random_scene, render

# -- kernels ----------------------------------------------------------------------------------


def _records(keys, clip, **columns):
    return pa.table({"key": keys, "clip": np.asarray(clip, float), "side": np.zeros(len(keys)), **columns})


def _found(records, row, best) -> dict:
    """{key: key it duplicates} from a kernel's result."""
    keys = records["key"].to_pylist()
    first = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    by_row = [keys[f] for f in first]
    return {by_row[r]: by_row[b] for r, b in enumerate(best) if b >= 0}


def test_each_row_names_the_best_ranked_row_it_duplicates():
    """SemDeDup's rule: a row is dropped when it duplicates a better-ranked row (not only the
    group's best), and names the best-ranked one; a chain a-b-c drops b and c."""
    group = np.array([0, 0, 1, 1, 2, 2])  # groups {a,b}, {b,c}, {d,e}
    row = np.array([0, 1, 1, 2, 3, 4])  # a=0 is best ranked, e=4 worst
    assert dd.best_in_groups(group, row).tolist() == [-1, 0, 1, -1, 3]
    # with group 1 a neighbour of group 2, d and e see b as well
    lims, ids = np.array([0, 1, 3, 5]), np.array([0, 1, 2, 2, 1])
    assert dd.best_in_groups(group, row, (lims, ids)).tolist() == [-1, 0, 1, 1, 1]


def test_exact_keeps_highest_clip_then_side_then_key():
    keys = ["a", "b", "c", "d", "e", "f"]
    rec = _records(keys, [0.2, 0.3, 0.9, 0.5, 0.5, 0.1], sha256=["x", "x", "x", "y", "y", "z"])
    rec = rec.set_column(2, "side", pa.array([0.0, 0, 0, 10, 10, 0]))
    assert _found(*dd.exact_best(rec)) == {"a": "c", "b": "c", "e": "d"}


def _near_records(h, d, keys=None, mirror=None):
    keys = keys or [f"k{i:04d}" for i in range(len(h))]
    clip = np.linspace(1, 0, len(h))  # k0000 ranks best
    variants = [h] + ([mirror] if mirror is not None else [])
    parts = [_records(keys, clip, hash=pa.array(v, pa.uint64()), chunk=pa.array(np.full(len(h), i, np.int8)))
             for v in variants for i, _ in enumerate(dd.phash_chunks(v, d))]
    return pa.concat_tables(parts)


@pytest.mark.parametrize("d", [0, 3, 4, 8])
def test_near_finds_every_pair_brute_force_finds(d):
    """Multi-index hashing finds exactly the pairs within d bits, with small chunk groups
    compared pair by pair and a large one (300 hashes sharing chunk 0) through faiss."""
    rng = np.random.default_rng(d)
    h = rng.integers(0, 2**64 - 1, size=1200, dtype=np.uint64)
    if d:
        h[:300] &= ~np.uint64((1 << (64 // (d + 1))) - 1)  # one large group: 300 hashes share chunk 0
    for i in range(300, 700, 2):  # planted pairs at 0..d+2 bits
        bits = rng.choice(64, size=rng.integers(0, d + 3), replace=False)
        h[i + 1] = h[i] ^ np.uint64(sum(1 << int(b) for b in bits))
    h[900:905] = h[899]
    found = _found(*dd.near_best(_near_records(h, d), d))
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    close = (dist <= d) & (np.arange(len(h))[None, :] < np.arange(len(h))[:, None])
    want = {f"k{i:04d}": f"k{int(np.argmax(close[i])):04d}" for i in range(len(h)) if close[i].any()}
    assert found == want and len(want) > 40


def test_semantic_best_is_the_first_better_row_above_threshold():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 32))
    x[150] = x[7] + 0.01 * rng.normal(size=32)
    x[299] = x[150] + 0.01 * rng.normal(size=32)
    x[40] = x[3] + 0.01 * rng.normal(size=32)
    best = dd.semantic_best(x.astype(np.float16), 0.98, block=64)  # blocks smaller than the cluster
    assert {i: int(b) for i, b in enumerate(best) if b >= 0} == {150: 7, 299: 7, 40: 3}


# -- the distributed dedup on real images ------------------------------------------------------


def _jpeg(im, quality=90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _mosaic(rng, i) -> Image.Image:
    """A distinct synthetic image: four random scenes, one per quadrant."""
    im = Image.new("RGB", (192, 192))
    for k, xy in enumerate([(0, 0), (96, 0), (0, 96), (96, 96)]):
        im.paste(render(random_scene(rng), 96, 96, seed=i * 4 + k), xy)
    return im


def _crop(im, f=0.03):
    w, h = im.size
    return im.crop((round(w * f / 2), round(h * f / 2), round(w * (1 - f / 2)), round(h * (1 - f / 2))))


def _world(n_scenes=100):
    """Rows (name, jpeg bytes, clip score, embedding) and the planted {copy: (original, kind)}."""
    rng, vec = random.Random(1), np.random.default_rng(1)
    originals = {f"scene{i:03d}": _mosaic(rng, i) for i in range(n_scenes)}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
        originals[name] = Image.fromarray(getattr(data, name)()).convert("RGB")
    rows = {name: (_jpeg(im), 0.5 + 0.001 * i, vec.normal(size=64)) for i, (name, im) in enumerate(originals.items())}
    copies = {  # copy: (original, kind, bytes); copies score lower than their original unless said
        "exact1": ("astronaut", "exact", rows["astronaut"][0]), "exact2": ("scene007", "exact", rows["scene007"][0]),
        "mirror1": ("chelsea", "near", _jpeg(ImageOps.mirror(originals["chelsea"]), 60)),
        "mirror2": ("scene011", "near", _jpeg(ImageOps.mirror(originals["scene011"]), 60)),
        "requality1": ("coffee", "near", _jpeg(originals["coffee"], 40)),
        "requality2": ("scene020", "near", _jpeg(originals["scene020"], 50)),
        "crop1": ("rocket", "near", _jpeg(_crop(originals["rocket"]))),
        "crop2": ("scene030", "near", _jpeg(_crop(originals["scene030"]))),
        "crop3": ("camera", "near", _jpeg(_crop(originals["camera"]))),
        "rotated1": ("scene040", "semantic", _jpeg(originals["scene040"].transpose(Image.Transpose.ROTATE_90))),
        "rotated2": ("astronaut", "semantic", _jpeg(originals["astronaut"].transpose(Image.Transpose.ROTATE_270))),
    }
    for copy, (orig, _, body) in copies.items():
        rows[copy] = (body, rows[orig][1] - 0.3, rows[orig][2] + 0.05 * vec.normal(size=64))
    # the better copy: it ranks above its original, so the original is the one dropped
    body, clip, emb = rows["scene050"]
    rows["scene050_better"] = (_jpeg(originals["scene050"], 70), clip + 0.3, emb + 0.05 * vec.normal(size=64))
    return rows, {copy: (orig, kind) for copy, (orig, kind, _) in copies.items()} | {
        "scene050": ("scene050_better", "near")}


SCHEMA = pa.schema(list(SCORES_BASE) + list(SCORER_SCHEMAS["phash"]) + list(SCORER_SCHEMAS["clip"])
                   + [("min_side", pa.int32())])


def _write_scores(folder, rows: dict, per_shard=30) -> dict:
    """Score shards as `tapir score` commits them; returns {name: key}. One extra row is an
    exact copy whose image could not be scored (score_error): it is no one's duplicate."""
    images = [Image.open(io.BytesIO(body)).convert("RGB") for body, _, _ in rows.values()]
    hashes = PhashScorer()({"image": images})
    names = list(rows) + ["failed"]
    keys = {}
    for sid, start in enumerate(range(0, len(names), per_shard)):
        part = names[start:start + per_shard]
        cols = {c: [] for c in SCHEMA.names}
        for j, name in enumerate(part):
            key = keys[name] = f"{sid:05d}{j:04d}"
            i = start + j
            body, clip, emb = rows.get(name, rows["astronaut"])
            cols["key"].append(key)
            cols["score_error"].append("decode error: broken" if name == "failed" else None)
            cols["sha256"].append(hashlib.sha256(body).hexdigest())
            ok = name != "failed"
            cols["phash"].append(hashes["phash"][i] if ok else None)
            cols["phash_mirror"].append(hashes["phash_mirror"][i] if ok else None)
            cols["clip_score"].append(clip if ok else None)
            cols["clip_embedding"].append((emb / np.linalg.norm(emb)).astype(np.float16) if ok else None)
            cols["min_side"].append(min(images[i].size) if ok else None)
        staging = shards.new_staging(folder, sid)
        shards.write_parquet(staging / f"{shards.shard_name(sid)}.parquet", pa.table(cols, schema=SCHEMA))
        shards.commit(staging, folder, sid, [f"{shards.shard_name(sid)}.parquet"], {"count": len(part)})
    return keys


def _config(output, *overrides):
    from pipeline.config import load_config

    return load_config(None, [f"output={output}", "input.path=unused.parquet", "score.scorers=[basic,phash,clip]",
                              "score.dedup.near_max_distance=8", "score.dedup.cluster_size=16",
                              "score.dedup.partition_rows=60", *overrides])


@pytest.fixture(scope="module")
def world():
    return _world()


def _check(cfg, keys, planted, result):
    got = {}
    for sid in range(result["shards"]):
        for r in dedup.read(cfg, sid).to_pylist():
            got[r["key"]] = (r["duplicate_of"], r["duplicate_kind"])
    name = {k: n for n, k in keys.items()}
    assert len(got) == len(keys)
    found = {name[k]: (name[of], kind) for k, (of, kind) in got.items() if of}
    assert found == planted  # recall 1.0, each naming its original and kind; nothing else grouped
    return got


@pytest.mark.parametrize("k,sizes,want", [(10, [50, 30, 20], [5, 3, 2]), (7, [5, 1, 0, 1], [5, 1, 0, 1]),
                                           (3, [9, 9, 9, 9], [1, 1, 1, 1]), (12, [6, 3, 3], [6, 3, 3])])
def test_apportion_splits_centroids_in_proportion_within_each_groups_points(k, sizes, want):
    got = dedup.apportion(k, np.array(sizes))
    assert got.tolist() == want  # at least one per non-empty group, never more than its points


@pytest.mark.parametrize("levels", ["flat", "two-level"])
def test_dedup_finds_planted_duplicates_in_partitions(local_ray, world, tmp_path, monkeypatch, levels):
    rows, planted = world
    if levels == "two-level":  # k-means as at scale (sqrt(k) coarse centroids), and merges over buckets of shards
        monkeypatch.setattr(dedup, "FLAT_K", 2)
        monkeypatch.setattr(dedup, "MERGE_SHARDS", 3)
    cfg = _config(tmp_path / "run")
    keys = _write_scores(cfg.scores_dir, rows)
    assert dedup.staleness(cfg) == "it is missing"
    result = dedup.run(cfg)
    _check(cfg, keys, planted, result)
    kinds = [kind for _, kind in planted.values()]
    assert result["duplicates"] == {k: kinds.count(k) for k in ("exact", "near", "semantic")}
    assert dedup.staleness(cfg) is None and dedup.summary(cfg)["fingerprint"]["hash"] == dedup.fingerprint(cfg)["hash"]
    # every step ran on partitions: none held all the records of a kind
    total = result["rows"]
    for kind, p in result["partitions"].items():
        assert p["count"] > 1 and p["largest"] < (total * 18 if kind == "near" else total), (kind, p)
    assert result["kmeans"]["k"] == -(-total // 16) and result["shards"] == 4
    assert result["kmeans"]["coarse"] == (1 if levels == "flat" else math.ceil(math.sqrt(result["kmeans"]["k"])))
    assert not (cfg.scores_dir / "_dedup" / "_work").exists()  # partition files removed


def test_changed_settings_or_scores_make_dedup_stale_and_a_failed_run_leaves_no_summary(local_ray, world, tmp_path):
    rows, _ = world
    cfg = _config(tmp_path / "run", "score.dedup.semantic=false")
    _write_scores(cfg.scores_dir, rows)
    dedup.run(cfg)
    assert dedup.staleness(_config(tmp_path / "run", "score.dedup.semantic=false",
                                   "score.dedup.partition_rows=1000")) is None  # speed only
    assert "score.dedup.near_max_distance was 8, now 4" in dedup.staleness(
        _config(tmp_path / "run", "score.dedup.semantic=false", "score.dedup.near_max_distance=4"))
    record = shards.read_stats(cfg.scores_dir, 1)
    shards.atomic_write(shards.stats_path(cfg.scores_dir, 1), json.dumps(record | {"duration": 1.0}))
    assert "its input scores changed" in dedup.staleness(cfg)
    (cfg.scores_dir / "00002.parquet").write_bytes(b"not parquet")  # a shard no task can read
    with pytest.raises(RuntimeError, match="dedup: scan failed on 2"):
        dedup.run(cfg)
    assert dedup.staleness(cfg) == "it is missing"  # no summary that lies about the files


def test_dedup_on_object_storage(local_ray, world, s3):
    """Score shards, partition files and results on the loopback S3 server (no local folder)."""
    from pipeline import storage

    rows, planted = world
    cfg = _config(f"{s3}/run", "score.dedup.partition_rows=400")  # fewer, larger objects: each is a request
    keys = _write_scores(cfg.scores_dir, rows)
    result = dedup.run(cfg)
    _check(cfg, keys, planted, result)
    assert not storage.path(f"{s3}/run/scores/_dedup/_work").exists()


def test_a_shard_without_a_scored_row_is_no_obstacle(local_ray, world, tmp_path):
    """A score shard whose every row failed (no hash, no embedding) has no records in any
    partition: dedup still runs, and that shard's file lists its rows as kept."""
    rows, planted = world
    assert len(rows) % 39 == 0  # the last shard then holds only the failed row
    cfg = _config(tmp_path / "run")
    keys = _write_scores(cfg.scores_dir, rows, per_shard=39)
    result = dedup.run(cfg)
    _check(cfg, keys, planted, result)
    last = dedup.read(cfg, result["shards"] - 1).to_pylist()
    assert [r["key"] for r in last] == [keys["failed"]] and last[0]["duplicate_of"] is None
