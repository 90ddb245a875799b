"""Shard I/O shared by the stages: deterministic tars, atomic commits, completion records.

A stage writes a shard's files into a private staging folder, then renames them into
the output folder, the completion record (``NNNNN_stats.json``) last. A shard is done
exactly when its record exists; a rerun skips done shards and redoes the others, so
a killed run never leaves a half-written or duplicated shard behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_DIGITS = 5


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def stats_path(folder: Path, shard_id: int) -> Path:
    return Path(folder) / f"{shard_name(shard_id)}_stats.json"


def done_shards(folder: Path) -> set[int]:
    """Shard ids whose completion record exists."""
    return {int(p.name.split("_")[0]) for p in Path(folder).glob("*_stats.json")}


def read_stats(folder: Path, shard_id: int) -> dict:
    return json.loads(stats_path(folder, shard_id).read_text())


def new_staging(folder: Path, shard_id: int) -> Path:
    path = Path(folder) / "_staging" / f"{shard_name(shard_id)}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def write_tar(path: Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> None:
    """Write samples (key, {ext: bytes}) as a WebDataset tar: sorted members, fixed metadata,
    so the same samples always give the same bytes."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))


def read_tar(path: Path, keys: set[str] | None = None) -> dict[str, dict[str, bytes]]:
    """The samples of a tar as {key: {ext: bytes}} (keys split at the first dot of the basename);
    only those in ``keys`` when given (the others are skipped, not read)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, mode="r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if keys is not None and key not in keys:
                continue
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def write_parquet(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def commit(staging: Path, folder: Path, shard_id: int, files: list[str], stats: dict) -> None:
    """Move staged files into ``folder`` and write the completion record last."""
    folder = Path(folder)
    for name in files:
        os.replace(staging / name, folder / name)
    record = staging / stats_path(folder, shard_id).name
    record.write_text(json.dumps(stats, indent=2, sort_keys=True))
    os.replace(record, stats_path(folder, shard_id))
    shutil.rmtree(staging, ignore_errors=True)


def clear_staging(folder: Path) -> None:
    """Remove what killed runs left in staging (never a committed shard)."""
    shutil.rmtree(Path(folder) / "_staging", ignore_errors=True)


def read_metadata(folder: Path) -> pa.Table:
    """All committed shards' metadata parquet files, concatenated in shard order."""
    ids = sorted(done_shards(folder))
    tables = [pq.read_table(Path(folder) / f"{shard_name(i)}.parquet") for i in ids]
    if not tables:
        raise FileNotFoundError(f"no completed shards in {folder}")
    return pa.concat_tables(tables, promote_options="default")
