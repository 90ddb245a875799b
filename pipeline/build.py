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

No member is a pickle. Output shards hold ``build.samples_per_shard`` samples at most
and are cut earlier when the planned bytes would pass ``build.max_shard_bytes``. The
plan (which key goes to which shard) is computed from the inputs and the config and
stored in ``shards/_plan.parquet``; each shard is built by an encoder actor, written
aside and committed by rename, so a killed build resumes with byte-identical shards. Each
completion record holds the shard's fingerprint (the build settings, its planned keys, and
digests of its source shards' selection, captions, scores and metadata): a rerun after a
change refuses, naming it, or with ``--redo`` rebuilds only the shards it affects. Models
are checked in the driver before any work (``encoder_infos``).
``shards/manifest.json`` records the encoders' fingerprints, the scaling factors and a
checksum per shard (``pipeline.manifest``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import shards
from pipeline.config import BuildConfig, ModelLoadError, RunConfig

log = logging.getLogger(__name__)

CAPTION_KINDS = ("alt_text", "short", "descriptive")
CAPTION_MEMBERS = {"alt_text": "alt.txt", "short": "short.txt", "descriptive": "descriptive.txt"}
PLAN = "_plan.parquet"
PLAN_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.int32()), ("shard", pa.int32()),
                         ("width", pa.int32()), ("height", pa.int32()), ("est_bytes", pa.int64())])
NPY_HEADER = 128  # bytes before the data in a .npy member
TEXT_MEMBERS, TEXT_BYTES = 5, 500  # txt, alt.txt, short.txt, descriptive.txt, json: planned size each
TAR_END = 10240  # end-of-archive blocks, padded to tarfile's record size


class BuildError(ValueError):
    """The shards folder cannot be built into as asked (mixed plans or encoders)."""


