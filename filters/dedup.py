"""Duplicate detection within one partition: exact (sha256), near (pHash) and semantic (SemDeDup).

Plain numpy and faiss over one partition's records (``pipeline.dedup`` runs them as Ray
tasks over hash partitions of the whole dataset, so no process holds every row).

The rule is SemDeDup's (Abbas et al. 2023), for every kind: rows are *ranked* by
``clip_score`` (highest first), then ``min_side`` (largest first), then ``key`` (smallest
first); a row is a duplicate when it duplicates a better-ranked row, and names the
best-ranked one it duplicates. A rank is a function of the row's own values, so ranks
computed in different partitions agree and no global union-find is needed. A row that is
a duplicate of several kinds records the strongest (:data:`KIND_RANK`: exact, then near,
then semantic).

- exact: same sha256 of the downloaded bytes;
- near: 64-bit perceptual hashes (or a hash and the other's mirror-image hash) within
  ``max_distance`` bits. Partitions group hashes that agree on one of ``max_distance + 1``
  chunks (:func:`phash_chunks`; pigeonhole: two hashes within d bits agree on one chunk
  exactly); inside a chunk group faiss's multi-hash index finds the close pairs on the
  remaining bits the same way (:func:`close_pairs`), so no all-pairs scan is made;
- semantic: cosine above a threshold between CLIP image embeddings of one k-means cluster
  (:func:`semantic_best`), compared block by block.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schemas import DEDUP as SCHEMA

KIND_RANK = {"exact": 0, "near": 1, "semantic": 2}
RANK_ORDER = [("clip", "descending"), ("side", "descending"), ("key", "ascending")]
NONE = np.iinfo(np.int64).max  # "no row"
SMALL_GROUP = 64  # chunk groups up to this size are compared pair by pair, larger ones through faiss

__all__ = ["SCHEMA", "KIND_RANK", "rank", "best_in_groups", "exact_best", "phash_chunks", "close_pairs",
           "near_best", "semantic_best", "semantic_partition_best", "embeddings"]


def rank(records: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """``records`` (columns key, clip, side, ...; a row may repeat) sorted best-ranked first,
    and a row id per record: records of one key share an id, and a smaller id ranks better."""
    records = records.take(pc.sort_indices(records, sort_keys=RANK_ORDER))
    keys = records["key"].to_numpy(zero_copy_only=False)
    new = np.ones(len(keys), bool)
    new[1:] = keys[1:] != keys[:-1]
    return records, np.cumsum(new) - 1


def _top2(group: np.ndarray, row: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """The best and second-best distinct row of each group (:data:`NONE` when absent)."""
    order = np.lexsort((row, group))
    g, r = group[order], row[order]
    distinct = np.ones(len(g), bool)
    distinct[1:] = (g[1:] != g[:-1]) | (r[1:] != r[:-1])
    g, r = g[distinct], r[distinct]
    first = np.ones(len(g), bool)
    first[1:] = g[1:] != g[:-1]
    second = np.zeros(len(g), bool)
    second[1:] = ~first[1:] & first[:-1]
    top1, top2 = np.full(n_groups, NONE), np.full(n_groups, NONE)
    top1[g[first]], top2[g[second]] = r[first], r[second]
    return top1, top2


def best_in_groups(group: np.ndarray, row: np.ndarray, neighbours: tuple | None = None) -> np.ndarray:
    """For each row id: the best-ranked *better* row it shares a group with, or a neighbouring
    group (``neighbours``: (lims, ids) CSR over groups, each group its own neighbour too);
    -1 when it has none (a kept row). ``group`` and ``row`` are per membership (a row may
    be in several groups)."""
    n_groups, n_rows = int(group.max()) + 1, int(row.max()) + 1
    top1, top2 = _top2(group, row, n_groups)
    if neighbours is not None:  # the two best distinct rows over each group's neighbourhood
        lims, ids = neighbours
        src = np.repeat(np.arange(n_groups), np.diff(lims))
        cand = np.concatenate([top1[ids], top2[ids]])
        src = np.concatenate([src, src])
        real = cand != NONE
        top1, top2 = _top2(src[real], cand[real], n_groups)
    other = np.where(top1[group] != row, top1[group], top2[group])
    best = np.full(n_rows, NONE)
    np.minimum.at(best, row, other)
    return np.where(best < np.arange(n_rows), best, -1)


def exact_best(records: pa.Table) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Exact duplicates in one partition. ``records``: key, clip, side, sha256.
    Returns (records ranked, row id per record, best better row per row or -1)."""
    records, row = rank(records)
    group = pc.dictionary_encode(records["sha256"].combine_chunks()).indices.to_numpy()
    return records, row, best_in_groups(group, row)


def phash_chunks(h: np.ndarray, max_distance: int) -> list[np.ndarray]:
    """The ``max_distance + 1`` disjoint bit chunks of each 64-bit hash (chunk i: bits
    [i*w, (i+1)*w), w = 64 // (max_distance + 1)). Two hashes within ``max_distance`` bits
    agree exactly on at least one chunk."""
    m = max_distance + 1
    w = 64 // m
    if w == 64:
        return [h.astype(np.uint64)]
    mask = np.uint64((1 << w) - 1)
    return [(h.astype(np.uint64) >> np.uint64(i * w)) & mask for i in range(m)]


