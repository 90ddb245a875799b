"""The download stage: URL list -> raw/ (WebDataset tars + parquet metadata + stats).

Built on img2dataset's reader, downloader, resizer and writer. Tapir adds around them:
the hardened fetch (``pipeline.fetch``), a header check before decoding, atomic
shard commits and resume (``pipeline.shards``), later retry passes for retryable
failures, and a classified ``error_reason`` and ``attempts`` for every row.

Every planned row is accounted for: a row img2dataset drops without a record (a worker
thread or its resizer failed) is added as failed with ``error_reason`` ``lost``, retried
like a timeout, and makes the command end non-zero while it stays lost.

Resume is safe against changed settings: the normalised input records what it was made
from (input settings, files' sizes and times) and every shard's completion record the
download settings that shape its bytes and the input's digest; a rerun with anything
changed refuses, naming it, or with ``--redo`` re-reads the input and redoes the stale
shards (a changed input or ``samples_per_shard`` changes them all).
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq

from pipeline import shards
from pipeline.config import ConfigError, RunConfig
from pipeline.fetch import TAG, FetchPolicy

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
    return GuardedResizer(
        image_size=d.image_size, resize_mode=d.resize_mode, resize_only_if_bigger=d.resize_only_if_bigger,
        encode_quality=d.encode_quality, encode_format=d.encode_format, min_image_size=d.min_image_size,
        max_image_area=max_pixels, max_aspect_ratio=d.max_aspect_ratio or float("inf"),
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


def _account(table: pa.Table, planned: pa.Table, shard_id: int, oom: int) -> pa.Table:
    """``table`` plus a failed row (``error_reason`` lost) for every planned row it lacks."""
    have = set(table["key"].to_pylist())
    missing = [i for i in range(planned.num_rows) if shards_key(i, shard_id, oom) not in have]
    if not missing:
        return table
    log.warning("shard %s: img2dataset wrote no record for %d row(s); recorded as lost", shard_id, len(missing))
    rows = []
    for i in missing:
        row = dict.fromkeys(table.column_names) | planned.slice(i, 1).to_pylist()[0]
        rows.append(row | {"key": shards_key(i, shard_id, oom), "status": "failed_to_download", "error_message": LOST})
    return pa.concat_tables([table, pa.Table.from_pylist(rows, schema=table.schema)])


@dataclass
class ShardTask:
    """One shard's download, a picklable callable run as a Ray task."""

    config: dict  # RunConfig as a dict (plain data crosses process boundaries)
    column_list: list[str]
    fingerprint: dict | None = None  # written into every completion record

    def __call__(self, job: tuple[int, str, str]) -> dict:
        shard_id, source, kind = job
        cfg = RunConfig.model_validate(self.config)
        from pipeline import fetch, ray_backend

        ray_backend.quiet_env()
        f = cfg.download.fetch
        fetch.install(FetchPolicy(allow_loopback=f.allow_loopback, max_bytes=f.max_bytes,
                                  max_redirects=f.max_redirects, deadline=f.read_deadline))
        raw = cfg.raw_dir
        staging = shards.new_staging(raw, shard_id)
        try:
            if kind == "first":
                return self._first(cfg, shard_id, Path(source), staging)
            return self._retry(cfg, shard_id, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _download(self, cfg: RunConfig, shard_id: int, feather_path: Path, out: Path) -> tuple[pa.Table, dict]:
        """img2dataset on one feather of rows: (one metadata row per input row, {key: image bytes})."""
        from img2dataset.downloader import Downloader

        d = cfg.download
        out.mkdir(parents=True, exist_ok=True)
        planned = feather.read_table(feather_path)  # img2dataset deletes its input
        downloader = Downloader(
            sample_writer_class=_writer_class(), resizer=_guarded_resizer(cfg, d.fetch.max_pixels),
            thread_count=d.threads, save_caption=True, extract_exif=False, output_folder=str(out),
            column_list=self.column_list, timeout=d.timeout, number_sample_per_shard=d.samples_per_shard,
            oom_shard_count=shards.SHARD_DIGITS, compute_hash=d.compute_hash, verify_hash_type=None,
            encode_format=d.encode_format, retries=d.retries, user_agent_token=d.user_agent_token,
            disallowed_header_directives=d.disallowed_header_directives,
        )
        downloader.download_shard((shard_id, str(feather_path)))  # raises on a shard-level failure
        name = shards.shard_name(shard_id)
        table = _account(pq.read_table(out / f"{name}.parquet"), planned, shard_id, _oom(cfg))
        images = {k: m[d.encode_format] for k, m in shards.read_tar(out / f"{name}.tar").items()}
        return table, images

    def _first(self, cfg: RunConfig, shard_id: int, source: Path, staging: Path) -> dict:
        local = staging / "input.feather"
        shutil.copyfile(source, local)  # img2dataset deletes its input; the planned copy survives a kill
        start = time.time()
        table, images = self._download(cfg, shard_id, local, staging / "pass0")
        reasons = [classify(s, e) for s, e in zip(table["status"].to_pylist(), table["error_message"].to_pylist())]
        table = table.append_column("error_reason", pa.array(reasons, pa.string()))
        table = table.append_column("attempts", pa.array([1] * table.num_rows, pa.int32()))
        return self._commit(cfg, shard_id, table, images, staging, passes=0, start=start)

    def _retry(self, cfg: RunConfig, shard_id: int, staging: Path) -> dict:
        raw, name = cfg.raw_dir, shards.shard_name(shard_id)
        start = time.time()
        table = pq.read_table(raw / f"{name}.parquet")
        done = shards.read_stats(raw, shard_id)
        ok = set(pc.filter(table["key"], pc.equal(table["status"], "success")).to_pylist())
        images = {k: m[cfg.download.encode_format] for k, m in shards.read_tar(raw / f"{name}.tar").items() if k in ok}
        mask = pc.is_in(table["error_reason"], pa.array(sorted(RETRYABLE)))
        todo = table.filter(mask)
        if todo.num_rows:
            feather.write_feather(todo.select(self.column_list), staging / "retry.feather")
            new, new_images = self._download(cfg, shard_id, staging / "retry.feather", staging / "retry")
            to_orig = {shards_key(i, shard_id, _oom(cfg)): k for i, k in enumerate(todo["key"].to_pylist())}
            rows = {r["key"]: r for r in table.to_pylist()}
            for r in new.to_pylist():
                orig = to_orig[r["key"]]
                merged = rows[orig] | {c: r[c] for c in new.column_names if c not in self.column_list}
                merged["key"] = orig
                merged["attempts"] = rows[orig]["attempts"] + 1
                merged["error_reason"] = classify(r["status"], r["error_message"])
                rows[orig] = merged
                if r["key"] in new_images:
                    images[orig] = new_images[r["key"]]
            table = pa.Table.from_pylist([rows[k] for k in table["key"].to_pylist()], schema=table.schema)
        return self._commit(cfg, shard_id, table, images, staging, passes=done["retry_passes_done"] + 1,
                            start=start, previous=done)

    def _commit(self, cfg, shard_id, table, images, staging, passes, start, previous=None) -> dict:
        fmt, name = cfg.download.encode_format, shards.shard_name(shard_id)
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
        stats = {
            "count": table.num_rows,
            "successes": status.count("success"),
            "failed_to_download": status.count("failed_to_download"),
            "failed_to_resize": status.count("failed_to_resize"),
            "reasons": {r["values"]: r["counts"] for r in reasons},
            "retryable": sum(r["counts"] for r in reasons if r["values"] in RETRYABLE),
            "retry_passes_done": passes,
            "start_time": (previous or {}).get("start_time", start),
            "end_time": time.time(),
        }
        stats["duration"] = stats["end_time"] - stats["start_time"]
        shards.commit(staging, cfg.raw_dir, shard_id, [f"{name}.tar", f"{name}.parquet"], stats, self.fingerprint)
        return stats


def _oom(cfg: RunConfig) -> int:
    return math.ceil(math.log10(cfg.download.samples_per_shard))


def shards_key(index: int, shard_id: int, oom_sample: int) -> str:
    """img2dataset's key for row ``index`` of shard ``shard_id``."""
    from img2dataset.downloader import compute_key

    return compute_key(index, shard_id, oom_sample, shards.SHARD_DIGITS)


# -- what made raw/: settings and input -----------------------------------------------------

# Download settings that change how fast, not what: left out of the fingerprint.
_SPEED_ONLY = ("threads", "timeout", "retries", "retry_passes", "retry_wait", "shard_timeout")


def download_settings(cfg: RunConfig) -> dict:
    """The download settings that shape a shard's rows and bytes, as dotted keys."""
    settings = shards.settings_of(cfg.download, "download", exclude=_SPEED_ONLY)
    settings.pop("download.fetch.read_deadline", None)  # a deadline, like the timeouts
    return settings


def _input_for(cfg: RunConfig) -> dict:
    """raw/_input/input.json, normalising the input first when it is new or changed.

    A changed input (settings, or a file's size or time) with committed shards refuses unless
    ``cfg.redo``: then it is read again (the shards then compare its new digest)."""
    from pipeline.inputs import normalise, source_fingerprint

    if cfg.input is None:
        raise ConfigError("download needs an input section (input.path: the URL list)")
    raw = cfg.raw_dir
    norm, info_path = raw / "_input" / "input.parquet", raw / "_input" / "input.json"
    source = source_fingerprint(cfg.input)
    info = json.loads(info_path.read_text()) if info_path.exists() and norm.exists() else None
    if info is not None and (info.get("fingerprint") or {}).get("hash") == source["hash"] and info.get("digest"):
        return info
    if info is not None and shards.done_shards(raw) and not cfg.redo:
        raise shards.StageChanged(
            f"download: {raw} was made from another input: {shards.explain_change(info.get('fingerprint'), source)}. "
            f"Rerun with --redo to read the input again and redo the shards it changes, or use another output folder")
    info = normalise(cfg.input, norm) | {"fingerprint": source}
    shutil.rmtree(raw / "_input" / "shards", ignore_errors=True)  # planned from the old input
    shards.atomic_write(info_path, json.dumps(info, indent=2))
    return info


def plan(cfg: RunConfig) -> tuple[list[str], list[tuple[int, str, int]], dict]:
    """Normalise the input once, check what raw/ holds, and shard the input with img2dataset's reader.

    Returns the column list, the (shard_id, feather path, rows) of shards not yet done, and the
    fingerprint every shard's completion record carries. Committed shards made with other
    settings or from another input raise :class:`shards.StageChanged`, or with ``cfg.redo``
    are removed to be redone."""
    from img2dataset.reader import Reader

    raw = cfg.raw_dir
    info = _input_for(cfg)
    fingerprint = shards.fingerprint(download_settings(cfg), {"raw/_input/input.parquet": info["digest"]})
    for sid in shards.stale_shards(raw, lambda sid: fingerprint, redo=cfg.redo, stage="download"):
        for suffix in (".tar", ".parquet", "_failed.json"):
            (raw / f"{shards.shard_name(sid)}{suffix}").unlink(missing_ok=True)
    count = math.ceil(info["rows"] / cfg.download.samples_per_shard)
    for sid in shards.failed_shards(raw):
        if sid >= count:  # recorded under an older sharding
            shards.failed_path(raw, sid).unlink(missing_ok=True)
    shards.atomic_write(raw / "config.json", cfg.model_dump_json(indent=2))  # it matches what raw/ holds
    tmp = raw / "_input"
    norm = tmp / "input.parquet"
    extras = [c for c in pq.read_schema(norm).names if c not in ("url", "caption")]
    reader = Reader(str(norm), "parquet", "url", "caption", None, None, extras or None,
                    cfg.download.samples_per_shard, shards.done_shards(raw), str(tmp / "shards"))
    (tmp / "shards").mkdir(parents=True, exist_ok=True)
    todo = []
    for shard_id, path in reader:
        todo.append((shard_id, path, feather.read_table(path, memory_map=True).num_rows))
    return reader.column_list, todo, fingerprint


def download(cfg: RunConfig, shard_timeout: float | None = None) -> dict:
    """Run the download stage; return the funnel of raw/ (``failed_shards`` set when a shard
    failed or rows stayed lost: the command then ends non-zero).

    ``shard_timeout`` (default ``download.shard_timeout``): seconds after which a shard task
    still running is cancelled and its shard recorded as failed."""
    from pipeline import ray_backend
    from pipeline.report import download_funnel

    ray_backend.quiet_env()
    raw = cfg.raw_dir
    raw.mkdir(parents=True, exist_ok=True)
    shard_timeout = shard_timeout or cfg.download.shard_timeout
    shards.clear_staging(raw)
    with ThreadPoolExecutor(1) as pool:  # plan while Ray starts and its workers import
        planned = pool.submit(plan, cfg)
        ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
        ray_backend.warm_up(["pipeline.download", "img2dataset.downloader", "img2dataset.writer"])
        column_list, todo, fingerprint = planned.result()
    task = ShardTask(cfg.model_dump(), column_list, fingerprint)
    failures, nodes = {}, set()

    def run(jobs, desc, weight):
        for job, result, node in ray_backend.run_tasks(task, jobs, desc=desc, unit="img", weight=weight,
                                                       max_in_flight=cfg.resources.download_tasks,
                                                       timeout=shard_timeout):
            nodes.add(node)
            if isinstance(result, Exception):
                reason = f"{type(result).__name__}: {result}"
                failures[job[0]] = reason
                shards.record_failure(raw, job[0], "download", reason)
                log.error("%s of shard %s failed: %s (rerun the command to retry it)", desc, job[0], reason)

    rows = {sid: n for sid, _, n in todo}
    run([(sid, path, "first") for sid, path, _ in todo], "download", lambda j: rows[j[0]])
    passes = cfg.download.retry_passes
    for round_no in range(1, max(passes, 1) + 1):
        # a shard's passes resume where a killed run left them; rows img2dataset lost get one more
        # pass in every invocation, so "rerun to retry" holds for them even after the last pass
        todo_retry = [sid for sid in sorted(shards.done_shards(raw))
                      if (s := shards.read_stats(raw, sid))["retryable"] and (
                          (round_no <= passes and s["retry_passes_done"] < round_no)
                          or (round_no == 1 and s["reasons"].get("lost")))]
        if not todo_retry:
            break
        time.sleep(cfg.download.retry_wait * round_no)
        counts = {sid: shards.read_stats(raw, sid)["retryable"] for sid in todo_retry}
        run([(sid, "", "retry") for sid in todo_retry], f"retry pass {round_no}", lambda j: counts[j[0]])
    return _funnel(cfg, download_funnel, failures, nodes)


def _funnel(cfg: RunConfig, download_funnel, failures: dict, nodes: set) -> dict:
    raw = cfg.raw_dir
    done = sorted(shards.done_shards(raw))
    if done:
        funnel = download_funnel(Path(cfg.output))
    else:  # every shard failed: nothing to read, say so
        info = json.loads((raw / "_input" / "input.json").read_text())
        funnel = {"stage": "download", "rows_in": info["rows"], "rows_out": 0, "succeeded": 0, "failed": 0,
                  "failed_by_reason": {}, "attempts": {}, "retried_and_succeeded": 0, "shards": 0,
                  "lineage_ok": False, "duplicated_keys": 0}
    funnel["ray_nodes_used"] = len(nodes - {None})
    lost = {sid: n for sid in done if (n := shards.read_stats(raw, sid)["reasons"].get("lost", 0))}
    funnel["lost_rows"] = sum(lost.values())
    failed = {str(sid): reason[:500] for sid, reason in sorted(failures.items()) if sid not in done}
    failed |= {str(sid): f"{n} row(s) img2dataset dropped without a record, kept as error_reason 'lost'"
               for sid, n in lost.items()}
    if failed:
        funnel["failed_shards"] = failed
    return funnel
