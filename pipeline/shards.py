"""Shard I/O shared by the stages: deterministic tars, atomic commits, completion records.

A stage writes a shard's files into a private staging folder, then renames them into
the output folder, the completion record (``NNNNN_stats.json``) last. A shard is done
exactly when its record exists; a rerun skips done shards and redoes the others, so
a killed run never leaves a half-written or duplicated shard behind. Staged files are
fsynced before they are renamed and the folder after, so a power loss cannot leave a
committed but empty shard.

Every completion record carries the stage's *fingerprint* (:func:`fingerprint`): a hash of
the settings and upstream records that determine the shard's bytes. A rerun compares it
(:func:`stale_shards`) and refuses, naming what changed, or redoes only the stale shards
when asked (``--redo``). A shard that failed leaves ``NNNNN_failed.json`` with its reason
(:func:`record_failure`), removed when the shard commits; later stages and the report
read them (:func:`failed_shards`). One command at a time writes a run folder
(:class:`RunLock`).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import pyarrow as pa

from pipeline import storage

SHARD_DIGITS = 5  # digits of the shard names Tapir writes (img2dataset's default)
_DIGITS: dict[str, int] = {}  # folder url -> digits of the shard names found there


def shard_name(shard_id: int, digits: int = SHARD_DIGITS) -> str:
    return f"{shard_id:0{digits}d}"


def digits(folder) -> int:
    """Digits of the shard names in ``folder``: read from the names already there (DataComp's
    img2dataset shards have 8: ``00000000.tar``), else :data:`SHARD_DIGITS`."""
    key = storage.url(folder)
    if key not in _DIGITS:
        # the shortest name: past 10^digits shards ids take more digits (00001 and 100000 both
        # in a 5-digit folder), and a listing's order is arbitrary
        lengths = [len(p.name.split("_")[0]) for p in storage.path(folder).glob("*_stats.json")]
        if not lengths:
            return SHARD_DIGITS  # nothing there yet: not cached, a later commit names it
        _DIGITS[key] = min(lengths)
    return _DIGITS[key]


def set_digits(folder, digits: int) -> None:
    """Declare the digits of a folder's shard names (before its first commit names them)."""
    _DIGITS[storage.url(folder)] = digits


def shard_file(folder, shard_id: int, suffix: str):
    """``FOLDER/NNNNN<suffix>`` (``.tar``, ``.parquet``, ``_stats.json``), named as the folder names its shards."""
    return storage.path(folder) / f"{shard_name(shard_id, digits(folder))}{suffix}"


def stats_path(folder, shard_id: int):
    return shard_file(folder, shard_id, "_stats.json")


def done_shards(folder) -> set[int]:
    """Shard ids whose completion record exists."""
    return {int(p.name.split("_")[0]) for p in storage.path(folder).glob("*_stats.json")}


def read_stats(folder, shard_id: int) -> dict:
    return json.loads(stats_path(folder, shard_id).read_text())


