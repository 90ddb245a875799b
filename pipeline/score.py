"""The score stage: raw/ shards -> scores/NNNNN.parquet (key + one column per score).

Reads any folder in img2dataset's webdataset layout (NNNNN.tar + NNNNN.parquet +
NNNNN_stats.json, any number of digits), local or on an object store. Model scorers (CLIP)
run on an actor pool that loaded the model once per actor, on a GPU when there is one; CPU
scorers (basic, language, phash, NSFW, OCR) run as Ray tasks at the same time. Both decode
and preprocess the next batch on a thread while the current one is scored, and write their
part of a shard (scores/_parts/GROUP/); a shard is committed once all its parts are in (the
merge also runs the aesthetic head over the CLIP embeddings), and a rerun redoes only what
has no completion record. Then duplicate groups are computed by :mod:`pipeline.dedup`
(scores/_dedup/) whenever they no longer match the score shards.

Every part and shard record carries a fingerprint (:func:`shard_fingerprint`: the settings
that change its bytes and the record of the raw shard it was made from). A rerun with
other settings refuses, naming the change, or redoes the changed shards with ``--redo``;
stale parts of a killed run are redone, never merged. A change of the aesthetic head alone
(``score.aesthetic``) is redone from the stored embeddings, without decoding an image. A
shard that fails leaves ``NNNNN_failed.json``; the command then exits non-zero.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schemas, shards, storage
from pipeline.config import RunConfig, ScoreConfig

log = logging.getLogger(__name__)

IMAGE_EXTS = schemas.IMAGE_MEMBERS
BASE_SCHEMA = schemas.SCORES_BASE
MODEL_SCORERS = ("clip",)  # run on actor pools (GPUs when present); the others run as CPU tasks
AESTHETIC = "score.aesthetic."  # settings of the aesthetic head: redone from the stored embeddings


def base_settings(cfg: ScoreConfig) -> dict:
    """The settings that change a score shard's bytes apart from the aesthetic head: the
    scorers and their models, not batch size, actors, threads or device (where it runs,
    not what it computes). Parts are made from these alone."""
    out = {"score.scorers": list(cfg.scorers)}
    if "clip" in cfg.scorers:
        out |= {f"score.clip.{k}": getattr(cfg.clip, k) for k in ("model", "pretrained", "precision")}
    if "ocr" in cfg.scorers:
        out |= {"score.ocr_max_side": cfg.ocr_max_side, "score.ocr_min_confidence": cfg.ocr_min_confidence}
    return out


def shard_settings(cfg: ScoreConfig) -> dict:
    """Everything that changes a score shard's bytes: :func:`base_settings` and the aesthetic
    head (its weights' location and content digest) when one is configured."""
    from filters.aesthetic import weights_digest

    out = base_settings(cfg)
    if cfg.aesthetic.weights:
        out |= {f"{AESTHETIC}weights": cfg.aesthetic.weights,
                f"{AESTHETIC}sha256": weights_digest(cfg.aesthetic.weights)}
    return out


def _upstream(cfg: RunConfig, shard_id: int) -> dict:
    return {f"raw/{shards.shard_name(shard_id)}": shards.record_digest(cfg.score_input, shard_id)}


def part_fingerprint(cfg: RunConfig, shard_id: int) -> dict:
    """What a part of a score shard must have been made from (the aesthetic head is not in parts)."""
    return shards.fingerprint(base_settings(cfg.score), _upstream(cfg, shard_id))


def shard_fingerprint(cfg: RunConfig, shard_id: int) -> dict:
    """What a score shard must have been made from: the settings and the completion record
    of its raw shard."""
    return shards.fingerprint(shard_settings(cfg.score), _upstream(cfg, shard_id))


def aesthetic_only(cfg: RunConfig, shard_id: int, have: dict | None) -> bool:
    """True when a shard recorded ``have`` differs from this config in the aesthetic head only."""
    if not have:
        return False
    want = part_fingerprint(cfg, shard_id)
    settings = {k: v for k, v in (have.get("settings") or {}).items() if not k.startswith(AESTHETIC)}
    return settings == want["settings"] and have.get("upstream") == want["upstream"]


def scores_digest(folder) -> str:
    """One digest of every committed score record (which shards, and which version of each):
    it changes when any shard is added or redone. One line per shard, so it scales."""
    h = hashlib.sha256()
    for sid in sorted(shards.done_shards(folder)):
        h.update(f"{shards.shard_name(sid)} {shards.record_digest(folder, sid)}\n".encode())
    return h.hexdigest()


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
    """The columns ``tapir score`` will write (and dedup adds), known without loading a model:
    rules are checked against it before any work starts (:func:`pipeline.schemas.scores_schema`
    of ``cfg.outputs``)."""
    return schemas.scores_schema(cfg.outputs)


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

    def _load(self, shard_id: int) -> tuple[list[str], list, list, list, list]:
        src = self.cfg.score_input
        meta = storage.read_parquet(shards.shard_file(src, shard_id, ".parquet"))
        meta = meta.filter(pc.equal(meta["status"], "success")).sort_by("key")
        members = shards.read_tar(shards.shard_file(src, shard_id, ".tar"))
        keys = meta["key"].to_pylist()
        column = lambda name: meta[name].to_pylist() if name in meta.column_names else [None] * len(keys)  # noqa: E731
        captions = column("caption")
        # the size img2dataset found before it resized the image (None where the input did not record it)
        sizes = list(zip(column("original_width"), column("original_height")))
        datas = []
        for i, key in enumerate(keys):
            m = members.get(key, {})
            datas.append(next((m[e] for e in IMAGE_EXTS if e in m), None))
            if captions[i] is None and "txt" in m:
                captions[i] = m["txt"].decode("utf-8", "replace")
        if "sha256" in meta.column_names:
            hashes = meta["sha256"].to_pylist()
        else:
            hashes = [hashlib.sha256(d).hexdigest() if d else None for d in datas]
        return keys, captions, datas, hashes, sizes

    def _prepare(self, idx: list[int], captions, datas, sizes) -> dict:
        decoded = [_decode(datas[i]) for i in idx]
        ok = [i for i, (im, _) in zip(idx, decoded) if im is not None]
        batch = {"index": ok, "image": [im for im, _ in decoded if im is not None],
                 "image_bytes": [datas[i] for i in ok], "caption": [captions[i] for i in ok],
                 "original_size": [sizes[i] for i in ok],
                 "errors": {i: err for i, (_, err) in zip(idx, decoded) if err}}
        if self.clip is not None and batch["image"]:
            batch["clip_pixels"] = self.clip.prepare(batch["image"])
        return batch

    def __call__(self, shard_id: int) -> dict:
        start = time.time()
        keys, captions, datas, hashes, sizes = self._load(shard_id)
        n, bs = len(keys), self.cfg.score.batch_size
        columns: dict[str, list] = {}
        errors: dict[int, str] = {}
        chunks = [list(range(i, min(n, i + bs))) for i in range(0, n, bs)]
        with ThreadPoolExecutor(1) as pool:  # decode the next batch while the models run
            future = pool.submit(self._prepare, chunks[0], captions, datas, sizes) if chunks else None
            for c in range(len(chunks)):
                batch = future.result()
                if c + 1 < len(chunks):
                    future = pool.submit(self._prepare, chunks[c + 1], captions, datas, sizes)
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
                      fingerprint=part_fingerprint(self.cfg, shard_id))
        return stats


