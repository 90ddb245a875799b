"""The build stage: kept rows -> shards/NNNNN.tar, training shards with pre-encoded latents.

``tapir build`` joins the downloaded images (``raw/``, or ``score.input``) with
``selection/`` (only kept rows), ``captions/`` (optional) and ``scores/`` on the key,
and writes WebDataset tars, each sample holding (members named after the first dot of
the key):

- ``jpg`` (or png/webp): the image resized and centre-cropped to the training size or
  to its aspect-ratio bucket (``build.keep_image``);
- ``latent_mean.npy`` + ``latent_std.npy`` (or ``latent.npy``): the KL autoencoder's
  unscaled latent distribution, ``tokens.npy``: VQ indices, ``*_flip.npy``: the same
  for the horizontally flipped image;
- per caption kind K of ``build.text.captions`` (``descriptive``, ``short``, ``alt_text``):
  ``text_emb_K.npy`` (max_length x dim): a text encoder's hidden states
  (``build.text.hidden_layer``), ``text_mask_K.npy``: its attention mask, and
  ``text_pooled_K.npy`` (dim): the pooled vector (``build.text.pooled``); an empty
  caption is embedded as '' and marked false in the json's ``text_emb``;
- ``txt`` (the caption open_clip_train reads: ``build.txt_caption``, else the short, the
  descriptive, the alt-text; each kind is used when its text exists, whatever the caption
  row's status), ``alt.txt``, ``short.txt``, ``descriptive.txt``; ``json``: size, bucket,
  scores (unsigned 64-bit ones, pHash, as 16-digit hex strings) and provenance, with the kind
  written as ``txt`` and why it fell back (``txt_fallback``: 'caption failed', 'not captioned').

No member is a pickle. Output shards hold ``build.samples_per_shard`` samples at most,
fewer when that many of the largest planned sample would pass ``build.max_shard_bytes``. The
plan comes from the selection's completion records (kept counts and digests), never from
a list of keys (:mod:`pipeline.buildplan`): ``shards/_plan.json`` holds one (source shard,
kept) pair per source, and each encoder actor reads the kept keys of its own output shard's
sources, builds it, writes it aside and commits it, so a killed build resumes with
byte-identical shards. Each completion record holds the shard's fingerprint (the build
settings, its ranges of source rows, and the record digests of its source shards' selection,
captions, scores and download): a rerun after a change refuses, naming it, or with ``--redo``
rebuilds only the shards it affects. Models are checked in the driver before any work
(``encoder_infos``). Paths may be local or fsspec URLs (``s3://``).
``shards/manifest.json`` records the encoders' fingerprints, the scaling factors and a
checksum per shard (``pipeline.manifest``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards, storage
from pipeline.buildplan import (PLAN_FILE, BuildError, Plan, make_plan, nearest_bucket,  # noqa: F401
                                planned_rows, sample_bytes)
from pipeline.config import BuildConfig, ModelLoadError, RunConfig
from pipeline.schemas import (CAPTION_KINDS, CAPTION_MEMBERS, IMAGE_MEMBERS, PLAN, RAW, RECORD_KEPT_DIGEST,  # noqa
                              SOURCE, make_buckets, target_sizes)

RAW_KNOWN = set(RAW.names) | {SOURCE, "exif"}  # raw columns the json records by name (or not at all)

log = logging.getLogger(__name__)

def encoder_infos(b: BuildConfig) -> dict:
    """Channels, factors and codebook sizes read from the encoders' configs, in the driver before
    any work: also the preflight. A model whose config or weights cannot be found (a misspelt id,
    a bad path, not cached with HF_HUB_OFFLINE) raises ModelLoadError naming its config key."""
    from pipeline.encoders import autoencoder_info, check_files, text_encoder_info

    info = {}
    for key, kind, section in (("build.vae.model", "kl", b.vae), ("build.vq.model", "vq", b.vq),
                               ("build.text.model", "text", b.text)):
        if not section.model:
            continue
        try:
            check_files(section.model, section.subfolder, "text" if kind == "text" else "diffusers")
            if kind == "text":
                check_files(section.model, section.tokenizer_subfolder or section.subfolder, "tokenizer")
                info[kind] = text_encoder_info(section.model, section.subfolder)
            else:
                info[kind] = autoencoder_info(kind, section.model, section.subfolder)
        except Exception as e:  # noqa: BLE001 - whatever stops the load, one line naming the key
            raise ModelLoadError(key, section.model, str(e).strip().splitlines()[0] if str(e).strip()
                                 else type(e).__name__) from e
    return info


def check_sizes(b: BuildConfig, infos: dict) -> None:
    """Every target side must be a multiple of each image encoder's downsampling factor, or a
    latent would cover fewer pixels than the stored image."""
    for kind in ("kl", "vq"):
        if kind not in infos:
            continue
        f = infos[kind]["factor"]
        bad = [f"{w}x{h}" for w, h in target_sizes(b) if w % f or h % f]
        if bad:
            raise BuildError(f"build sizes {', '.join(bad)} are not multiples of the {kind} encoder's "
                             f"downsampling factor {f}: set build.resolution / build.bucket_step / "
                             f"build.buckets to multiples of {f}")


def source_digests(cfg: RunConfig, source: int) -> dict[str, str | None]:
    """Digests of what one source shard gives the build, from the completion records written
    when those shards were committed: the selection's kept keys (``kept_digest``, else its
    record), the captions, scores and raw (or ``score.input``) records. None: not committed."""
    name = shards.shard_name(source)
    sel = shards.read_stats(cfg.selection_dir, source) if shards.stats_path(cfg.selection_dir, source).exists() else {}
    out = {f"{cfg.selection_dir.name}/{name}.parquet": sel.get(RECORD_KEPT_DIGEST)
           or shards.record_digest(cfg.selection_dir, source)}
    for folder in (cfg.captions_dir, cfg.scores_dir):
        out[f"{folder.name}/{name}.parquet"] = shards.record_digest(folder, source)
    out[f"{cfg.score_input.name}/{shards.shard_file(cfg.score_input, source, '').name}"] = shards.record_digest(
        cfg.score_input, source)
    return out


FINGERPRINT_EXCLUDE = ("actors", "decode_threads", "output")  # speed and place, not bytes


def shard_fingerprint(cfg: RunConfig, slices: list[tuple[int, int, int]], digests: dict[int, dict]) -> dict:
    """What made one output shard (stored in its completion record): every build setting that
    changes bytes, the ranges of its sources' kept rows it holds (``slices``: (source, start,
    stop), :meth:`Plan.slices`) and the digests of those sources (``digests``: source ->
    :func:`source_digests`). An unplanned shard (``slices`` empty) never matches a recorded one."""
    plan = json.dumps([list(x) for x in slices]).encode()
    upstream = {"plan": hashlib.sha256(plan).hexdigest() if slices else None}
    for source in sorted({x[0] for x in slices}):
        upstream.update(digests[source])
    return shards.fingerprint(shards.settings_of(cfg.build, "build", FINGERPRINT_EXCLUDE), upstream)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _json_safe(value):
    """NaN and infinities become null: strict JSON parsers reject them."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _scalar_columns(table: pa.Table) -> list[str]:
    return [f.name for f in table.schema if f.name != "key" and (
        pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type)
        or pa.types.is_string(f.type))]