def new_staging(folder, shard_id: int) -> Path:
    """A private local folder for one shard's files before its commit (see :func:`storage.staging_root`)."""
    path = storage.staging_root(folder) / f"{shard_name(shard_id)}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def write_tar(path: Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> None:
    """Write samples (key, {ext: bytes}) as a WebDataset tar: sorted members, fixed metadata,
    so the same samples always give the same bytes."""
    with storage.path(path).open("wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))


MAX_MEMBER_BYTES = 512 * 2**20  # one sample member; a bigger one is refused before it is read


class UnsafeTar(ValueError):
    """A tar holds a member Tapir will not read (sparse, oversized, a link or device)."""


def safe_members(tar: tarfile.TarFile, path: Path, max_bytes: int = MAX_MEMBER_BYTES):
    """The regular-file members of an open tar, checked before any byte is read: a sparse
    member (a few KB that expand to gigabytes), one over ``max_bytes``, or a link, device
    or fifo raises :class:`UnsafeTar` naming the file and member. Folders are skipped."""
    for member in tar:
        if member.isdir():
            continue
        if member.issparse():
            raise UnsafeTar(f"{path}: member {member.name!r} is a sparse file; refused (shards hold regular files)")
        if not member.isreg():
            raise UnsafeTar(f"{path}: member {member.name!r} is not a regular file (tar type {member.type!r}); "
                            "refused")
        if member.size > max_bytes:
            raise UnsafeTar(f"{path}: member {member.name!r} is {member.size} bytes, over the {max_bytes}-byte limit; "
                            "refused")
        yield member


def read_tar(path: Path, keys: set[str] | None = None,
             max_bytes: int = MAX_MEMBER_BYTES) -> dict[str, dict[str, bytes]]:
    """The samples of a tar as {key: {ext: bytes}} (keys split at the first dot of the basename);
    only those in ``keys`` when given (the others are skipped, not read). Unsafe members
    (see :func:`safe_members`) raise :class:`UnsafeTar`."""
    samples: dict[str, dict[str, bytes]] = {}
    with storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r") as tar:
        for member in safe_members(tar, path, max_bytes):
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if keys is not None and key not in keys:
                continue
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # what Tapir's shards hold (download.encode_format, build.image_format)


def open_image(data: bytes, formats: tuple[str, ...] = IMAGE_FORMATS):
    """A PIL image from untrusted shard bytes, trying only ``formats`` (Pillow otherwise
    probes every plugin it has, exotic parsers included). Raises like ``Image.open``."""
    from PIL import Image

    return Image.open(io.BytesIO(data), formats=list(formats))


def write_parquet(path, table: pa.Table) -> None:
    storage.write_parquet(path, table)


def fsync_path(path) -> None:
    """Flush a file's (or a folder's entries') bytes to disk (nothing to do on an object store)."""
    if storage.is_remote(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A temporary sibling of ``path`` no other process will pick (pid and a random part)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path, data: bytes | str) -> None:
    """Write ``path`` whole or not at all: a unique temp file, fsynced, renamed over it
    (on an object store: one PUT, which is atomic)."""
    data = data.encode() if isinstance(data, str) else data
    if storage.is_remote(path):
        storage.path(path).write_bytes(data)
        return
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def atomic_write_parquet(path, table: pa.Table) -> None:
    if storage.is_remote(path):
        storage.write_parquet(path, table)
        return
    path = Path(path)
    tmp = temp_name(path)
    try:
        storage.write_parquet(tmp, table)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def commit(staging: Path, folder, shard_id: int, files: list[str], stats: dict,
           fingerprint: dict | None = None) -> None:
    """Move staged files into ``folder`` and write the completion record last.

    Data files are fsynced before the rename and the folder after, then the record (with
    ``fingerprint`` when given) is written and synced the same way. On an object store the
    data objects are uploaded under their final names, then the record (no rename there)."""
    if storage.is_remote(folder):
        for name in files:
            storage.upload(staging / name, storage.path(folder) / name)
    else:
        folder = Path(folder)
        for name in files:
            fsync_path(staging / name)
        for name in files:
            os.replace(staging / name, folder / name)
        fsync_path(folder)
    if fingerprint is not None:
        stats = {**stats, "fingerprint": fingerprint}
    atomic_write(stats_path(folder, shard_id), json.dumps(stats, indent=2, sort_keys=True, default=str))
    failed_path(folder, shard_id).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    _kill_hook(folder)


def _kill_hook(folder: Path) -> None:
    """Tests of kill -9 and resume: ``TAPIR_KILL_AFTER_COMMITS=N`` kills this process group
    (the command and its Ray workers) the moment a folder holds N committed shards: a
    deterministic point instead of a race against a polling loop."""
    limit = os.environ.get("TAPIR_KILL_AFTER_COMMITS")
    if limit and len(done_shards(folder)) >= int(limit):
        import signal

        # Ray workers run in process groups of their own: the CLI put the command's group here
        os.killpg(int(os.environ.get("TAPIR_KILL_PGID") or os.getpgid(0)), signal.SIGKILL)


# -- fingerprints: what made a shard ------------------------------------------------------


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(settings: dict, upstream: dict | None = None) -> dict:
    """A shard's fingerprint: ``settings`` (dotted config key -> value, only keys that change
    the output) and ``upstream`` (name -> digest of an input, e.g. :func:`record_digest` of
    the shard this one was made from). Stored in the completion record."""
    settings, upstream = dict(settings), dict(upstream or {})
    return {"hash": _digest([settings, upstream]), "settings": settings, "upstream": upstream}


def settings_of(section, prefix: str, exclude: tuple[str, ...] = ()) -> dict:
    """``{prefix.key: value}`` for a pydantic config section (nested sections flattened),
    leaving out ``exclude`` (keys that change speed, not output)."""
    data = section.model_dump(mode="json") if hasattr(section, "model_dump") else dict(section)
    out = {}
    for key, value in data.items():
        if key in exclude:
            continue
        if isinstance(value, dict):
            out.update({f"{prefix}.{key}.{k}": v for k, v in value.items()})
        else:
            out[f"{prefix}.{key}"] = value
    return out


def record_digest(folder: Path, shard_id: int) -> str | None:
    """Digest of a shard's completion record (changes whenever the shard is redone); None if absent."""
    path = stats_path(folder, shard_id)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


class StageChanged(ValueError):
    """Committed shards were made with other settings or inputs than this run's."""


def explain_change(old: dict | None, new: dict) -> str:
    """One line naming what differs between two fingerprints (the first few keys)."""
    if not old:
        return "it was made by an older Tapir that recorded no fingerprint"
    parts = []
    for kind in ("settings", "upstream"):
        a, b = old.get(kind, {}), new.get(kind, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                if kind == "settings":
                    parts.append(f"{key} was {a.get(key, '(unset)')!r}, now {b.get(key, '(unset)')!r}")
                else:
                    parts.append(f"its input {key} changed since")
    return "; ".join(parts[:3]) + (f" (and {len(parts) - 3} more)" if len(parts) > 3 else "") if parts else \
        "its fingerprint differs"


def stale_shards(folder: Path, expected, *, redo: bool, stage: str) -> set[int]:
    """Committed shards of ``folder`` whose recorded fingerprint is not ``expected(shard_id)``.

    Without ``redo`` any stale shard raises :class:`StageChanged` naming the change and the
    shards; with ``redo`` their completion records are removed (so they count as not done)
    and their ids returned for the caller to redo."""
    stale: dict[int, str] = {}
    for sid in sorted(done_shards(folder)):
        want = expected(sid)
        have = read_stats(folder, sid).get("fingerprint")
        if not have or have.get("hash") != want["hash"]:
            stale[sid] = explain_change(have, want)
    if stale and not redo:
        first = min(stale)
        ids = sorted(stale)
        which = shard_name(first) if len(ids) == 1 else f"{len(ids)} shards ({shard_name(ids[0])}..{shard_name(ids[-1])})"
        raise StageChanged(f"{stage}: {folder} holds {which} made differently: {stale[first]}. Rerun with --redo to "
                           f"redo only the affected shards, or use another output folder")
    for sid in stale:
        stats_path(folder, sid).unlink(missing_ok=True)
    return set(stale)


# -- failures: a shard that could not be made says why ------------------------------------


def failed_path(folder, shard_id: int):
    return shard_file(folder, shard_id, "_failed.json")


def record_failure(folder, shard_id: int, stage: str, reason: str) -> None:
    """Record on disk that a shard failed and why (removed when the shard later commits)."""
    storage.path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write(failed_path(folder, shard_id), json.dumps(
        {"shard": shard_name(shard_id), "stage": stage, "reason": str(reason)[:2000], "time": time.time()},
        indent=2))


def prune_failures(folder: Path, keep: set[int]) -> None:
    """Remove failure records of shards outside ``keep`` (no longer planned upstream)."""
    for p in storage.path(folder).glob("*_failed.json"):
        if int(p.name.split("_")[0]) not in keep:
            p.unlink(missing_ok=True)


def failed_shards(folder: Path) -> dict[int, str]:
    """{shard id: reason} of shards recorded as failed and not committed since."""
    out = {}
    for p in storage.path(folder).glob("*_failed.json"):
        sid = int(p.name.split("_")[0])
        if not stats_path(folder, sid).exists():
            out[sid] = json.loads(p.read_text()).get("reason", "")
    return out


# -- one writer per run folder ------------------------------------------------------------


class RunLocked(RuntimeError):
    """Another command holds the run folder."""


class RunLock:
    """An exclusive lock on a run folder for the life of a command (``fcntl.flock`` on
    ``RUN/.tapir.lock``; the kernel drops it when the process dies, so no stale locks).

    A second command on the same folder fails at once, naming the holder. An object store
    has no such lock: a run folder there is locked on this machine only (a lock file under
    the local temporary folder, keyed by the URL); run one command per run URL at a time."""

    def __init__(self, folder, command: str = "tapir"):
        self.folder, self.command, self.fd = storage.path(folder), command, None

    def _lock_file(self) -> Path:
        if not storage.is_remote(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            return Path(self.folder) / ".tapir.lock"
        root = storage.staging_root(self.folder)
        root.mkdir(parents=True, exist_ok=True)
        return root.with_name(root.name + ".lock")

    def __enter__(self) -> "RunLock":
        path = self._lock_file()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"{self.folder} is in use by {holder}; wait for it to finish or use another "
                            f"output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"`{self.command}` (pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def clear_staging(folder) -> None:
    """Remove what killed runs left in staging (never a committed shard)."""
    shutil.rmtree(storage.staging_root(folder), ignore_errors=True)


def read_metadata(folder) -> pa.Table:
    """All committed shards' metadata parquet files, concatenated in shard order."""
    ids = sorted(done_shards(folder))
    tables = [storage.read_parquet(shard_file(folder, i, ".parquet")) for i in ids]
    if not tables:
        raise FileNotFoundError(f"no completed shards in {folder}")
    return pa.concat_tables(tables, promote_options="default")
