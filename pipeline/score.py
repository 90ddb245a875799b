"""The score stage: raw/ shards -> scores/NNNNN.parquet (key + one column per score).

Reads any folder in img2dataset's webdataset layout (NNNNN.tar + NNNNN.parquet +
NNNNN_stats.json). Each shard is scored by an actor that loaded its models once
(``ScoreShard.setup``), decoding and preprocessing the next batch on a thread while
the models run on the current one. A shard's scores are committed atomically; a rerun
scores only the shards without a completion record. After all shards, duplicate groups
are computed over the whole dataset into ``scores/_dedup.parquet``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import shards
from pipeline.config import RunConfig, ScoreConfig

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BASE_SCHEMA = pa.schema([("key", pa.string()), ("score_error", pa.string()), ("sha256", pa.string())])


def build_scorers(cfg: ScoreConfig) -> list:
    from filters.basic import BasicScorer, LanguageScorer, PhashScorer
    from filters.clip import ClipScorer
    from filters.safety import NsfwScorer, OcrScorer

    make = {
        "basic": BasicScorer, "language": LanguageScorer, "phash": PhashScorer,
        "clip": lambda: ClipScorer(cfg.clip.model, cfg.clip.pretrained, cfg.clip.device, cfg.clip.precision),
        "nsfw": NsfwScorer, "ocr": lambda: OcrScorer(cfg.ocr_max_side),
    }
    return [make[name]() for name in cfg.scorers]


def expected_schema(cfg: ScoreConfig) -> pa.Schema:
    """The columns ``tapir score`` will write (and ``_dedup.parquet`` adds), known without
    loading a model: rules are checked against it before any work starts."""
    from filters.basic import BasicScorer, LanguageScorer, PhashScorer
    from filters.dedup import SCHEMA as DEDUP
    from filters.safety import NsfwScorer, OcrScorer

    static = {"basic": BasicScorer.schema, "language": LanguageScorer.schema, "phash": PhashScorer.schema,
              "nsfw": NsfwScorer.schema, "ocr": OcrScorer.schema,
              "clip": pa.schema([("clip_score", pa.float32()), ("clip_embedding", pa.list_(pa.float16()))])}
    fields = list(BASE_SCHEMA) + [f for name in cfg.scorers for f in static[name]] + list(DEDUP)[1:]
    return pa.schema(fields)


def _decode(data: bytes | None):
    from PIL import Image

    if data is None:
        return None, "image missing from the tar"
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB"), None
    except Exception as e:  # a corrupt image is a row's reason, never a crash
        return None, f"decode error: {type(e).__name__}: {e}"


@dataclass
class ScoreShard:
    """Scores one shard; a plain class (no Ray), run on an actor pool by pipeline.ray_backend."""

    config: dict
    threads: int = 1

    def setup(self) -> None:
        import torch

        torch.set_num_threads(max(1, self.threads))
        self.cfg = RunConfig.model_validate(self.config)
        self.scorers = build_scorers(self.cfg.score)
        for scorer in self.scorers:
            scorer.setup()
        self.clip = next((s for s in self.scorers if s.name == "clip"), None)

    def _load(self, shard_id: int) -> tuple[list[str], list, list, list]:
        src, name = self.cfg.score_input, shards.shard_name(shard_id)
        meta = pq.read_table(src / f"{name}.parquet")
        meta = meta.filter(pc.equal(meta["status"], "success")).sort_by("key")
        members = shards.read_tar(src / f"{name}.tar")
        keys = meta["key"].to_pylist()
        captions = meta["caption"].to_pylist() if "caption" in meta.column_names else [None] * len(keys)
        datas, hashes = [], []
        for i, key in enumerate(keys):
            m = members.get(key, {})
            datas.append(next((m[e] for e in IMAGE_EXTS if e in m), None))
            if captions[i] is None and "txt" in m:
                captions[i] = m["txt"].decode("utf-8", "replace")
        if "sha256" in meta.column_names:
            hashes = meta["sha256"].to_pylist()
        else:
            hashes = [hashlib.sha256(d).hexdigest() if d else None for d in datas]
        return keys, captions, datas, hashes

    def _prepare(self, idx: list[int], captions, datas) -> dict:
        decoded = [_decode(datas[i]) for i in idx]
        ok = [i for i, (im, _) in zip(idx, decoded) if im is not None]
        batch = {"index": ok, "image": [im for im, _ in decoded if im is not None],
                 "image_bytes": [datas[i] for i in ok], "caption": [captions[i] for i in ok],
                 "errors": {i: err for i, (_, err) in zip(idx, decoded) if err}}
        if self.clip is not None and batch["image"]:
            batch["clip_pixels"] = self.clip.prepare(batch["image"])
        return batch

    def __call__(self, shard_id: int) -> dict:
        start = time.time()
        keys, captions, datas, hashes = self._load(shard_id)
        n, bs = len(keys), self.cfg.score.batch_size
        columns: dict[str, list] = {}
        errors: dict[int, str] = {}
        chunks = [list(range(i, min(n, i + bs))) for i in range(0, n, bs)]
        with ThreadPoolExecutor(1) as pool:  # decode the next batch while the models run
            future = pool.submit(self._prepare, chunks[0], captions, datas) if chunks else None
            for c in range(len(chunks)):
                batch = future.result()
                if c + 1 < len(chunks):
                    future = pool.submit(self._prepare, chunks[c + 1], captions, datas)
                errors.update(batch["errors"])
                if not batch["index"]:
                    continue
                for scorer in self.scorers:
                    for col, values in scorer(batch).items():
                        column = columns.setdefault(col, [None] * n)
                        for i, v in zip(batch["index"], values):
                            column[i] = v
        table = self._table(keys, hashes, errors, columns)
        return self._commit(shard_id, table, start)

    def _table(self, keys, hashes, errors, columns) -> pa.Table:
        fields = list(BASE_SCHEMA)
        data = {"key": keys, "score_error": [errors.get(i) for i in range(len(keys))], "sha256": hashes}
        for scorer in self.scorers:
            for f in scorer.schema:
                fields.append(f)
                values = columns.get(f.name, [None] * len(keys))
                if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type):
                    values = [None if v is None else np.asarray(v, dtype=np.float16) for v in values]
                data[f.name] = values
        return pa.table({f.name: pa.array(data[f.name], type=f.type) for f in fields})

    def _commit(self, shard_id: int, table: pa.Table, start: float) -> dict:
        out, name = self.cfg.scores_dir, shards.shard_name(shard_id)
        staging = shards.new_staging(out, shard_id)
        shards.write_parquet(staging / f"{name}.parquet", table)
        errors = table["score_error"].drop_null().to_pylist()
        stats = {"count": table.num_rows, "scored": table.num_rows - len(errors), "errors": len(errors),
                 "error_reasons": {e.split(":")[0]: errors.count(e) for e in errors} if errors else {},
                 "scorers": [s.name for s in self.scorers], "duration": time.time() - start}
        shards.commit(staging, out, shard_id, [f"{name}.parquet"], stats)
        return stats


def read_scores(folder: Path, columns: list[str] | None = None) -> pa.Table:
    """All committed score shards (optionally only some columns), in shard order."""
    ids = sorted(shards.done_shards(folder))
    if not ids:
        raise FileNotFoundError(f"no scored shards in {folder}; run `tapir score` first")
    return pa.concat_tables([pq.read_table(Path(folder) / f"{shards.shard_name(i)}.parquet", columns=columns)
                             for i in ids])


def dedup(cfg: RunConfig) -> pa.Table:
    """Duplicate groups over every scored shard; written to scores/_dedup.parquet."""
    from filters import dedup as dd

    folder, d = cfg.scores_dir, cfg.score.dedup
    names = pq.read_schema(next(folder.glob("0*.parquet"))).names
    wanted = [c for c in ("key", "score_error", "sha256", "phash", "phash_mirror", "clip_score", "min_side")
              if c in names]
    table = read_scores(folder, wanted)
    keys = table["key"].to_pylist()
    valid = np.asarray(pc.is_null(table["score_error"]).to_numpy(zero_copy_only=False), dtype=bool)
    edges = {}
    if d.exact:
        edges["exact"] = dd.exact_edges([h if ok else None for h, ok in zip(table["sha256"].to_pylist(), valid)])
    if d.near and "phash" in names:
        edges["near"] = dd.near_edges([h if ok else None for h, ok in zip(table["phash"].to_pylist(), valid)],
                                      d.near_max_distance, table["phash_mirror"].to_pylist())
    if d.semantic and "clip_embedding" in names:
        def by_shard():
            start = 0
            for sid in sorted(shards.done_shards(folder)):
                t = pq.read_table(folder / f"{shards.shard_name(sid)}.parquet", columns=["clip_embedding"])
                col = t["clip_embedding"]
                idx = np.arange(start, start + len(col))
                start += len(col)
                mask = np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), dtype=bool)
                if mask.any():
                    emb = np.stack(col.filter(pc.is_valid(col)).to_numpy(zero_copy_only=False))
                    yield idx[mask], emb.astype(np.float16)

        edges["semantic"] = dd.semantic_edges(by_shard, len(keys), d.semantic_threshold, d.cluster_size,
                                              folder / "_staging" / "semdedup")
    score = table["clip_score"].to_pylist() if "clip_score" in names else [None] * len(keys)
    side = table["min_side"].to_pylist() if "min_side" in names else [None] * len(keys)
    priority = [(-(s if s is not None else -np.inf), -(m or 0)) for s, m in zip(score, side)]
    result = dd.groups(keys, edges, priority)
    tmp = folder / "_dedup.parquet.tmp"
    pq.write_table(result, tmp)
    tmp.replace(folder / "_dedup.parquet")
    return result


def score(cfg: RunConfig) -> dict:
    """Run the score stage; return its funnel."""
    from pipeline import ray_backend
    from pipeline.report import score_funnel

    ray_backend.quiet_env()
    src, out = cfg.score_input, cfg.scores_dir
    available = shards.done_shards(src)
    if not available:
        raise FileNotFoundError(f"no completed shards to score in {src} (expected NNNNN.tar, NNNNN.parquet, "
                                f"NNNNN_stats.json as img2dataset writes them)")
    out.mkdir(parents=True, exist_ok=True)
    shards.clear_staging(out)
    todo = sorted(available - shards.done_shards(out))
    ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
    gpus = cfg.resources.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray_backend.cluster_gpus() >= 1 and "clip" in cfg.score.scorers else 0.0
    actors = cfg.score.actors or (int(ray_backend.cluster_gpus() / gpus) if gpus else
                                  max(1, int(ray_backend.cluster_cpus() / cfg.resources.cpus_per_actor)))
    rows = {sid: json_count(src, sid) for sid in todo}
    stage = ScoreShard(cfg.model_dump(), threads=int(cfg.resources.cpus_per_actor))
    failures = {}
    for sid, result, _ in ray_backend.run_actor_pool(
            stage, todo, desc="score", actors=actors, num_cpus=cfg.resources.cpus_per_actor, num_gpus=gpus,
            weight=lambda s: rows[s], unit="img"):
        if isinstance(result, Exception):
            failures[sid] = result
            log.error("scoring shard %s failed: %s (rerun to retry it)", sid, result)
    if todo or not (out / "_dedup.parquet").exists():
        dedup(cfg)
    funnel = score_funnel(Path(cfg.output), cfg.scores_dir)
    if failures:
        funnel["failed_shards"] = {str(k): str(v)[:500] for k, v in failures.items()}
    return funnel


def json_count(folder: Path, shard_id: int) -> int:
    stats = shards.read_stats(folder, shard_id)
    return int(stats.get("successes", stats.get("count", 1)))