def _without_chunk(h: np.ndarray, i: int, w: int) -> np.ndarray:
    """``h`` with bits [i*w, (i+1)*w) cut out (the higher bits shifted down): 64 - w bits."""
    low = h & np.uint64((1 << (i * w)) - 1)
    high = h >> np.uint64((i + 1) * w) if (i + 1) * w < 64 else np.zeros_like(h)
    return low | (high << np.uint64(i * w))


def close_pairs(codes: np.ndarray, max_distance: int, bits: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a < b) of distinct ``codes`` (uint64, the low ``bits`` bits used) within
    ``max_distance`` bits, through faiss's multi-hash index: ``max_distance + 1`` hash tables
    over disjoint chunks of the bits, so a pair within the distance shares a bucket."""
    import faiss

    n = len(codes)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    x = np.ascontiguousarray(codes.astype("<u8")).view(np.uint8).reshape(n, 8)
    m = max_distance + 1
    if bits // m == 0:  # too few bits left to split: compare all (at most 2**bits codes)
        dist = np.bitwise_count(codes[:, None] ^ codes[None, :])
        a, b = np.nonzero(np.triu(dist <= max_distance, k=1))
        return a, b
    index = faiss.IndexBinaryMultiHash(64, m, bits // m)
    index.add(x)
    lims, _, ids = index.range_search(x, max_distance + 1)  # distances < radius
    src = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
    keep = src < ids
    return src[keep], ids[keep].astype(np.int64)


def near_best(records: pa.Table, max_distance: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Near duplicates in one partition. ``records``: key, clip, side, hash (uint64: a phash or
    mirror-image phash), chunk (which chunk of the hash put the record in this partition).
    Returns (records ranked, row id per record, best better row per row or -1)."""
    records, row = rank(records)
    h = records["hash"].to_numpy()
    chunk = records["chunk"].to_numpy()
    uniq, hid = np.unique(h, return_inverse=True)
    pairs_a, pairs_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    w = 64 // (max_distance + 1)
    if w < 64:  # with max_distance 0, equal hashes are all there is (one group per hash)
        value = np.stack(phash_chunks(h, max_distance))[chunk, np.arange(len(h))]
        order = np.lexsort((hid, value, chunk))
        c, v, u = chunk[order], value[order], hid[order]
        distinct = np.r_[True, (c[1:] != c[:-1]) | (v[1:] != v[:-1]) | (u[1:] != u[:-1])]
        c, v, u = c[distinct], v[distinct], u[distinct]
        start = np.flatnonzero(np.r_[True, (c[1:] != c[:-1]) | (v[1:] != v[:-1])])  # chunk groups
        size = np.diff(np.r_[start, len(c)])
        # small groups: every pair inside each, at once; large ones: faiss on the other bits
        group_start, group_size = np.repeat(start, size), np.repeat(size, size)
        p = np.flatnonzero((group_size > 1) & (group_size <= SMALL_GROUP))
        count = group_start[p] + group_size[p] - p - 1
        a = np.repeat(p, count)
        b = a + 1 + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        close = np.bitwise_count(uniq[u[a]] ^ uniq[u[b]]) <= max_distance
        pairs_a.append(u[a][close])
        pairs_b.append(u[b][close])
        for s, n in zip(start[size > SMALL_GROUP], size[size > SMALL_GROUP]):
            members = u[s:s + n]
            a, b = close_pairs(_without_chunk(uniq[members], int(c[s]), w), max_distance, 64 - w)
            pairs_a.append(members[a])
            pairs_b.append(members[b])
    a, b = np.concatenate(pairs_a), np.concatenate(pairs_b)
    src = np.concatenate([a, b, np.arange(len(uniq))])
    dst = np.concatenate([b, a, np.arange(len(uniq))])
    order = np.argsort(src, kind="stable")
    lims = np.searchsorted(src[order], np.arange(len(uniq) + 1))
    return records, row, best_in_groups(hid, row, (lims, dst[order]))


def semantic_best(emb: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """Rows of one cluster, best-ranked first: for each, the first (best-ranked) earlier row
    whose cosine exceeds ``threshold``, or -1. Memory: ``block`` rows times the cluster."""
    x = emb.astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    out = np.full(len(x), -1, np.int64)
    for s in range(0, len(x), block):
        e = min(len(x), s + block)
        hit = (x[s:e] @ x[:e].T) > threshold
        hit &= np.arange(e)[None, :] < np.arange(s, e)[:, None]  # better-ranked rows only
        out[s:e] = np.where(hit.any(1), hit.argmax(1), -1)
    return out


def embeddings(column) -> np.ndarray:
    """A list<float> column of equal-length vectors as an (n, dim) array."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:  # no rows: nothing tells the width (reshape(0, -1) is ambiguous)
        return np.zeros((0, 0), np.float32)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)


def semantic_partition_best(records: pa.Table, threshold: float) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Semantic duplicates in one partition. ``records``: key, clip, side, cluster, emb (one
    record per row); pairwise cosine inside each cluster only.
    Returns (records ranked, row id per record, best better row per row or -1)."""
    records, row = rank(records)
    cluster, emb = records["cluster"].to_numpy(), embeddings(records["emb"])
    best = np.full(len(row), -1, np.int64)
    order = np.argsort(cluster, kind="stable")  # rank order kept inside each cluster
    start = np.flatnonzero(np.r_[True, cluster[order][1:] != cluster[order][:-1]])
    for idx in np.split(order, start[1:]):
        if len(idx) > 1:
            local = semantic_best(emb[idx], threshold)
            found = local >= 0
            best[idx[found]] = idx[local[found]]
    return records, row, best
