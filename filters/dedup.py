"""Duplicate groups over a whole dataset: exact, near (perceptual hash) and semantic.

- exact: same content hash (img2dataset's ``sha256`` of the downloaded bytes);
- near: perceptual hashes within ``near_max_distance`` bits. Candidates come from
  splitting the 64-bit hash into ``d + 1`` bands: two hashes within d bits agree on at
  least one band (pigeonhole), so no pair is missed and no all-pairs scan is needed;
- semantic (SemDeDup, Abbas et al. 2023): spherical k-means on the CLIP image
  embeddings, then, inside each cluster only, pairs above ``semantic_threshold``
  cosine. Memory holds one cluster's embeddings at a time, not the dataset's.

Edges of all kinds join into groups (union-find). Each group keeps one member, chosen
by ``keep``: the highest ``clip_score`` (else the largest ``min_side``), ties broken by
the smallest key. Every other member records ``duplicate_of`` (the kept key) and
``duplicate_kind``, the strongest kind of edge that joined it (exact > near > semantic).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

KIND_RANK = {"exact": 0, "near": 1, "semantic": 2}
SCHEMA = pa.schema([("key", pa.string()), ("duplicate_of", pa.string()), ("duplicate_kind", pa.string())])


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def exact_edges(hashes: list) -> list[tuple[int, int]]:
    first: dict = {}
    edges = []
    for i, h in enumerate(hashes):
        if h is None:
            continue
        if h in first:
            edges.append((first[h], i))
        else:
            first[h] = i
    return edges


def _bands(h: int, bands: int):
    width = 64 // bands
    for b in range(bands):
        lo = b * width
        hi = 64 if b == bands - 1 else lo + width
        yield b, (h >> lo) & ((1 << (hi - lo)) - 1)


def near_edges(phashes: list, max_distance: int, mirrors: list | None = None) -> list[tuple[int, int]]:
    """Pairs whose 64-bit hashes are within ``max_distance`` bits, found through banding.
    With ``mirrors`` (the hash of each mirrored image), a flipped copy matches too."""
    bands = max_distance + 1
    buckets: dict = defaultdict(list)
    for i, h in enumerate(phashes):
        if h is not None:
            for band in _bands(h, bands):
                buckets[band].append(i)
    edges = set()
    for i, h in enumerate(phashes):
        if h is None:
            continue
        variants = [h] + ([mirrors[i]] if mirrors is not None and mirrors[i] is not None else [])
        for v in variants:
            for band in _bands(v, bands):
                for j in buckets[band]:
                    if j > i and bin(v ^ phashes[j]).count("1") <= max_distance:
                        edges.add((i, j))
    return sorted(edges)


def kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Spherical k-means on unit vectors; returns centroids (k, d)."""
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), size=k, replace=False)].astype(np.float32)
    for _ in range(iters):
        assign = np.argmax(x @ centroids.T, axis=1)
        for c in range(k):
            members = x[assign == c]
            if len(members):
                v = members.sum(0)
                centroids[c] = v / max(np.linalg.norm(v), 1e-12)
    return centroids


def semantic_edges(embeddings_by_shard, n: int, threshold: float, cluster_size: int, workdir,
                   sample: int = 100_000) -> list[tuple[int, int]]:
    """SemDeDup edges. ``embeddings_by_shard()`` yields (row indices, float16 unit vectors) for
    one shard at a time and is read twice: for a k-means sample, then to spill each shard's
    rows into per-cluster files under ``workdir``. Memory holds one shard, then one cluster."""
    from pathlib import Path

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    k = max(1, -(-n // cluster_size))
    per_shard = max(1, sample // max(1, k))
    rng = np.random.default_rng(0)
    fit = [emb[rng.permutation(len(emb))[:per_shard]] for _, emb in embeddings_by_shard() if len(emb)]
    fit = np.concatenate(fit).astype(np.float32) if fit else np.zeros((0, 1), np.float32)
    if len(fit) < 2:
        return []
    centroids = kmeans(fit, min(k, len(fit)))
    files: dict[int, list] = defaultdict(list)
    for s, (idx, emb) in enumerate(embeddings_by_shard()):
        assign = np.argmax(emb.astype(np.float32) @ centroids.T, axis=1)
        for c in np.unique(assign):
            path = workdir / f"c{int(c)}_s{s}.npz"
            np.savez(path, idx=idx[assign == c], emb=emb[assign == c])
            files[int(c)].append(path)
    edges = []
    for paths in files.values():
        parts = [np.load(p) for p in paths]
        idx = np.concatenate([p["idx"] for p in parts])
        emb = np.concatenate([p["emb"] for p in parts]).astype(np.float32)
        a, b = np.nonzero(np.triu(emb @ emb.T > threshold, k=1))
        edges.extend(zip(idx[a].tolist(), idx[b].tolist()))
        for p in paths:
            p.unlink()
    return edges


def groups(keys: list[str], edges_by_kind: dict[str, list], priority: list) -> pa.Table:
    """One row per key: duplicate_of (kept key) and duplicate_kind, null for kept rows."""
    uf = UnionFind(len(keys))
    strongest = [None] * len(keys)
    for kind, edges in edges_by_kind.items():
        for a, b in edges:
            uf.union(a, b)
            for i in (a, b):
                if strongest[i] is None or KIND_RANK[kind] < KIND_RANK[strongest[i]]:
                    strongest[i] = kind
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(keys)):
        members[uf.find(i)].append(i)
    duplicate_of, kind = [None] * len(keys), [None] * len(keys)
    for group in members.values():
        if len(group) == 1:
            continue
        keep = min(group, key=lambda i: (priority[i], keys[i]))
        for i in group:
            if i != keep:
                duplicate_of[i], kind[i] = keys[keep], strongest[i]
    return pa.table({"key": keys, "duplicate_of": duplicate_of, "duplicate_kind": kind}, schema=SCHEMA)
