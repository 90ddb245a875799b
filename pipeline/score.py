"""The score stage: raw/ shards -> scores/NNNNN.parquet (key + one column per score).

Reads any folder in img2dataset's webdataset layout (NNNNN.tar + NNNNN.parquet +
NNNNN_stats.json). Model scorers (CLIP) run on an actor pool that loaded the model once
per actor, on a GPU when there is one; CPU scorers (basic, language, phash, NSFW, OCR)
run as Ray tasks at the same time. Both decode and preprocess the next batch on a thread
while the current one is scored, and write their part of a shard atomically
(scores/_parts/GROUP/); a shard is committed once all its parts are in, and a rerun
redoes only what has no completion record. After all shards, duplicate groups are
computed over the whole dataset into ``scores/_dedup.parquet``.

Every part and shard record carries a fingerprint (:func:`shard_fingerprint`: the settings
that change its bytes and the record of the raw shard it was made from). A rerun with
other settings refuses, naming the change, or redoes the changed shards with ``--redo``;
stale parts of a killed run are redone, never merged. ``_dedup.parquet`` carries the
dedup settings and a digest of the score records it was computed from (parquet metadata)
and is recomputed whenever either changed. A shard that fails leaves
``NNNNN_failed.json``; the command then exits non-zero.
"""

from __future__ import annotations

import functools
import hashlib
import json
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


MODEL_SCORERS = ("clip",)  # run on actor pools (GPUs when present); the others run as CPU tasks
DEDUP_META = b"tapir.fingerprint"  # _dedup.parquet's schema metadata: what it was computed from


def shard_settings(cfg: ScoreConfig) -> dict:
    """The settings that change a score shard's bytes: the scorers and their models, not
    batch size, actors, threads or device (where it runs, not what it computes)."""
    out = {"score.scorers": list(cfg.scorers)}
    if "clip" in cfg.scorers:
        out |= {f"score.clip.{k}": getattr(cfg.clip, k) for k in ("model", "pretrained", "precision")}
    if "ocr" in cfg.scorers:
        out |= {"score.ocr_max_side": cfg.ocr_max_side, "score.ocr_min_confidence": cfg.ocr_min_confidence}
    return out


def shard_fingerprint(cfg: RunConfig, shard_id: int) -> dict:
    """What a score shard (and each of its parts) must have been made from: the settings
    and the completion record of its raw shard."""
    return shards.fingerprint(shard_settings(cfg.score),
                              {f"raw/{shards.shard_name(shard_id)}": shards.record_digest(cfg.score_input, shard_id)})


def scores_digest(folder: Path) -> str:
    """One digest of every committed score record (which shards, and which version of each):
    it changes when any shard is added or redone. One line per shard, so it scales."""
    h = hashlib.sha256()
    for sid in sorted(shards.done_shards(folder)):
        h.update(f"{shards.shard_name(sid)} {shards.record_digest(folder, sid)}\n".encode())
    return h.hexdigest()


def dedup_fingerprint(cfg: RunConfig) -> dict:
    return shards.fingerprint(shards.settings_of(cfg.score.dedup, "score.dedup"),
                              {"scores": scores_digest(cfg.scores_dir)})


def dedup_staleness(cfg: RunConfig) -> str | None:
    """Why ``scores/_dedup.parquet`` does not match the current score shards and dedup
    settings (None when it does)."""
    path = cfg.scores_dir / "_dedup.parquet"
    if not path.exists():
        return "it is missing"
    meta = pq.read_schema(path).metadata or {}
    have = json.loads(meta[DEDUP_META]) if DEDUP_META in meta else None
    want = dedup_fingerprint(cfg)
    return None if have and have["hash"] == want["hash"] else shards.explain_change(have, want)