def _rows_by_key(path, keys: set[str], columns: list[str] | None = None) -> dict[str, dict]:
    """{key: row} of a parquet file's rows in ``keys`` (its scalar columns unless ``columns``
    is given). Unsigned 64-bit values (pHash) become 16-digit lowercase hex strings: half of them
    pass 2**63, and readers that type JSON numbers as int64 (Hugging Face datasets, pyarrow,
    pandas) overflow."""
    path = storage.path(path)
    if not path.exists():
        return {}
    names = storage.read_schema(path).names
    wanted = ["key"] + [c for c in (columns if columns is not None else names) if c in names and c != "key"]
    table = storage.read_parquet(path, columns=wanted)
    table = table.filter(pc.is_in(table["key"], pa.array(sorted(keys), pa.string())))
    keep = ["key"] + (columns if columns is not None else _scalar_columns(table))
    table = table.select([c for c in keep if c in table.column_names])
    hexed = [f.name for f in table.schema if pa.types.is_uint64(f.type)]
    rows = {r["key"]: r for r in table.to_pylist()}
    for r in rows.values():
        for c in hexed:
            r[c] = None if r[c] is None else f"{r[c]:016x}"
    return rows


@dataclass
class BuildShard:
    """Builds one output shard; a plain class (no Ray), run on an encoder actor pool."""

    config: dict
    expect: dict | None = None  # encoder fingerprints of shards already committed
    infos: dict | None = None  # encoder_infos(build): the planned sizes of samples

    def setup(self) -> None:
        from pipeline.encoders import Encoders

        start = time.time()

        self.cfg = RunConfig.model_validate(self.config)
        b = self.cfg.build
        self.encoders = Encoders(
            vae=b.vae.model, vae_subfolder=b.vae.subfolder, vae_store=b.vae.store, vq=b.vq.model,
            vq_subfolder=b.vq.subfolder, text=b.text.model, text_subfolder=b.text.subfolder,
            tokenizer_subfolder=b.text.tokenizer_subfolder, text_max_length=b.text.max_length,
            text_captions=tuple(b.text.captions), text_hidden_layer=b.text.hidden_layer, text_pooled=b.text.pooled,
            latent_dtype=b.latent_dtype, device=b.device, precision=b.precision)
        self.encoders.setup()
        self.setup_seconds = time.time() - start

    def _planned(self, shard_id: int) -> list[dict]:
        """This output shard's rows, read here from its sources (the plan holds only counts)."""
        if getattr(self, "plan", None) is None:
            self.plan = Plan.load(self.cfg.shards_dir)
            self.source_rows = (None, [])
        rows = []
        for source, start, stop in self.plan.slices(shard_id):
            if self.source_rows[0] != source:  # consecutive shards share a source: read it once
                self.source_rows = (source, planned_rows(self.cfg, self.infos or {}, source))
            part = self.source_rows[1][start:stop]
            if len(part) != stop - start:
                raise BuildError(f"source shard {shards.shard_name(source)} keeps {len(self.source_rows[1])} rows, "
                                 f"the plan expects at least {stop}: the selection changed while building")
            rows += part
        return rows

    def _load_rows(self, plan: list[dict]) -> list[dict]:
        """Join each planned key with its image bytes, metadata, selection, captions and scores."""
        cfg, rows = self.cfg, []
        for source in sorted({p["source"] for p in plan}):
            wanted = {p["key"] for p in plan if p["source"] == source}
            members = shards.read_tar(shards.shard_file(cfg.score_input, source, ".tar"), keys=wanted)
            meta = _rows_by_key(shards.shard_file(cfg.score_input, source, ".parquet"), wanted)
            caps = _rows_by_key(shards.shard_file(cfg.captions_dir, source, ".parquet"), wanted,  # committed only
                                ["descriptive", "short", "status", "reason", "model", "prompt_descriptive",
                                 "prompt_short"]) if shards.stats_path(cfg.captions_dir, source).exists() else {}
            scores = _rows_by_key(shards.shard_file(cfg.scores_dir, source, ".parquet"), wanted)
            for p in plan:
                if p["source"] != source:
                    continue
                key = p["key"]
                image = next((members.get(key, {}).get(e) for e in IMAGE_MEMBERS if e in members.get(key, {})), None)
                rows.append({**p, "image": image, "meta": meta.get(key, {}), "captions": caps.get(key),
                             "scores": scores.get(key, {})})
        order = {p["key"]: i for i, p in enumerate(plan)}
        return sorted(rows, key=lambda r: order[r["key"]])

    def _captions(self, row: dict) -> dict[str, str]:
        """Each caption kind's text, whatever the row's overall status: a failed descriptive
        caption does not take a good short one with it."""
        caps = row["captions"] or {}
        return {"alt_text": (row["meta"].get("caption") or "").strip(),
                "short": (caps.get("short") or "").strip(),
                "descriptive": (caps.get("descriptive") or "").strip()}

    def _txt(self, row: dict, caps: dict[str, str]) -> tuple[str, str | None]:
        """(the kind written as ``txt``, why it is not ``build.txt_caption`` or None)."""
        want = self.cfg.build.txt_caption
        kind = next(k for k in (want, "short", "descriptive", "alt_text") if caps[k])
        if kind == want:
            return kind, None
        if want == "alt_text":
            return kind, "alt-text empty"
        return kind, "not captioned" if row["captions"] is None else "caption failed"

    def _prepare(self, row: dict):
        """(uint8 H x W x 3 array at the planned size, stored image bytes or None, None),
        or (None, None, reason)."""
        from PIL import Image, ImageOps

        if row["image"] is None:
            return None, None, "image missing from the raw tar"
        try:
            with shards.open_image(row["image"]) as im:  # only the formats downloads hold
                im = im.convert("RGB")
                fitted = ImageOps.fit(im, (row["width"], row["height"]), method=Image.Resampling.BICUBIC)
        except Exception as e:  # a corrupt image is the row's reason, not the shard's failure
            return None, None, f"decode error: {type(e).__name__}: {e}"
        return np.asarray(fitted), self._encode_image(fitted) if self.cfg.build.keep_image else None, None

    def _encode_image(self, image) -> bytes:
        b, buf = self.cfg.build, io.BytesIO()
        fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[b.image_format]
        kwargs = {"quality": b.image_quality} if fmt != "PNG" else {}
        image.save(buf, format=fmt, **kwargs)
        return buf.getvalue()

    def __call__(self, shard_id: int) -> dict:
        import torch

        from pipeline.manifest import FingerprintMismatch

        start, b = time.time(), self.cfg.build
        for kind, info in (self.expect or {}).items():
            here = self.encoders.info.get(kind, {})
            if here.get("precision") != info.get("precision"):
                raise FingerprintMismatch(
                    f"{self.cfg.shards_dir} holds shards encoded in {info.get('precision')}, this build's {kind} "
                    f"encoder runs in {here.get('precision')} (build.device / build.precision); finish the build "
                    "on the same kind of device, or remove the folder to rebuild")
            mine = here.get("fingerprint")
            if mine != info["fingerprint"]:
                raise FingerprintMismatch(
                    f"{self.cfg.shards_dir} holds shards encoded by {kind} {info['model']} (fingerprint "
                    f"{info['fingerprint'][:12]}), this build's {kind} encoder has fingerprint "
                    f"{(mine or 'none')[:12]}; remove the folder to rebuild with the new encoder")
        plan = self._planned(shard_id)
        slices = self.plan.slices(shard_id)
        # the inputs as this actor reads them: a change after planning shows on the next run
        fingerprint = shard_fingerprint(self.cfg, slices, {s: source_digests(self.cfg, s) for s, _, _ in slices})
        rows = self._load_rows(plan)
        timing = {"read": time.time() - start, "wait_images": 0.0, "encode": 0.0}
        failed: dict[str, str] = {}
        texts: dict[str, dict[str, str]] = {}
        for row in rows:
            texts[row["key"]] = self._captions(row)
            if not any(texts[row["key"]].values()):
                failed[row["key"]] = "no caption (alt-text empty, no synthetic caption)"
        todo = [r for r in rows if r["key"] not in failed]
        groups: dict[tuple[int, int], list[dict]] = {}
        for row in todo:
            groups.setdefault((row["width"], row["height"]), []).append(row)
        batches = [g[i:i + b.batch_size] for g in groups.values() for i in range(0, len(g), b.batch_size)]
        arrays: dict[str, dict[str, np.ndarray]] = {}
        images: dict[str, bytes] = {}
        generator = torch.Generator().manual_seed(shard_id)  # store 'sample': the same draw on a rerun
        # decode and crop the next batch on a few threads (PIL releases the GIL) while this one encodes
        with ThreadPoolExecutor(max_workers=b.decode_threads) as pool:
            prepared = [pool.submit(self._prepare, r) for r in batches[0]] if batches else []
            for n, batch in enumerate(batches):
                t0 = time.time()
                results = [f.result() for f in prepared]
                timing["wait_images"] += time.time() - t0
                if n + 1 < len(batches):
                    prepared = [pool.submit(self._prepare, r) for r in batches[n + 1]]
                good = []
                for row, (arr, data, err) in zip(batch, results):
                    if err:
                        failed[row["key"]] = err
                    else:
                        good.append((row, arr))
                        if data is not None:
                            images[row["key"]] = data
                if not good:
                    continue
                t0 = time.time()
                stack = np.stack([a for _, a in good])
                outs = self.encoders.encode_images(stack, generator=generator)
                if b.flip:
                    outs.update(self.encoders.encode_images(np.ascontiguousarray(stack[:, :, ::-1]), "_flip",
                                                            generator))
                outs.update(self.encoders.encode_texts([texts[r["key"]] for r, _ in good]))
                timing["encode"] += time.time() - t0
                for i, (row, _) in enumerate(good):
                    arrays[row["key"]] = {m: v[i] for m, v in outs.items()}
        t0 = time.time()
        samples, buckets = [], {}
        used: dict[str, int] = {}  # caption kind written as txt -> samples
        fallbacks: dict[str, int] = {}  # why not build.txt_caption -> samples
        for row in rows:
            key = row["key"]
            if key in failed:
                continue
            caps = texts[key]
            kind, fallback = self._txt(row, caps)
            used[kind] = used.get(kind, 0) + 1
            if fallback:
                fallbacks[fallback] = fallbacks.get(fallback, 0) + 1
            c = row["captions"] or {}
            meta = row["meta"]
            record = {"key": key, "url": meta.get("url"), "source_shard": row["source"],
                      "source": meta.get(SOURCE),  # the input the row came from
                      "input": {k: _json_safe(v) for k, v in sorted(meta.items()) if k not in RAW_KNOWN} or None,
                      "size": [row["width"], row["height"]],
                      "original_size": [meta.get("original_width"), meta.get("original_height")],
                      "flip": b.flip, "txt": kind, "txt_fallback": fallback,
                      "text_emb": {k: bool(caps[k]) for k in b.text.captions} if b.text.model else None,
                      "captions": {"status": c.get("status"), "model": c.get("model"),
                                   "prompt_descriptive": c.get("prompt_descriptive"),
                                   "prompt_short": c.get("prompt_short")} if c else None,
                      "scores": {k: _json_safe(v) for k, v in row["scores"].items() if k != "key"}}
            members = {"txt": caps[kind].encode(),
                       "json": json.dumps(record, sort_keys=True, default=str, allow_nan=False).encode()}
            members.update({CAPTION_MEMBERS[k]: caps[k].encode() for k in CAPTION_KINDS})
            if b.keep_image:
                members[b.image_format] = images[key]
            members.update({m: _npy(v) for m, v in arrays[key].items()})
            samples.append((key, members))
            bucket = f"{row['width']}x{row['height']}"
            buckets[bucket] = buckets.get(bucket, 0) + 1
        name = shards.shard_name(shard_id)
        staging = shards.new_staging(self.cfg.shards_dir, shard_id)
        files = []
        if samples:  # a shard whose every row failed leaves only its record (readers choke on empty tars)
            shards.write_tar(staging / f"{name}.tar", samples)
            files.append(f"{name}.tar")
        data = (staging / f"{name}.tar").read_bytes() if samples else b""
        stats = {"count": len(samples), "planned": len(rows), "failed": failed, "bytes": len(data),
                 "planned_bytes": sum(r["est_bytes"] for r in rows),
                 "sha256": hashlib.sha256(data).hexdigest() if samples else None, "buckets": buckets,
                 "members": sorted({m for _, ms in samples for m in ms}), "encoders": self.encoders.info,
                 "captions": {"txt": used, "fallback": fallbacks},
                 "duration": time.time() - start, "timing": {**timing, "write": time.time() - t0}}
        shards.commit(staging, self.cfg.shards_dir, shard_id, files, stats, fingerprint)
        return stats


