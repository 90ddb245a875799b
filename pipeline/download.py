"""The download stage: URL lists -> raw/ (WebDataset tars + parquet metadata + stats).

Built on img2dataset's downloader, resizer (and its face blurrer) and writer. Tapir adds
around them: inputs read lazily and shards planned as they are handed out
(``pipeline.input_plan``), the hardened fetch (``pipeline.fetch``), a header check before
decoding, atomic shard commits and resume on local folders or object stores
(``pipeline.shards``), later retry passes for retryable failures, an input hash checked
against the downloaded bytes, and a classified ``error_reason`` and ``attempts`` for every row.

Every planned row is accounted for: a row img2dataset drops without a record (a worker
thread or its resizer failed) is added as failed with ``error_reason`` ``lost``, retried
like a timeout, and makes the command end non-zero while it stays lost.

Resume is safe against changed settings: every shard's completion record holds the download
settings that shape its bytes and the digest of its planned rows; the plan holds what the
inputs were (settings, files' sizes and times). A rerun with anything changed refuses, naming
it; ``--redo`` redoes the shards it changes, ``--extend`` downloads only rows added since.
"""

from __future__ import annotations

import codecs
import functools
import io
import json
import logging
import math
import re
import shutil
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq

from pipeline import shards, storage
from pipeline.config import RunConfig
from pipeline.fetch import TAG, FetchPolicy
from pipeline.input_plan import declare_digits, download_settings, jobs, prepare, rows_path, shard_fingerprint

log = logging.getLogger(__name__)

RETRYABLE = {"timeout", "connection_error", "http_5xx", "http_429", "lost"}
LOST = TAG + "lost img2dataset wrote no record for this row (a worker thread or the resizer failed; see the log)"

# Messages img2dataset itself produces (pattern, reason); everything Tapir raises carries a tag
# instead (``tapir:<reason>``, set from a status code or an exception type), read first.
_IMG2DATASET = [
    (r"^Use of image disallowed by X-Robots-Tag", "opt_out"),
    (r"^hash mismatch$", "hash_mismatch"),
    (r"^unknown url type", "invalid_url"),  # urllib.request.Request(), before the opener runs
    (r"^image too small$", "too_small"),
    (r"^image area too large$", "too_many_pixels"),
    (r"^aspect ratio too large$", "bad_aspect_ratio"),
    (r"^Image decoding error$", "decode_error"),
]
_TAGGED = re.compile(re.escape(TAG) + r"([a-z0-9_]+)")


def classify(status: str | None, error_message: str | None) -> str:
    """The row's error_reason: 'success' or a short, stable reason name."""
    if status == "success":
        return "success"
    msg = error_message or ""
    m = _TAGGED.match(msg)
    if m:
        return m.group(1)
    for pattern, reason in _IMG2DATASET:
        if re.search(pattern, msg):
            return reason
    return "other"