def build_scorers(cfg: ScoreConfig, names: list[str]) -> list:
    from filters.basic import BasicScorer, LanguageScorer, PhashScorer
    from filters.clip import ClipScorer
    from filters.safety import NsfwScorer, OcrScorer

    make = {
        "basic": BasicScorer, "language": LanguageScorer, "phash": PhashScorer,
        "clip": lambda: ClipScorer(cfg.clip.model, cfg.clip.pretrained, cfg.clip.device, cfg.clip.precision),
        "nsfw": NsfwScorer, "ocr": lambda: OcrScorer(cfg.ocr_max_side, cfg.ocr_min_confidence),
    }
    return [make[name]() for name in names]


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
    if data is None:
        return None, "image missing from the tar"
    try:  # JPEG, PNG and WebP only (what img2dataset writes): no other Pillow parser sees these bytes
        with shards.open_image(data) as im:
            return im.convert("RGB"), None
    except Exception as e:  # a corrupt image is a row's reason, never a crash
        return None, f"decode error: {type(e).__name__}: {e}"


_WORKER_CACHE: dict = {}


@dataclass
class ScoreShard:
    """Scores one shard with a group of scorers and commits that group's part.

    A plain class (no Ray): pipeline.ray_backend runs the model group on an actor pool
    (``setup`` once per actor) and the CPU group as tasks (``as_task``: set up once per
    worker process and reused).
    """

    config: dict
    group: str  # "cpu" or "model"
    scorer_names: list
    threads: int = 1
    with_hash: bool = True  # one part per shard carries the content hash

    def setup(self) -> None:
        import torch

        torch.set_num_threads(max(1, self.threads))
        self.cfg = RunConfig.model_validate(self.config)
        self.scorers = build_scorers(self.cfg.score, self.scorer_names)
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
        table = self._table(keys, hashes if self.with_hash else None, errors, columns)
        return self._commit(shard_id, table, start)

    def _table(self, keys, hashes, errors, columns) -> pa.Table:
        fields = list(BASE_SCHEMA) if hashes is not None else list(BASE_SCHEMA)[:2]
        data = {"key": keys, "score_error": [errors.get(i) for i in range(len(keys))], "sha256": hashes}
        for scorer in self.scorers:
            for f in scorer.schema:
                fields.append(f)
                values = columns.get(f.name, [None] * len(keys))
                if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type):
                    values = [None if v is None else np.asarray(v, dtype=np.float16) for v in values]
                data[f.name] = values
        return pa.table({f.name: pa.array(data[f.name], type=f.type) for f in fields})

    def as_task(self, shard_id: int) -> dict:
        key = (self.group, repr(self.config))
        if key not in _WORKER_CACHE:
            self.setup()
            _WORKER_CACHE[key] = self
        return _WORKER_CACHE[key](shard_id)

    def _commit(self, shard_id: int, table: pa.Table, start: float) -> dict:
        out, name = part_dir(self.cfg, self.group), shards.shard_name(shard_id)
        staging = shards.new_staging(out, shard_id)
        shards.write_parquet(staging / f"{name}.parquet", table)
        errors = table["score_error"].drop_null().to_pylist()
        stats = {"count": table.num_rows, "scored": table.num_rows - len(errors), "errors": len(errors),
                 "error_reasons": {e.split(":")[0]: errors.count(e) for e in errors} if errors else {},
                 "scorers": [s.name for s in self.scorers], "duration": time.time() - start}
        shards.commit(staging, out, shard_id, [f"{name}.parquet"], stats,
                      fingerprint=shard_fingerprint(self.cfg, shard_id))
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
    ids = sorted(shards.done_shards(folder))
    if not ids:
        raise FileNotFoundError(f"no scored shards in {folder} to find duplicates in (every shard failed, see "
                                f"its NNNNN_failed.json, or none was scored yet)")
    made_from = dedup_fingerprint(cfg)  # before reading: a shard redone meanwhile makes it stale, never silently mixed
    names = pq.read_schema(folder / f"{shards.shard_name(ids[0])}.parquet").names
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
            for sid in ids:
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
    result = result.replace_schema_metadata({DEDUP_META: json.dumps(made_from)})
    shards.atomic_write_parquet(folder / "_dedup.parquet", result)
    return result


def part_dir(cfg: RunConfig, group: str) -> Path:
    return cfg.scores_dir / "_parts" / group


