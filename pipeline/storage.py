"""Where stages read and write: a local folder or an fsspec URL (``s3://``, ``gs://``, ``memory://``).

:func:`path` turns a config string into a path object with pathlib's API: a local path is
a ``pathlib.Path`` (universal_pathlib's ``PosixUPath``), a URL a ``UPath`` on its fsspec
file system. Stage code uses ``/``, ``glob``, ``exists``, ``open``, ``read_bytes``,
``write_bytes`` and ``unlink`` on either; this module holds the few operations that differ:
parquet and tar I/O through the file system, and local staging for remote folders.

Object stores have no rename and no folder to fsync. The commit protocol there
(``pipeline.shards.commit``) is the same order without the rename: a shard's data objects
are uploaded under their final names, then its completion record; an object PUT is
atomic, and a shard without a record is redone whole on resume (its objects overwritten).

Credentials and endpoints come from the environment, as fsspec and botocore read them
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...,
or ``FSSPEC_S3_*`` for any s3fs option). :func:`worker_env` collects them so the Ray
workers of a cluster see the same ones.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec.config
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

# Stages in other processes commit into the same prefixes: a cached listing would hide them.
for _proto in ("s3", "s3a", "gs", "gcs", "abfs", "az"):
    fsspec.config.conf.setdefault(_proto, {}).setdefault("use_listings_cache", False)

# Environment a worker needs to reach the same object store as the driver.
_ENV_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_", "GCS_", "AZURE_")


def path(p) -> UPath:
    """A path object for a local path or an fsspec URL (pathlib's API on both)."""
    if isinstance(p, UPath):
        return p
    return UPath(os.fspath(p) if isinstance(p, os.PathLike) else p)


def is_remote(p) -> bool:
    """True for a URL on a non-local file system (``s3://...``), False for a local path."""
    return path(p).protocol not in ("", "file", "local")


def local(p) -> Path | None:
    """The local ``pathlib.Path`` of ``p``, or None when it is remote."""
    return None if is_remote(p) else Path(os.fspath(path(p)))


def url(p) -> str:
    """``p`` as a string a user would type (``s3://bucket/key`` or ``/abs/path``)."""
    return str(path(p))


def read_parquet(p, columns: list[str] | None = None, **kwargs) -> pa.Table:
    p = path(p)
    if not is_remote(p):
        return pq.read_table(os.fspath(p), columns=columns, **kwargs)
    return pq.read_table(p.path, columns=columns, filesystem=p.fs, **kwargs)


def read_schema(p) -> pa.Schema:
    p = path(p)
    if not is_remote(p):
        return pq.read_schema(os.fspath(p))
    with p.open("rb") as f:
        return pq.read_schema(f)


def parquet_file(p) -> pq.ParquetFile:
    """A ``ParquetFile`` (metadata, row groups, batches) on a local or remote file."""
    p = path(p)
    if not is_remote(p):
        return pq.ParquetFile(os.fspath(p))
    return pq.ParquetFile(p.path, filesystem=p.fs)


def write_parquet(p, table: pa.Table) -> None:
    """Write a parquet file (on an object store: one PUT, whole or not at all)."""
    p = path(p)
    if not is_remote(p):
        pq.write_table(table, os.fspath(p))
        return
    with p.open("wb") as f:
        pq.write_table(table, f)


@contextmanager
def open_read(p) -> Iterator:
    """A binary file object for reading ``p`` (tarfile, PIL and json take it)."""
    with path(p).open("rb") as f:
        yield f


def upload(src: Path, dest) -> None:
    """Copy a local file to ``dest`` (a local path or URL)."""
    dest = path(dest)
    if not is_remote(dest):
        shutil.copyfile(src, os.fspath(dest))
        return
    dest.fs.put_file(os.fspath(src), dest.path)


@contextmanager
def local_copy(p) -> Iterator[Path]:
    """A local file holding ``p``'s bytes: ``p`` itself when local, else a temporary download
    (removed afterwards). For libraries that read only local files."""
    p = path(p)
    if not is_remote(p):
        yield Path(os.fspath(p))
        return
    with tempfile.TemporaryDirectory(prefix="tapir-get-") as tmp:
        dest = Path(tmp) / p.name
        p.fs.get(p.path, os.fspath(dest), recursive=p.is_dir())
        yield dest


def staging_root(folder) -> Path:
    """Where shards of ``folder`` are staged before their commit: ``FOLDER/_staging`` when it
    is local (a rename then commits), else a local temporary folder keyed by the URL."""
    if not is_remote(folder):
        return Path(os.fspath(path(folder))) / "_staging"
    key = hashlib.sha256(url(folder).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tapir-staging-{os.getuid()}" / key


def worker_env() -> dict[str, str]:
    """Storage credentials and endpoints of this process, for the Ray workers' environment."""
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