def part_dir(cfg: RunConfig, group: str):
    return cfg.scores_dir / "_parts" / group


def _aesthetic(cfg: RunConfig):
    """The aesthetic head of ``cfg`` set up in this process (None when off)."""
    if not cfg.score.aesthetic.weights:
        return None
    from filters.aesthetic import AestheticScorer

    scorer = AestheticScorer(cfg.score.aesthetic.weights)
    scorer.setup()
    return scorer


def _record(table: pa.Table, scorers: list[str], duration: float) -> dict:
    errors = table["score_error"].drop_null().to_pylist()
    reasons = [e.split(":")[0] for e in errors]
    return {"count": table.num_rows, "scored": table.num_rows - len(errors), "errors": len(errors),
            "error_reasons": {r: reasons.count(r) for r in sorted(set(reasons))}, "scorers": scorers,
            "duration": duration}


def _commit_shard(cfg: RunConfig, shard_id: int, table: pa.Table, record: dict) -> None:
    """Write scores/NNNNN.parquet with the aesthetic head's column (when configured) and commit it."""
    scorers = [n for n in record["scorers"] if n != "aesthetic"]
    table = table.drop_columns([c for c in ("aesthetic_score",) if c in table.column_names])
    if (head := _aesthetic(cfg)) is not None:
        table, scorers = head(table), scorers + ["aesthetic"]
    name = shards.shard_name(shard_id)
    staging = shards.new_staging(cfg.scores_dir, shard_id)
    shards.write_parquet(staging / f"{name}.parquet", table)
    shards.commit(staging, cfg.scores_dir, shard_id, [f"{name}.parquet"], record | {"scorers": scorers},
                  fingerprint=shard_fingerprint(cfg, shard_id))