def merge_parts(cfg: RunConfig, shard_id: int, groups: list[str]) -> None:
    """Join the groups' parts of a shard (same keys, same order) into scores/NNNNN.parquet."""
    name = shards.shard_name(shard_id)
    made_from = shard_fingerprint(cfg, shard_id)
    stats = [shards.read_stats(part_dir(cfg, g), shard_id) for g in groups]
    for g, st in zip(groups, stats):  # parts are checked at start too; this holds whatever happened since
        if (st.get("fingerprint") or {}).get("hash") != made_from["hash"]:
            raise shards.StageChanged(f"score part {g}/{name} was made differently: "
                                      f"{shards.explain_change(st.get('fingerprint'), made_from)}")
    parts = [pq.read_table(part_dir(cfg, g) / f"{name}.parquet") for g in groups]
    table = parts[0]
    for part in parts[1:]:
        assert part["key"].equals(table["key"]), f"score parts of shard {name} disagree on keys"
        errors = [a or b for a, b in zip(table["score_error"].to_pylist(), part["score_error"].to_pylist())]
        table = table.set_column(table.schema.get_field_index("score_error"), "score_error",
                                 pa.array(errors, pa.string()))
        for col in part.column_names[2:]:
            table = table.append_column(part.schema.field(col), part[col])
    errors = table["score_error"].drop_null().to_pylist()
    reasons = [e.split(":")[0] for e in errors]
    record = {"count": table.num_rows, "scored": table.num_rows - len(errors), "errors": len(errors),
              "error_reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
              "scorers": [n for st in stats for n in st["scorers"]], "duration": sum(st["duration"] for st in stats)}
    staging = shards.new_staging(cfg.scores_dir, shard_id)
    shards.write_parquet(staging / f"{name}.parquet", table)
    shards.commit(staging, cfg.scores_dir, shard_id, [f"{name}.parquet"], record, fingerprint=made_from)
    for g in groups:
        for f in (f"{name}.parquet", f"{name}_stats.json"):
            (part_dir(cfg, g) / f).unlink(missing_ok=True)


def score(cfg: RunConfig) -> dict:
    """Run the score stage; return its funnel (``failed_shards`` when a shard failed).

    CPU scorers run as Ray tasks and model scorers on an actor pool (a GPU per actor when
    the cluster has GPUs), at the same time; each writes its part of a shard, and a shard
    is committed once all its parts are in. A model that cannot load stops the stage here,
    before any work (:func:`filters.clip.check_clip`).
    """
    from pipeline import ray_backend
    from pipeline.report import score_funnel

    if "clip" in cfg.score.scorers:
        from filters.clip import check_clip

        check_clip(cfg.score.clip.model, cfg.score.clip.pretrained)
    ray_backend.quiet_env()
    src, out = cfg.score_input, cfg.scores_dir
    available = shards.done_shards(src)
    if not available:
        raise FileNotFoundError(f"no completed shards to score in {src} (expected NNNNN.tar, NNNNN.parquet, "
                                f"NNNNN_stats.json as img2dataset writes them)")
    groups = {"cpu": [n for n in cfg.score.scorers if n not in MODEL_SCORERS],
              "model": [n for n in cfg.score.scorers if n in MODEL_SCORERS]}
    groups = {g: names for g, names in groups.items() if names}
    out.mkdir(parents=True, exist_ok=True)
    expected = functools.partial(shard_fingerprint, cfg)
    redone = shards.stale_shards(out, expected, redo=cfg.redo, stage="score")  # refuses unless --redo
    for g in groups:
        part_dir(cfg, g).mkdir(parents=True, exist_ok=True)
        shards.clear_staging(part_dir(cfg, g))
        # parts are not output: one made with other settings or from another raw shard is redone, never merged
        stale = shards.stale_shards(part_dir(cfg, g), expected, redo=True, stage="score")
        if stale:
            log.info("redoing %d %s part(s) made with other settings or inputs", len(stale), g)
    if redone:
        log.info("redoing %d shard(s) whose settings or inputs changed (--redo)", len(redone))
    shards.clear_staging(out)
    shards.prune_failures(out, available)  # failure records of raw shards that no longer exist
    todo = sorted(available - shards.done_shards(out))
    failures: dict[int, BaseException] = {}
    if todo:
        ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
        _score_shards(cfg, groups, todo, failures)
    for sid, err in sorted(failures.items()):
        log.error("scoring shard %s failed: %s (rerun to retry it)", shards.shard_name(sid), err)
        shards.record_failure(out, sid, "score", f"{type(err).__name__}: {err}")
    if not shards.done_shards(out):
        log.error("no shard could be scored; no duplicate groups computed")
    elif reason := dedup_staleness(cfg):
        log.info("computing duplicate groups (scores/_dedup.parquet: %s)", reason)
        dedup(cfg)
    funnel = score_funnel(Path(cfg.output), cfg.scores_dir)
    if failures:
        funnel["failed_shards"] = {str(k): f"{type(v).__name__}: {v}"[:500]
                                   for k, v in sorted(failures.items())}
    return funnel


