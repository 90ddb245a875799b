"""The download stage: URL list -> raw/ (WebDataset tars + parquet metadata + stats).

Built on img2dataset's reader, downloader, resizer and writer. Tapir adds around them:
the hardened fetch (``pipeline.fetch``), a header check before decoding, atomic
shard commits and resume (``pipeline.shards``), later retry passes for retryable
failures, and a classified ``error_reason`` and ``attempts`` for every row.
"""

from __future__ import annotations

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
from pipeline.fetch import DEADLINE, REFUSED, TOO_LARGE, FetchPolicy

log = logging.getLogger(__name__)

RETRYABLE = {"timeout", "connection_error", "http_5xx", "http_429"}

# (pattern on error_message, reason); first match wins.
_REASONS = [
    (REFUSED + r": .*address", "refused_address"),
    (REFUSED + r"|Redirection to url .* is not allowed", "refused_scheme"),
    (TOO_LARGE, "too_many_bytes"),
    (DEADLINE + r"|timed out|timeout", "timeout"),
    (r"HTTP Error 404", "http_404"),
    (r"HTTP Error 429", "http_429"),
    (r"HTTP Error 5\d\d", "http_5xx"),
    (r"infinite loop|redirect error", "redirect_loop"),
    (r"HTTP Error (\d+)", "http_{0}"),
    (r"X-Robots-Tag", "opt_out"),
    (r"Remote end closed|Connection reset|Connection refused|Connection aborted|EOF occurred|"
     r"IncompleteRead|BadStatusLine|Broken pipe", "connection_error"),
    (r"dns failure|Name or service not known|getaddrinfo", "dns_error"),
    (r"unknown url type|no host given|URL can't contain", "invalid_url"),
    (r"not an image", "not_an_image"),
    (r"too many pixels|image area too large", "too_many_pixels"),
    (r"truncated", "truncated_image"),
    (r"decode error|Image decoding error", "decode_error"),
    (r"image too small", "too_small"),
    (r"aspect ratio too large", "bad_aspect_ratio"),
    (r"hash mismatch", "hash_mismatch"),
]


def classify(status: str | None, error_message: str | None) -> str:
    """The row's error_reason: 'success' or a short, stable reason name."""
    if status == "success":
        return "success"
    msg = error_message or ""
    for pattern, reason in _REASONS:
        m = re.search(pattern, msg)
        if m:
            return reason.format(*m.groups())
    return "other"


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
                            return *fail, f"too many pixels: {w}x{h} > {max_pixels}"
                        if im.format == "JPEG":  # a 1/8-scale decode reads the whole stream: finds truncation cheaply
                            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                            im.load()
            except Image.DecompressionBombError as e:
                return *fail, f"too many pixels: {e}"
            except UnidentifiedImageError:
                if data[:4].startswith(magics):
                    return *fail, "decode error: unreadable image header"
                return *fail, f"not an image: starts with {data[:16]!r}"
            except (OSError, SyntaxError, ValueError) as e:
                kind = "truncated" if "truncated" in str(e) else "decode error"
                return *fail, f"{kind}: {e}"
            return super().__call__(img_stream, blurring_bbox_list)

    d = cfg.download
    return GuardedResizer(
        image_size=d.image_size, resize_mode=d.resize_mode, resize_only_if_bigger=d.resize_only_if_bigger,
        encode_quality=d.encode_quality, encode_format=d.encode_format, min_image_size=d.min_image_size,
        max_image_area=max_pixels, max_aspect_ratio=d.max_aspect_ratio or float("inf"),
    )