def merge_parts(cfg: RunConfig, shard_id: int, groups: list[str]) -> None:
    """Join the groups' parts of a shard (same keys, same order) into scores/NNNNN.parquet."""
    name = shards.shard_name(shard_id)
    made_from = part_fingerprint(cfg, shard_id)
    stats = [shards.read_stats(part_dir(cfg, g), shard_id) for g in groups]
    for g, st in zip(groups, stats):  # parts are checked at start too; this holds whatever happened since
        if (st.get("fingerprint") or {}).get("hash") != made_from["hash"]:
            raise shards.StageChanged(f"score part {g}/{name} was made differently: "
                                      f"{shards.explain_change(st.get('fingerprint'), made_from)}")
    parts = [storage.read_parquet(shards.shard_file(part_dir(cfg, g), shard_id, ".parquet")) for g in groups]
    table = parts[0]
    for part in parts[1:]:
        assert part["key"].equals(table["key"]), f"score parts of shard {name} disagree on keys"
        errors = [a or b for a, b in zip(table["score_error"].to_pylist(), part["score_error"].to_pylist())]
        table = table.set_column(table.schema.get_field_index("score_error"), "score_error",
                                 pa.array(errors, pa.string()))
        for col in part.column_names[2:]:
            table = table.append_column(part.schema.field(col), part[col])
    record = _record(table, [n for st in stats for n in st["scorers"]], sum(st["duration"] for st in stats))
    _commit_shard(cfg, shard_id, table, record)
    for g in groups:
        for suffix in (".parquet", "_stats.json"):
            shards.shard_file(part_dir(cfg, g), shard_id, suffix).unlink(missing_ok=True)


@dataclass
class AestheticPass:
    """Redo a committed score shard's aesthetic column from its stored CLIP embeddings (no image
    decoded, no CLIP loaded): a Ray task per shard whose aesthetic head changed (``--redo``)."""

    config: dict

    def __call__(self, shard_id: int) -> dict:
        start = time.time()
        cfg = RunConfig.model_validate(self.config)
        table = storage.read_parquet(shards.shard_file(cfg.scores_dir, shard_id, ".parquet"))
        record = {k: v for k, v in shards.read_stats(cfg.scores_dir, shard_id).items() if k != "fingerprint"}
        _commit_shard(cfg, shard_id, table, record | {"duration": record.get("duration", 0) + time.time() - start})
        return record


def score(cfg: RunConfig) -> dict:
    """Run the score stage; return its funnel (``failed_shards`` when a shard failed).

    CPU scorers run as Ray tasks and model scorers on an actor pool (a GPU per actor when
    the cluster has GPUs), at the same time; each writes its part of a shard, and a shard
    is committed once all its parts are in. A model that cannot load stops the stage here,
    before any work (:func:`filters.clip.check_clip`, :func:`filters.aesthetic.check_aesthetic`).
    """
    from pipeline import dedup, ray_backend
    from pipeline.report import score_funnel

    if "clip" in cfg.score.scorers:
        from filters.clip import check_clip

        check_clip(cfg.score.clip.model, cfg.score.clip.pretrained)
    if cfg.score.aesthetic.weights:
        from filters.aesthetic import check_aesthetic

        check_aesthetic(cfg.score.aesthetic.weights, cfg.score.clip.model)
    ray_backend.quiet_env()
    src, out = cfg.score_input, cfg.scores_dir
    available = shards.done_shards(src)
    if not available:
        raise FileNotFoundError(f"no completed shards to score in {src} (expected NNNNN.tar, NNNNN.parquet, "
                                f"NNNNN_stats.json as img2dataset writes them)")
    groups = {"cpu": [n for n in cfg.score.scorers if n not in MODEL_SCORERS],
              "model": [n for n in cfg.score.scorers if n in MODEL_SCORERS]}
    groups = {g: names for g, names in groups.items() if names}
    _mkdir(out)
    expected = functools.lru_cache(maxsize=None)(functools.partial(shard_fingerprint, cfg))  # one read per shard
    recorded = {sid: shards.read_stats(out, sid).get("fingerprint") for sid in shards.done_shards(out)}
    rehead = {sid for sid, have in recorded.items()  # the aesthetic head alone changed: redone from the embeddings
              if (have or {}).get("hash") != expected(sid)["hash"] and aesthetic_only(cfg, sid, have)}
    if rehead and not cfg.redo:
        shards.stale_shards(out, expected, redo=False, stage="score")  # refuses, naming the change
    redone = shards.stale_shards(out, lambda sid: recorded[sid] if sid in rehead else expected(sid),
                                 redo=cfg.redo, stage="score")  # refuses unless --redo
    for g in groups:
        _mkdir(part_dir(cfg, g))
        shards.clear_staging(part_dir(cfg, g))
        # parts are not output: one made with other settings or from another raw shard is redone, never merged
        stale = shards.stale_shards(part_dir(cfg, g), functools.partial(part_fingerprint, cfg), redo=True,
                                    stage="score")
        if stale:
            log.info("redoing %d %s part(s) made with other settings or inputs", len(stale), g)
    if redone:
        log.info("redoing %d shard(s) whose settings or inputs changed (--redo)", len(redone))
    shards.clear_staging(out)
    shards.prune_failures(out, available)  # failure records of raw shards that no longer exist
    todo = sorted(available - shards.done_shards(out))
    failures: dict[int, BaseException] = {}
    if todo or rehead:
        ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
    if todo:
        _score_shards(cfg, groups, todo, failures)
    if rehead:
        log.info("redoing the aesthetic score of %d shard(s) from their stored embeddings", len(rehead))
        for sid, result, _ in ray_backend.run_tasks(AestheticPass(cfg.model_dump()), sorted(rehead),
                                                    desc="score (aesthetic)",
                                                    max_retries=cfg.resources.score.max_retries):
            if isinstance(result, Exception):
                failures[sid] = result
    for sid, err in sorted(failures.items()):
        log.error("scoring shard %s failed: %s (rerun to retry it)", shards.shard_name(sid), err)
        shards.record_failure(out, sid, "score", f"{type(err).__name__}: {err}")
    if not shards.done_shards(out):
        log.error("no shard could be scored; no duplicate groups computed")
    elif (reason := dedup.staleness(cfg)) is not None:
        log.info("computing duplicate groups (scores/_dedup: %s)", reason)
        dedup.run(cfg)
    funnel = score_funnel(cfg.output, cfg.scores_dir)
    if failures:
        funnel["failed_shards"] = {str(k): f"{type(v).__name__}: {v}"[:500]
                                   for k, v in sorted(failures.items())}
    return funnel