def _score_shards(cfg: RunConfig, groups: dict, todo: list[int], failures: dict) -> None:
    """Score ``todo``: the CPU group as tasks on a thread, the model group on an actor pool
    here; merge each shard when its parts are in. A shard that fails (either part or the
    merge) goes into ``failures``; anything else that goes wrong, in either loop, raises."""
    import threading

    from pipeline import ray_backend

    out, src = cfg.scores_dir, cfg.score_input
    rows = {sid: json_count(src, sid) for sid in todo}
    dump = cfg.model_dump()
    lock = threading.Lock()

    def merge_if_ready(sid: int) -> None:  # commit a shard as soon as all its parts are in
        with lock:
            if sid in failures or sid in shards.done_shards(out):
                return
            if all(shards.stats_path(part_dir(cfg, g), sid).exists() for g in groups):
                try:
                    merge_parts(cfg, sid, list(groups))
                except Exception as e:  # a shard that cannot be merged (disk full, parts that disagree) fails alone
                    failures[sid] = e

    def collect(results) -> None:
        for sid, result, _ in results:
            if isinstance(result, Exception):
                with lock:
                    failures[sid] = result
            else:
                merge_if_ready(sid)

    thread_error: list[BaseException] = []

    def run_cpu() -> None:  # an exception here must fail the command, not end a thread quietly
        try:
            stage = ScoreShard(dump, "cpu", groups["cpu"], with_hash=True)
            pending = sorted(set(todo) - shards.done_shards(part_dir(cfg, "cpu")))
            collect(ray_backend.run_tasks(stage.as_task, pending, desc="score (cpu)", unit="img",
                                          weight=lambda s: rows[s], num_cpus=1))
        except BaseException as e:
            thread_error.append(e)

    thread = threading.Thread(target=run_cpu, daemon=True, name="score-cpu") if "cpu" in groups else None
    if thread:
        thread.start()
    if "model" in groups:
        gpus = cfg.resources.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray_backend.cluster_gpus() >= 1 else 0.0
        cpus = cfg.resources.cpus_per_actor
        actors = cfg.score.actors or (int(ray_backend.cluster_gpus() / gpus) if gpus else
                                      max(1, int(ray_backend.cluster_cpus() / cpus) - (1 if thread else 0)))
        stage = ScoreShard(dump, "model", groups["model"], threads=int(cpus), with_hash="cpu" not in groups)
        pending = sorted(set(todo) - shards.done_shards(part_dir(cfg, "model")))
        collect(ray_backend.run_actor_pool(stage, pending, desc="score (model)", actors=actors, num_cpus=cpus,
                                           num_gpus=gpus, weight=lambda s: rows[s], unit="img"))
    if thread:
        thread.join()
    if thread_error:
        raise RuntimeError(f"the CPU scorers stopped: {type(thread_error[0]).__name__}: {thread_error[0]}") \
            from thread_error[0]
    for sid in todo:  # parts finished by an earlier, killed run
        merge_if_ready(sid)
    for sid in set(todo) - shards.done_shards(out) - set(failures):  # never a shard neither done nor failed
        failures[sid] = RuntimeError("a part of this shard never came back")


def json_count(folder: Path, shard_id: int) -> int:
    stats = shards.read_stats(folder, shard_id)
    return int(stats.get("successes", stats.get("count", 1)))