_MAGIC = [(b"%PDF-", "pdf"), (b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"), (b"BZh", "bzip2"),
          (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x00\x00\x01\x00", "ico image"),
          (b"\x1aE\xdf\xa3", "webm/mkv video"), (b"ID3", "mp3 audio"), (b"OggS", "ogg media")]


def content_guess(data: bytes) -> str:
    """What a body that is not an image looks like, from its first bytes: a name, never the bytes
    (they are the server's, and may be anything)."""
    if not data:
        return "empty"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return "iso media (mp4, heic or avif)"
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data[:1024])
    if "\ufffd" in text or not all(c.isprintable() or c in "\r\n\t" for c in text):
        return "binary data"
    head = text.lstrip("\ufeff \r\n\t").lower()
    if head.startswith(("<!doctype html", "<html")) or any(t in head for t in ("<html", "<head", "<body")):
        return "html"
    if head.startswith("<svg") or head.startswith("<?xml") and "<svg" in head:
        return "svg"
    if head.startswith("<?xml") or head.startswith("<"):
        return "xml"
    if head.startswith(("{", "[")):
        return "json"
    return "text"


def _guarded_resizer(cfg, max_pixels: int):
    """img2dataset's Resizer behind a header check: pixel cap and truncation before full decode."""
    from img2dataset.resizer import Resizer
    from PIL import Image, UnidentifiedImageError

    magics = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"RIFF", b"BM")

    class GuardedResizer(Resizer):
        def __call__(self, img_stream, blurring_bbox_list=None):
            data = img_stream.getvalue()
            fail = (None, None, None, None, None)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(io.BytesIO(data)) as im:
                        w, h = im.size
                        if w * h > max_pixels:
                            return *fail, f"{TAG}too_many_pixels {w}x{h} > {max_pixels}"
                        if im.format == "JPEG":  # a 1/8-scale decode reads the whole stream: finds truncation cheaply
                            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                            im.load()
            except Image.DecompressionBombError as e:
                return *fail, f"{TAG}too_many_pixels {e}"
            except UnidentifiedImageError:
                if data[:4].startswith(magics):
                    return *fail, f"{TAG}decode_error unreadable image header"
                return *fail, f"{TAG}not_an_image the body looks like {content_guess(data)}"
            except Exception as e:  # Pillow parses untrusted bytes: whatever it raises is this row's failure
                kind = "truncated_image" if "truncated" in str(e) else "decode_error"
                return *fail, f"{TAG}{kind} {type(e).__name__}: {str(e)[:200]}"
            return super().__call__(img_stream, blurring_bbox_list)

    d = cfg.download
    blurrer = None
    if d.blur_bbox_col:
        from img2dataset.blurrer import BoundingBoxBlurrer

        blurrer = BoundingBoxBlurrer()
    return GuardedResizer(
        image_size=d.image_size, resize_mode=d.resize_mode, resize_only_if_bigger=d.resize_only_if_bigger,
        encode_quality=d.encode_quality, encode_format=d.encode_format, min_image_size=d.min_image_size,
        max_image_area=max_pixels, max_aspect_ratio=d.max_aspect_ratio or float("inf"), blurrer=blurrer,
    )


@functools.cache
def _writer_class():
    from img2dataset.writer import WebDatasetSampleWriter

    class ImageWriter(WebDatasetSampleWriter):
        """img2dataset's writer without its per-sample json and txt, which Tapir writes itself
        from the parquet: json.dumps of a row with a date or bytes column raised there, and
        img2dataset dropped the row without a record."""

        def write(self, img_str, key, caption, meta):
            if img_str is not None:
                self.tarwriter.write({"__key__": key, self.encode_format: img_str})
            self.buffered_parquet_writer.write(meta)

    return ImageWriter


OUTPUT_COLS = {"key", "status", "error_message", "width", "height", "original_width", "original_height", "exif",
               "error_reason", "attempts", "md5", "sha256", "sha512"}  # what the download writes per row


def _account(table: pa.Table, planned: pa.Table, shard_id: int, cfg: RunConfig) -> pa.Table:
    """``table`` plus a failed row (``error_reason`` lost) for every planned row it lacks."""
    have = set(table["key"].to_pylist())
    missing = [i for i in range(planned.num_rows) if shards_key(i, shard_id, cfg) not in have]
    if not missing:
        return table
    log.warning("shard %s: img2dataset wrote no record for %d row(s); recorded as lost", shard_id, len(missing))
    rows = []
    for i in missing:
        row = dict.fromkeys(table.column_names) | planned.slice(i, 1).to_pylist()[0]
        rows.append(row | {"key": shards_key(i, shard_id, cfg), "status": "failed_to_download", "error_message": LOST})
    return pa.concat_tables([table, pa.Table.from_pylist(rows, schema=table.schema)])


def _verify_hash(cfg: RunConfig, table: pa.Table, images: dict) -> pa.Table:
    """Rows whose downloaded bytes' hash differs from the input's (``input_<compute_hash>``) fail
    as img2dataset's verify_hash fails them (``hash mismatch``); a null input hash is not checked."""
    algo = cfg.download.compute_hash
    col = f"input_{algo}"
    if not (cfg.download.verify_hash and algo and col in table.column_names):
        return table
    rows = table.to_pylist()
    bad = 0
    for r in rows:
        want = r[col]
        if r["status"] == "success" and want is not None and str(want).strip().lower() != (r[algo] or "").lower():
            r.update(status="failed_to_download", error_message="hash mismatch", width=None, height=None)
            images.pop(r["key"], None)
            bad += 1
    return pa.Table.from_pylist(rows, schema=table.schema) if bad else table