@dataclass
class ShardTask:
    """One shard's download, a picklable callable run as a Ray task."""

    config: dict  # RunConfig as a dict (plain data crosses process boundaries)
    column_list: list[str]

    def __call__(self, job: tuple[int, str, str]) -> dict:
        shard_id, source, kind = job
        cfg = RunConfig.model_validate(self.config)
        from pipeline import fetch, ray_backend

        ray_backend.quiet_env()
        f = cfg.download.fetch
        fetch.install(FetchPolicy(f.allow_loopback, f.max_bytes, f.max_redirects, f.read_deadline))
        raw = cfg.raw_dir
        staging = shards.new_staging(raw, shard_id)
        try:
            if kind == "first":
                return self._first(cfg, shard_id, Path(source), staging)
            return self._retry(cfg, shard_id, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _download(self, cfg: RunConfig, shard_id: int, feather_path: Path, out: Path) -> tuple[pa.Table, dict]:
        from img2dataset.downloader import Downloader
        from img2dataset.writer import WebDatasetSampleWriter

        d = cfg.download
        out.mkdir(parents=True, exist_ok=True)
        downloader = Downloader(
            sample_writer_class=WebDatasetSampleWriter, resizer=_guarded_resizer(cfg, d.fetch.max_pixels),
            thread_count=d.threads, save_caption=True, extract_exif=False, output_folder=str(out),
            column_list=self.column_list, timeout=d.timeout, number_sample_per_shard=d.samples_per_shard,
            oom_shard_count=shards.SHARD_DIGITS, compute_hash=d.compute_hash, verify_hash_type=None,
            encode_format=d.encode_format, retries=d.retries, user_agent_token=d.user_agent_token,
            disallowed_header_directives=d.disallowed_header_directives,
        )
        downloader.download_shard((shard_id, str(feather_path)))  # raises on a shard-level failure
        name = shards.shard_name(shard_id)
        table = pq.read_table(out / f"{name}.parquet")
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
            oom = math.ceil(math.log10(cfg.download.samples_per_shard))
            to_orig = {shards_key(i, shard_id, oom): k for i, k in enumerate(todo["key"].to_pylist())}
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
        shards.commit(staging, cfg.raw_dir, shard_id, [f"{name}.tar", f"{name}.parquet"], stats)
        return stats


def shards_key(index: int, shard_id: int, oom_sample: int) -> str:
    """img2dataset's key for row ``index`` of shard ``shard_id``."""
    from img2dataset.downloader import compute_key

    return compute_key(index, shard_id, oom_sample, shards.SHARD_DIGITS)


def plan(cfg: RunConfig) -> tuple[list[str], list[tuple[int, str, int]]]:
    """Normalise the input once and shard it with img2dataset's reader.

    Returns the column list and the (shard_id, feather path, rows) of shards not yet done.
    """
    from img2dataset.reader import Reader

    from pipeline.inputs import normalise

    raw = cfg.raw_dir
    tmp = raw / "_input"
    norm = tmp / "input.parquet"
    if not norm.exists():
        if cfg.input is None:
            raise ConfigError("download needs an input section (input.path: the URL list)")
        normalise(cfg.input, norm)
    extras = [c for c in pq.read_schema(norm).names if c not in ("url", "caption")]
    reader = Reader(str(norm), "parquet", "url", "caption", None, None, extras or None,
                    cfg.download.samples_per_shard, shards.done_shards(raw), str(tmp / "shards"))
    (tmp / "shards").mkdir(parents=True, exist_ok=True)
    todo = []
    for shard_id, path in reader:
        todo.append((shard_id, path, feather.read_table(path, memory_map=True).num_rows))
    return reader.column_list, todo


def download(cfg: RunConfig) -> dict:
    """Run the download stage; return the funnel of raw/."""
    from pipeline import ray_backend
    from pipeline.report import download_funnel

    ray_backend.quiet_env()
    raw = cfg.raw_dir
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "config.json").write_text(cfg.model_dump_json(indent=2))
    shards.clear_staging(raw)
    with ThreadPoolExecutor(1) as pool:  # plan while Ray starts and its workers import
        planned = pool.submit(plan, cfg)
        ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
        ray_backend.warm_up(["pipeline.download", "img2dataset.downloader", "img2dataset.writer"])
        column_list, todo = planned.result()
    task = ShardTask(cfg.model_dump(), column_list)
    failures, nodes = [], set()
    jobs = [(sid, path, "first") for sid, path, _ in todo]
    rows = {sid: n for sid, _, n in todo}
    for job, result, node in ray_backend.run_tasks(task, jobs, desc="download", unit="img",
                                                   weight=lambda j: rows[j[0]],
                                                   max_in_flight=cfg.resources.download_tasks):
        nodes.add(node)
        if isinstance(result, Exception):
            failures.append((job[0], result))
            log.error("shard %s failed: %s (rerun the command to retry it)", job[0], result)
    for round_no in range(1, cfg.download.retry_passes + 1):
        todo_retry = [sid for sid in sorted(shards.done_shards(raw))
                      if (s := shards.read_stats(raw, sid))["retryable"] and s["retry_passes_done"] < round_no]
        if not todo_retry:
            break
        time.sleep(cfg.download.retry_wait * round_no)
        counts = {sid: shards.read_stats(raw, sid)["retryable"] for sid in todo_retry}
        for job, result, node in ray_backend.run_tasks(task, [(sid, "", "retry") for sid in todo_retry],
                                                 desc=f"retry pass {round_no}", unit="img",
                                                 weight=lambda j: counts[j[0]],
                                                 max_in_flight=cfg.resources.download_tasks):
            if isinstance(result, Exception):
                failures.append((job[0], result))
                log.error("retry of shard %s failed: %s", job[0], result)
    funnel = download_funnel(Path(cfg.output))
    funnel["ray_nodes_used"] = len(nodes - {None})
    if failures:
        funnel["failed_shards"] = {str(sid): str(err)[:500] for sid, err in failures}
    return funnel