def _write_plan(out, plan: Plan) -> None:
    """Store the plan the actors read (``_plan.json``: counts per source shard, no key)."""
    shards.atomic_write(storage.path(out) / PLAN_FILE, plan.to_json())
    old = storage.path(out) / PLAN  # the key-per-row plan of older builds
    if old.exists():
        old.unlink()


def _digests(cfg: RunConfig):
    """source -> :func:`source_digests`, read from the records once per source, a few at a time."""
    return functools.lru_cache(maxsize=4096)(lambda source: source_digests(cfg, source))


def _check_done(cfg: RunConfig, plan: Plan, digests) -> set[int]:
    """Committed shards whose fingerprint is not what this run would make (a changed setting,
    selection, caption, score or download): refused naming the change (StageChanged), or with
    ``--redo`` removed, with their tars, to be built again; the others are kept as they are."""
    out = cfg.shards_dir

    def expected(sid: int) -> dict:
        slices = plan.slices(sid) if sid < plan.shards else []
        return shard_fingerprint(cfg, slices, {s: digests(s) for s, _, _ in slices})

    stale = shards.stale_shards(out, expected, redo=cfg.redo, stage="build")
    for sid in stale:  # a redone shard whose rows all fail writes no tar: the old one must not stay
        shards.shard_file(out, sid, ".tar").unlink(missing_ok=True)
    shards.prune_failures(out, set(range(plan.shards)))  # failure records of shards no longer planned
    return stale