@dataclass
class ShardTask:
    """One shard's download, a picklable callable run as a Ray task: job (shard id, kind, rows digest)."""

    config: dict  # RunConfig as a dict (plain data crosses process boundaries)
    settings: dict  # download_settings: with the rows digest, the completion record's fingerprint

    def __call__(self, job: tuple) -> dict:
        shard_id, kind, digest = job[:3]
        cfg = RunConfig.model_validate(self.config)
        from pipeline import fetch, ray_backend

        ray_backend.quiet_env()
        declare_digits(cfg)
        f = cfg.download.fetch
        fetch.install(FetchPolicy(allow_loopback=f.allow_loopback, max_bytes=f.max_bytes,
                                  max_redirects=f.max_redirects, deadline=f.read_deadline))
        staging = shards.new_staging(cfg.raw_dir, shard_id)
        try:
            if kind == "first":
                return self._first(cfg, shard_id, digest, staging)
            return self._retry(cfg, shard_id, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _download(self, cfg: RunConfig, shard_id: int, planned: pa.Table, out: Path) -> tuple[pa.Table, dict]:
        """img2dataset on one shard's rows: (one metadata row per input row, {key: image bytes})."""
        from img2dataset.downloader import Downloader

        d = cfg.download
        out.mkdir(parents=True, exist_ok=True)
        feather.write_feather(planned, out / "input.feather")  # img2dataset reads it, then deletes it
        blur = d.blur_bbox_col if d.blur_bbox_col in planned.column_names else None
        downloader = Downloader(
            sample_writer_class=_writer_class(), resizer=_guarded_resizer(cfg, d.fetch.max_pixels),
            thread_count=d.threads, save_caption=True, extract_exif=False, output_folder=str(out),
            column_list=planned.column_names, timeout=d.timeout, number_sample_per_shard=d.samples_per_shard,
            oom_shard_count=d.shard_digits, compute_hash=d.compute_hash, verify_hash_type=None,
            encode_format=d.encode_format, retries=d.retries, user_agent_token=d.user_agent_token,
            disallowed_header_directives=d.disallowed_header_directives, blurring_bbox_col=blur,
        )
        downloader.download_shard((shard_id, str(out / "input.feather")))  # raises on a shard-level failure
        name = shards.shard_name(shard_id, d.shard_digits)
        table = _account(pq.read_table(out / f"{name}.parquet"), planned, shard_id, cfg)
        images = {k: m[d.encode_format] for k, m in shards.read_tar(out / f"{name}.tar").items()}
        return _verify_hash(cfg, table, images), images

    def _first(self, cfg: RunConfig, shard_id: int, digest: str, staging: Path) -> dict:
        planned = storage.read_parquet(rows_path(cfg.raw_dir, shard_id, cfg.download.shard_digits))
        start = time.time()
        table, images = self._download(cfg, shard_id, planned, staging / "pass0")
        reasons = [classify(s, e) for s, e in zip(table["status"].to_pylist(), table["error_message"].to_pylist())]
        table = table.append_column("error_reason", pa.array(reasons, pa.string()))
        table = table.append_column("attempts", pa.array([1] * table.num_rows, pa.int32()))
        fingerprint = shard_fingerprint(self.settings, shard_id, digest, cfg.download.shard_digits)
        return self._commit(cfg, shard_id, table, images, staging, 0, start, fingerprint)

    def _retry(self, cfg: RunConfig, shard_id: int, staging: Path) -> dict:
        raw, d = cfg.raw_dir, cfg.download
        start = time.time()
        table = storage.read_parquet(shards.shard_file(raw, shard_id, ".parquet"))
        done = shards.read_stats(raw, shard_id)
        ok = set(pc.filter(table["key"], pc.equal(table["status"], "success")).to_pylist())
        images = {k: m[d.encode_format] for k, m in shards.read_tar(shards.shard_file(raw, shard_id, ".tar")).items()
                  if k in ok}
        todo = table.filter(pc.is_in(table["error_reason"], pa.array(sorted(RETRYABLE))))
        columns = [c for c in table.column_names if c not in OUTPUT_COLS]
        if todo.num_rows:
            new, new_images = self._download(cfg, shard_id, todo.select(columns), staging / "retry")
            to_orig = {shards_key(i, shard_id, cfg): k for i, k in enumerate(todo["key"].to_pylist())}
            rows = {r["key"]: r for r in table.to_pylist()}
            for r in new.to_pylist():
                orig = to_orig[r["key"]]
                merged = rows[orig] | {c: r[c] for c in new.column_names if c not in columns}
                merged["key"] = orig
                merged["attempts"] = rows[orig]["attempts"] + 1
                merged["error_reason"] = classify(r["status"], r["error_message"])
                rows[orig] = merged
                if r["key"] in new_images:
                    images[orig] = new_images[r["key"]]
            table = pa.Table.from_pylist([rows[k] for k in table["key"].to_pylist()], schema=table.schema)
        return self._commit(cfg, shard_id, table, images, staging, done["retry_passes_done"] + 1, start,
                            done.get("fingerprint"), previous=done)

    def _commit(self, cfg, shard_id, table, images, staging, passes, start, fingerprint, previous=None) -> dict:
        fmt, name = cfg.download.encode_format, shards.shard_name(shard_id, cfg.download.shard_digits)
        table = table.sort_by("key")
        samples = []
        for row in table.to_pylist():
            if row["status"] == "success":
                caption = row.get("caption")
                samples.append((row["key"], {
                    fmt: images[row["key"]],
                    "txt": (caption or "").encode(),
                    "json": json.dumps(row, sort_keys=True, default=str).encode(),
                }))
        shards.write_tar(staging / f"{name}.tar", samples)
        shards.write_parquet(staging / f"{name}.parquet", table)
        reasons = pc.value_counts(table["error_reason"]).to_pylist()
        status = table["status"].to_pylist()
        attempts = pc.value_counts(table["attempts"]).to_pylist()
        stats = {
            "count": table.num_rows,
            "successes": status.count("success"),
            "failed_to_download": status.count("failed_to_download"),
            "failed_to_resize": status.count("failed_to_resize"),
            "reasons": {r["values"]: r["counts"] for r in reasons},
            "attempts": {str(r["values"]): r["counts"] for r in attempts},
            "retried_and_succeeded": sum(1 for s, a in zip(status, table["attempts"].to_pylist())
                                         if s == "success" and a > 1),
            "retryable": sum(r["counts"] for r in reasons if r["values"] in RETRYABLE),
            "retry_passes_done": passes,
            "start_time": (previous or {}).get("start_time", start),
            "end_time": time.time(),
        }
        stats["duration"] = stats["end_time"] - stats["start_time"]
        shards.commit(staging, cfg.raw_dir, shard_id, [f"{name}.tar", f"{name}.parquet"], stats, fingerprint)
        return stats


def shards_key(index: int, shard_id: int, cfg: RunConfig) -> str:
    """img2dataset's key for row ``index`` of shard ``shard_id``."""
    from img2dataset.downloader import compute_key

    oom = math.ceil(math.log10(cfg.download.samples_per_shard))
    return compute_key(index, shard_id, oom, cfg.download.shard_digits)


def download(cfg: RunConfig, shard_timeout: float | None = None) -> dict:
    """Run the download stage; return the funnel of raw/ (``failed_shards`` set when a shard
    failed or rows stayed lost: the command then ends non-zero).

    ``shard_timeout`` (default ``download.shard_timeout``): seconds after which a shard task
    still running is cancelled and its shard recorded as failed."""
    from pipeline import ray_backend

    ray_backend.quiet_env()
    raw = cfg.raw_dir
    raw.mkdir(parents=True, exist_ok=True)
    shard_timeout = shard_timeout or cfg.download.shard_timeout
    shards.clear_staging(raw)
    with ThreadPoolExecutor(1) as pool:  # check raw/ while Ray starts and its workers import
        prepared = pool.submit(prepare, cfg)
        ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
        ray_backend.warm_up(["pipeline.download", "img2dataset.downloader", "img2dataset.writer"])
        planner = prepared.result()
    task = ShardTask(cfg.model_dump(), download_settings(cfg))
    failures, nodes = {}, set()
    res = cfg.resources.download
    metrics = ray_backend.StageMetrics(raw, "download", summarize=lambda stats: {
        "rows": stats["count"], "ok": stats["successes"],
        "errors": {r: n for r, n in stats["reasons"].items() if r != "success"}})

    def run(items, desc):
        for job, result, node in ray_backend.run_tasks(task, items, desc=desc, unit="img", weight=lambda j: j[3],
                                                       max_in_flight=res.tasks, num_cpus=res.cpus_per_task,
                                                       max_retries=res.max_retries, timeout=shard_timeout,
                                                       metrics=metrics if desc == "download" else None):
            nodes.add(node)
            if isinstance(result, Exception):
                reason = f"{type(result).__name__}: {result}"
                failures[job[0]] = reason
                shards.record_failure(raw, job[0], "download", reason)
                log.error("%s of shard %s failed: %s (rerun the command to retry it)", desc, job[0], reason)

    run(jobs(cfg, planner), "download")
    passes = cfg.download.retry_passes
    for round_no in range(1, max(passes, 1) + 1):
        # a shard's passes resume where a killed run left them; rows img2dataset lost get one more
        # pass in every invocation, so "rerun to retry" holds for them even after the last pass
        todo_retry = [(sid, "retry", None, s["retryable"]) for sid in sorted(shards.done_shards(raw))
                      if (s := shards.read_stats(raw, sid))["retryable"] and (
                          (round_no <= passes and s["retry_passes_done"] < round_no)
                          or (round_no == 1 and s["reasons"].get("lost")))]
        if not todo_retry:
            break
        time.sleep(cfg.download.retry_wait * round_no)
        run(todo_retry, f"retry pass {round_no}")
    return _funnel(cfg, failures, nodes)


def _funnel(cfg: RunConfig, failures: dict, nodes: set) -> dict:
    """The download funnel from the completion records (no shard's rows are read)."""
    raw = cfg.raw_dir
    info = json.loads((storage.path(raw) / "_input" / "input.json").read_text())
    stats = {sid: shards.read_stats(raw, sid) for sid in sorted(shards.done_shards(raw))}
    reasons, attempts = Counter(), Counter()
    for s in stats.values():
        reasons.update(s["reasons"])
        attempts.update(s.get("attempts", {}))
    succeeded = reasons.pop("success", 0)
    rows_out = sum(s["count"] for s in stats.values())
    funnel = {"stage": "download", "rows_in": info["rows"], "rows_out": rows_out, "succeeded": succeeded,
              "failed": sum(reasons.values()), "failed_by_reason": dict(reasons.most_common()),
              "attempts": dict(sorted(attempts.items())),
              "retried_and_succeeded": sum(s.get("retried_and_succeeded", 0) for s in stats.values()),
              "shards": len(stats), "lineage_ok": bool(stats) and info["rows"] == rows_out,
              "complete": bool(info.get("complete")), "ray_nodes_used": len(nodes - {None})}
    lost = {sid: n for sid, s in stats.items() if (n := s["reasons"].get("lost", 0))}
    funnel["lost_rows"] = sum(lost.values())
    failed = {str(sid): reason[:500] for sid, reason in sorted(failures.items()) if sid not in stats}
    failed |= {str(sid): f"{n} row(s) img2dataset dropped without a record, kept as error_reason 'lost'"
               for sid, n in lost.items()}
    if failed:
        funnel["failed_shards"] = failed
    return funnel