def _mkdir(folder) -> None:
    if not storage.is_remote(folder):  # an object store has no folders: a key's prefix is one
        storage.path(folder).mkdir(parents=True, exist_ok=True)


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
    res = cfg.resources.score

    def merge_if_ready(sid: int) -> None:  # commit a shard as soon as all its parts are in
        with lock:
            if sid in failures or shards.stats_path(out, sid).exists():
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

    # live metrics (rows/s, success rate, errors, per node) of the pool that sees every row once:
    # the model actors when there are any, else the CPU tasks
    primary = "model" if "model" in groups else "cpu"
    metrics = ray_backend.StageMetrics(out, "score", summarize=lambda r: {
        "rows": r["count"], "ok": r["scored"], "errors": r["error_reasons"]})
    thread_error: list[BaseException] = []

    def run_cpu() -> None:  # an exception here must fail the command, not end a thread quietly
        try:
            stage = ScoreShard(dump, "cpu", groups["cpu"], threads=int(res.cpus_per_actor), with_hash=True)
            pending = sorted(set(todo) - shards.done_shards(part_dir(cfg, "cpu")))
            collect(ray_backend.run_tasks(stage.as_task, pending, desc="score (cpu)", unit="img",
                                          weight=lambda s: rows[s], num_cpus=res.cpus_per_actor,
                                          max_retries=res.max_retries,
                                          metrics=metrics if primary == "cpu" else None))
        except BaseException as e:
            thread_error.append(e)

    thread = threading.Thread(target=run_cpu, daemon=True, name="score-cpu") if "cpu" in groups else None
    if thread:
        thread.start()
    if "model" in groups:
        pool = ray_backend.actor_resources(res, actors=cfg.score.actors)
        if thread and not pool["num_gpus"] and not (cfg.score.actors or res.actors):
            pool["actors"] = max(1, pool["actors"] - 1)  # CPU actors: leave a CPU to the CPU scorers' tasks
        stage = ScoreShard(dump, "model", groups["model"], threads=int(pool["num_cpus"]),
                           with_hash="cpu" not in groups)
        pending = sorted(set(todo) - shards.done_shards(part_dir(cfg, "model")))
        collect(ray_backend.run_actor_pool(stage, pending, desc="score (model)", weight=lambda s: rows[s],
                                           unit="img", metrics=metrics, **pool))
    if thread:
        thread.join()
    if thread_error:
        raise RuntimeError(f"the CPU scorers stopped: {type(thread_error[0]).__name__}: {thread_error[0]}") \
            from thread_error[0]
    for sid in todo:  # parts finished by an earlier, killed run
        merge_if_ready(sid)
    done = shards.done_shards(out)
    for sid in set(todo) - done - set(failures):  # never a shard neither done nor failed
        failures[sid] = RuntimeError("a part of this shard never came back")


def json_count(folder, shard_id: int) -> int:
    stats = shards.read_stats(folder, shard_id)
    return int(stats.get("successes", stats.get("count", 1)))