def build(cfg: RunConfig) -> dict:
    """Run the build stage over every selected row; write the manifest; return the funnel."""
    from pipeline import manifest, ray_backend
    from pipeline.report import build_funnel

    ray_backend.quiet_env()
    infos = encoder_infos(cfg.build)  # the preflight: a model that cannot load stops here, before any work
    check_sizes(cfg.build, infos)
    if not shards.done_shards(cfg.selection_dir):
        raise FileNotFoundError(f"no selection in {storage.url(cfg.selection_dir)}; run `tapir select` first")
    from pipeline.select import check_selection

    summary = check_selection(cfg)  # a whole selection, made with these rules from the current scores
    out = cfg.shards_dir
    if not storage.is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    shards.clear_staging(out)
    digests = _digests(cfg)
    plan = make_plan(cfg, infos, digests)
    redone = _check_done(cfg, plan, digests)
    if redone:
        log.info("redoing %d shard(s) whose settings or inputs changed (--redo)", len(redone))
    _write_plan(out, plan)
    done = shards.done_shards(out)
    todo = [sid for sid in range(plan.shards) if sid not in done]
    expect = shards.read_stats(out, min(done))["encoders"] if done else None
    failures = {}
    if todo:
        ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
        # no encoder (images and captions only): the actors need no GPU
        resources = ray_backend.actor_resources(cfg.resources.build, http_only=not infos, actors=cfg.build.actors)
        metrics = ray_backend.StageMetrics(out, "build", summarize=lambda st: {
            "rows": st["planned"], "ok": st["count"],
            "errors": Counter(r.split(":")[0] for r in st["failed"].values())})
        for sid, result, _ in ray_backend.run_actor_pool(
                BuildShard(cfg.model_dump(), expect, infos), todo, desc="build", weight=plan.count, unit="img",
                metrics=metrics, **resources):
            if isinstance(result, Exception):
                failures[sid] = result
                shards.record_failure(out, sid, "build", f"{type(result).__name__}: {result}")
                log.error("building shard %s failed: %s (rerun to retry it)", sid, result)
    manifest.write(out, cfg.build, plan.shards)
    shards.clear_staging(out)
    funnel = build_funnel(cfg.output, out)
    if failures:
        funnel["failed_shards"] = {str(k): str(v)[:500] for k, v in failures.items()}
    if summary.get("unscored_shards"):  # a hole upstream: every later stage says so and exits non-zero
        funnel.setdefault("failed_shards", {}).update(
            {f"score/{k}": v for k, v in summary["unscored_shards"].items()})
    return funnel