def make_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """Aspect-ratio buckets of at most resolution^2 pixels, sides multiples of ``step``
    (the SDXL / NovelAI recipe): for each width, the tallest height that fits the area."""
    area, found = resolution * resolution, {(resolution // step * step,) * 2}
    for w in range(step, int(resolution * max_aspect) + 1, step):
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            found.add((w, h))
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def target_sizes(b: BuildConfig) -> list[tuple[int, int]]:
    if b.crop == "center":
        return [(b.resolution, b.resolution)]
    return [tuple(x) for x in b.buckets] if b.buckets else make_buckets(b.resolution, b.bucket_step, b.max_aspect)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in log aspect ratio (ties: the larger one)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


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


def _in_tar(n: int) -> int:
    """Bytes a member of n bytes takes in a tar: a 512-byte header, data padded to 512."""
    return 512 + -(-n // 512) * 512


def sample_bytes(b: BuildConfig, infos: dict, size: tuple[int, int], image_bytes: int) -> int:
    """Planned bytes of one sample in a tar: the image as downloaded, exact array sizes (the
    pooled text vector taken as wide as the hidden states), and the text members (4 captions
    and the json record) at one block each, headers included."""
    from pipeline.encoders import smallest_uint

    w, h = size
    item = np.dtype(b.latent_dtype).itemsize
    arrays = []
    if "kl" in infos:
        f, c = infos["kl"]["factor"], infos["kl"]["channels"]
        arrays += [c * (h // f) * (w // f) * item] * (2 if b.vae.store == "mean_std" else 1)
    if "vq" in infos:
        f = infos["vq"]["factor"]
        arrays.append((h // f) * (w // f) * smallest_uint(infos["vq"]["codebook_size"]).itemsize)
    arrays *= 2 if b.flip else 1
    if "text" in infos:
        dim = infos["text"]["dim"]
        per_kind = [b.text.max_length * dim * item, b.text.max_length] + ([dim * item] if b.text.pooled else [])
        arrays += per_kind * len(b.text.captions)
    total = sum(_in_tar(NPY_HEADER + n) for n in arrays) + TEXT_MEMBERS * _in_tar(TEXT_BYTES)
    return total + (_in_tar(image_bytes) if b.keep_image else 0)


def _member_sizes(tar_path: Path) -> dict[str, int]:
    """Image bytes per key from the tar headers alone (an unsafe member raises UnsafeTar here,
    before any work)."""
    sizes: dict[str, int] = {}
    with tarfile.open(tar_path) as tar:
        for m in shards.safe_members(tar, tar_path):
            key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
            if ext in ("jpg", "jpeg", "png", "webp"):
                sizes[key] = m.size
    return sizes


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


def _source_files(cfg: RunConfig, source: int) -> tuple[Path, Path]:
    name = shards.shard_name(source)
    tar, meta = cfg.score_input / f"{name}.tar", cfg.score_input / f"{name}.parquet"
    for path in (tar, meta):
        if not path.exists():
            raise BuildError(f"{path} is missing, but {cfg.selection_dir} keeps rows of shard {name}: "
                             "was raw/ (or score.input) moved or partly deleted? rerun `tapir download`")
    return tar, meta


def source_digests(cfg: RunConfig, source: int) -> dict[str, str | None]:
    """Digests of what one source shard gives the build: its selection, captions, scores and
    metadata parquet files (their bytes) and the raw shard's completion record."""
    name = shards.shard_name(source)
    out: dict[str, str | None] = {}
    for folder in (cfg.selection_dir, cfg.captions_dir, cfg.scores_dir, cfg.score_input):
        path = folder / f"{name}.parquet"
        committed = path.exists() and (folder != cfg.captions_dir or shards.stats_path(folder, source).exists())
        out[f"{folder.name}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest() if committed else None
    out[f"{cfg.score_input.name}/{name}"] = shards.record_digest(cfg.score_input, source)
    return out


FINGERPRINT_EXCLUDE = ("actors", "decode_threads", "output")  # speed and place, not bytes


def shard_fingerprint(cfg: RunConfig, rows: list[dict], digests: dict[int, dict]) -> dict:
    """What made one output shard (stored in its completion record): every build setting that
    changes bytes, the keys and sizes planned into it, and the digests of its source shards'
    inputs (``digests``: source -> :func:`source_digests`). An unplanned shard (``rows`` empty)
    never matches a recorded one."""
    plan = json.dumps([[r["key"], r["source"], r["width"], r["height"]] for r in rows]).encode()
    upstream = {"plan": hashlib.sha256(plan).hexdigest() if rows else None}
    for source in sorted({r["source"] for r in rows}):
        upstream.update(digests[source])
    return shards.fingerprint(shards.settings_of(cfg.build, "build", FINGERPRINT_EXCLUDE), upstream)


def make_plan(cfg: RunConfig, infos: dict) -> tuple[pa.Table, dict[int, dict]]:
    """Which kept row goes to which output shard, in (source shard, key) order; a new shard
    starts at ``samples_per_shard`` samples or when the planned bytes would pass the cap.
    Also returns each planned source's :func:`source_digests`, so a resumed build notices
    which shards' inputs changed."""
    b, sizes_allowed = cfg.build, target_sizes(cfg.build)
    square = nearest_bucket(1, 1, sizes_allowed)
    rows = {name: [] for name in PLAN_SCHEMA.names}
    digests: dict[int, dict] = {}
    shard, count, nbytes = 0, 0, 0
    for source in sorted(shards.done_shards(cfg.selection_dir)):
        name = shards.shard_name(source)
        sel = pq.read_table(cfg.selection_dir / f"{name}.parquet", columns=["key", "keep"])
        keep = sorted(sel.filter(pc.equal(sel["keep"], True))["key"].to_pylist())
        if not keep:
            continue
        tar, meta_path = _source_files(cfg, source)
        digests[source] = source_digests(cfg, source)
        names = pq.read_schema(meta_path).names
        dims: dict = {}
        if "width" in names and "height" in names:
            meta = pq.read_table(meta_path, columns=["key", "width", "height"])
            dims = dict(zip(meta["key"].to_pylist(), zip(meta["width"].to_pylist(), meta["height"].to_pylist())))
        image_sizes = _member_sizes(tar)
        for key in keep:
            w, h = dims.get(key, (None, None))
            size = nearest_bucket(w, h, sizes_allowed) if w and h else square  # unknown size: the squarest
            image = image_sizes.get(key, 0)
            if w and h:  # the stored image is the crop at the training size: scale the download's bytes
                image = int(image * size[0] * size[1] / (w * h))
            est = sample_bytes(b, infos, size, image)
            if count and (count >= b.samples_per_shard or nbytes + est + TAR_END > b.max_shard_bytes):
                shard, count, nbytes = shard + 1, 0, 0
            for col, v in zip(PLAN_SCHEMA.names, (key, source, shard, size[0], size[1], est)):
                rows[col].append(v)
            count, nbytes = count + 1, nbytes + est
    return pa.table(rows, schema=PLAN_SCHEMA), digests


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


def _rows_by_key(path: Path, columns: list[str] | None = None) -> dict[str, dict]:
    """{key: row} of a parquet file (its scalar columns unless ``columns`` is given). Unsigned
    64-bit values (pHash) become 16-digit lowercase hex strings: half of them pass 2**63, and
    readers that type JSON numbers as int64 (Hugging Face datasets, pyarrow, pandas) overflow."""
    if not path.exists():
        return {}
    table = pq.read_table(path)
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

    def _load_rows(self, plan: list[dict]) -> list[dict]:
        """Join each planned key with its image bytes, metadata, selection, captions and scores."""
        cfg, rows = self.cfg, []
        for source in sorted({p["source"] for p in plan}):
            name = shards.shard_name(source)
            wanted = {p["key"] for p in plan if p["source"] == source}
            members = shards.read_tar(cfg.score_input / f"{name}.tar", keys=wanted)
            meta = _rows_by_key(cfg.score_input / f"{name}.parquet",
                                ["url", "caption", "width", "height", "original_width", "original_height"])
            caps = _rows_by_key(cfg.captions_dir / f"{name}.parquet",  # committed captions only
                                ["descriptive", "short", "status", "reason", "model", "prompt_descriptive",
                                 "prompt_short"]) if shards.stats_path(cfg.captions_dir, source).exists() else {}
            scores = _rows_by_key(cfg.scores_dir / f"{name}.parquet")
            for p in plan:
                if p["source"] != source:
                    continue
                key = p["key"]
                image = next((members.get(key, {}).get(e) for e in ("jpg", "jpeg", "png", "webp")
                              if e in members.get(key, {})), None)
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
        plan = pq.read_table(self.cfg.shards_dir / PLAN, filters=[("shard", "=", shard_id)]).to_pylist()
        # the inputs as this actor reads them: a change after planning shows on the next run
        fingerprint = shard_fingerprint(self.cfg, plan, {s: source_digests(self.cfg, s)
                                                         for s in {p["source"] for p in plan}})
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
            record = {"key": key, "url": row["meta"].get("url"), "source_shard": row["source"],
                      "size": [row["width"], row["height"]],
                      "original_size": [row["meta"].get("original_width"), row["meta"].get("original_height")],
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
                 "sha256": hashlib.sha256(data).hexdigest() if samples else None, "buckets": buckets,
                 "members": sorted({m for _, ms in samples for m in ms}), "encoders": self.encoders.info,
                 "captions": {"txt": used, "fallback": fallbacks},
                 "duration": time.time() - start, "timing": {**timing, "write": time.time() - t0}}
        shards.commit(staging, self.cfg.shards_dir, shard_id, files, stats, fingerprint)
        return stats


def _write_plan(out: Path, plan: pa.Table) -> None:
    """Store the plan the actors read (``_plan.parquet``) and its totals (``_plan.json``)."""
    shards.atomic_write_parquet(out / PLAN, plan)
    shards.atomic_write(out / "_plan.json", json.dumps({"shards": _planned(plan), "samples": plan.num_rows}))


def _check_done(cfg: RunConfig, plan: pa.Table, digests: dict[int, dict]) -> set[int]:
    """Committed shards whose fingerprint is not what this run would make (a changed setting,
    selection, caption, score or download): refused naming the change (StageChanged), or with
    ``--redo`` removed, with their tars, to be built again; the others are kept as they are."""
    by_shard: dict[int, list[dict]] = {}
    for row in plan.to_pylist():
        by_shard.setdefault(row["shard"], []).append(row)
    out = cfg.shards_dir
    stale = shards.stale_shards(out, lambda sid: shard_fingerprint(cfg, by_shard.get(sid, []), digests),
                                redo=cfg.redo, stage="build")
    for sid in stale:  # a redone shard whose rows all fail writes no tar: the old one must not stay
        (out / f"{shards.shard_name(sid)}.tar").unlink(missing_ok=True)
    shards.prune_failures(out, set(by_shard))  # failure records of shards no longer planned
    return stale


def _planned(plan: pa.Table) -> int:
    return int(pc.max(plan["shard"]).as_py()) + 1 if plan.num_rows else 0


def build(cfg: RunConfig) -> dict:
    """Run the build stage over every selected row; write the manifest; return the funnel."""
    from pipeline import manifest, ray_backend
    from pipeline.report import build_funnel

    ray_backend.quiet_env()
    infos = encoder_infos(cfg.build)  # the preflight: a model that cannot load stops here, before any work
    check_sizes(cfg.build, infos)
    if not shards.done_shards(cfg.selection_dir):
        raise FileNotFoundError(f"no selection in {cfg.selection_dir}; run `tapir select` first")
    from pipeline.select import check_selection

    summary = check_selection(cfg)  # a whole selection, made with these rules from the current scores
    out = cfg.shards_dir
    out.mkdir(parents=True, exist_ok=True)
    shards.clear_staging(out)
    plan, digests = make_plan(cfg, infos)
    redone = _check_done(cfg, plan, digests)
    if redone:
        log.info("redoing %d shard(s) whose settings or inputs changed (--redo)", len(redone))
    _write_plan(out, plan)
    todo = sorted(set(range(_planned(plan))) - shards.done_shards(out))
    done = sorted(shards.done_shards(out))
    expect = shards.read_stats(out, done[0])["encoders"] if done else None
    counts = dict(zip(*np.unique(plan["shard"].to_numpy(), return_counts=True))) if plan.num_rows else {}
    failures = {}
    if todo:
        ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
        gpus = cfg.resources.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if infos and ray_backend.cluster_gpus() >= 1 else 0.0
        actors = cfg.build.actors or (int(ray_backend.cluster_gpus() / gpus) if gpus else
                                      max(1, int(ray_backend.cluster_cpus() / cfg.resources.cpus_per_actor)))
        for sid, result, _ in ray_backend.run_actor_pool(
                BuildShard(cfg.model_dump(), expect), todo, desc="build", actors=actors,
                num_cpus=cfg.resources.cpus_per_actor, num_gpus=gpus, weight=lambda s: int(counts[s]), unit="img"):
            if isinstance(result, Exception):
                failures[sid] = result
                shards.record_failure(out, sid, "build", f"{type(result).__name__}: {result}")
                log.error("building shard %s failed: %s (rerun to retry it)", sid, result)
    manifest.write(out, cfg.build, _planned(plan))
    shards.clear_staging(out)
    funnel = build_funnel(Path(cfg.output), out)
    if failures:
        funnel["failed_shards"] = {str(k): str(v)[:500] for k, v in failures.items()}
    if summary.get("unscored_shards"):  # a hole upstream: every later stage says so and exits non-zero
        funnel.setdefault("failed_shards", {}).update(
            {f"score/{k}": v for k, v in summary["unscored_shards"].items()})
    return funnel
