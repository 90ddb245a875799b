"""Reading URL lists lazily: parquet, csv, tsv, jsonl, txt (the text formats also .gz, .bz2, .zst);
LAION, CC3M and DataComp column presets; local paths or fsspec URLs, files, folders or globs.

Nothing here reads a whole input: :func:`read_file` yields normalised batches of one file
(``url``, ``caption``, then every carried column) from a given row on, so the planner
(``pipeline.input_plan``) cuts shards as it reads and a resumed plan starts where the last
one stopped. Input columns that img2dataset or Tapir write themselves (``sha256``, ``key``,
``width``, ...) are kept under the prefix ``input_`` (``input_sha256``) rather than dropped.
``caption_col: null`` (and a ``.txt`` list, one URL per line) means a URL-only list: every
caption is null.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from pipeline import shards, storage
from pipeline.config import InputConfig

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
BLOCK = 1 << 22  # bytes of text read per batch (csv, tsv, jsonl, txt)

# Columns the download writes itself: an input column of the same name is kept as input_<name>.
RESERVED = {"key", "status", "error_message", "width", "height", "original_width", "original_height",
            "attempts", "error_reason", "sha256", "md5", "sha512", "exif", "url", "caption", "source"}
PREFIX = "input_"


class InputError(ValueError):
    """The URL list cannot be used; the message names the file and what is wrong."""


def sections(cfg_input: InputConfig | list[InputConfig] | None) -> list[tuple[str, InputConfig]]:
    """(source name, section) of every input of a run: one section or a list of named ones."""
    if cfg_input is None:
        return []
    if isinstance(cfg_input, InputConfig):
        return [(cfg_input.name or "input", cfg_input)]
    return [(c.name, c) for c in cfg_input]


def _paths(cfg: InputConfig) -> list[str]:
    return [cfg.path] if isinstance(cfg.path, str) else list(cfg.path)


def _split(name: str) -> tuple[str, str | None]:
    """(name without a compression suffix, pyarrow codec or None)."""
    for suffix, codec in COMPRESSIONS.items():
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], codec
    return name, None


def file_format(name: str, cfg: InputConfig) -> str | None:
    base = _split(name)[0].lower()
    if cfg.format != "auto":
        return cfg.format
    for fmt in FORMATS:
        if base.endswith("." + fmt) or (fmt == "jsonl" and base.endswith(".json")):
            return fmt
    return None


def input_files(cfg: InputConfig) -> list[tuple[str, str]]:
    """(file, format) of every file of an input section, sorted by name: each path is a file, a
    folder (its files of a known format, not recursive) or a glob pattern. Only names are listed."""
    out = []
    for p in _paths(cfg):
        if globlib.has_magic(p):
            found = sorted(storage.path(p).fs.glob(storage.path(p).path) if storage.is_remote(p) else
                           globlib.glob(p, recursive=True))
            if storage.is_remote(p):
                found = [f"{storage.path(p).protocol}://{f}" for f in found]
            files = [f for f in found if storage.path(f).is_file()]
            if not files:
                raise InputError(f"input {p} matches no file")
        else:
            path = storage.path(p)
            if not path.exists():
                raise InputError(f"input {p} does not exist")
            if path.is_dir():
                files = sorted(storage.url(f) for f in path.iterdir()
                               if f.is_file() and not f.name.startswith(".") and file_format(f.name, _auto(cfg)))
                if cfg.format != "auto":
                    files = [f for f in files if file_format(f, _auto(cfg)) == cfg.format]
                if not files:
                    kinds = cfg.format if cfg.format != "auto" else "/".join(FORMATS)
                    raise InputError(f"input folder {p} holds no {kinds} files")
            else:
                files = [p]
        for f in files:
            fmt = file_format(storage.path(f).name, cfg)
            if fmt is None:
                raise InputError(f"input {f}: cannot tell its format from the extension; set input.format")
            out.append((f, fmt))
    return sorted(dict.fromkeys(out))


def _auto(cfg: InputConfig) -> InputConfig:
    return cfg.model_copy(update={"format": "auto"})


def file_stat(path: str) -> str:
    """What identifies a file's version cheaply (no byte read): size and modification time."""
    p = storage.path(path)
    if not storage.is_remote(p):
        st = os.stat(p)
        return f"{st.st_size} bytes, modified {st.st_mtime_ns}"
    info = p.fs.info(p.path)
    stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime") or info.get("updated")
    return f"{info.get('size')} bytes, version {stamp}"


def file_size(path: str) -> int:
    p = storage.path(path)
    return os.stat(p).st_size if not storage.is_remote(p) else int(p.fs.info(p.path)["size"])


def _key(path: str) -> str:
    """A file's stable name in fingerprints and plan records: the absolute path, or the URL."""
    return storage.url(path) if storage.is_remote(path) else os.path.abspath(path)


def source_fingerprint(cfg_input, extra: dict | None = None) -> dict:
    """What the plan is made from: every input's settings (columns as resolved) and each input
    file's size and modification time (cheap: no file is read), plus ``extra`` settings."""
    settings, files = dict(extra or {}), {}
    multi = not isinstance(cfg_input, InputConfig)
    for name, cfg in sections(cfg_input):
        url_col, cap_col = cfg.columns()
        pre = f"input.{name}." if multi else "input."
        paths = [_key(p) if not globlib.has_magic(p) else p for p in _paths(cfg)]
        settings.update({pre + "path": paths[0] if isinstance(cfg.path, str) else paths, pre + "format": cfg.format,
                         pre + "preset": cfg.preset, pre + "url_col": url_col, pre + "caption_col": cap_col,
                         pre + "extra_cols": cfg.extra_cols, pre + "name": name})
        for path, _ in input_files(cfg):
            files[_key(path)] = file_stat(path)
    return shards.fingerprint(settings, files)


# -- reading one file from a row on ---------------------------------------------------------


def _stream(path: str):
    """A pyarrow input stream of the file's (decompressed) bytes."""
    codec = _split(storage.path(path).name)[1]
    raw = pa.PythonFile(storage.path(path).open("rb"), mode="r")
    return pa.CompressedInputStream(raw, codec) if codec else raw


def _raw_batches(path: str, fmt: str, cfg: InputConfig, start: int, batch_rows: int) -> Iterator[pa.Table]:
    """The file's rows from row ``start`` on, as tables of its own columns."""
    if fmt == "parquet":
        if _split(storage.path(path).name)[1]:
            raise InputError(f"input {path}: a compressed parquet file; parquet compresses itself, store it plain")
        pf = storage.parquet_file(path)
        skip, groups = start, []
        for g in range(pf.num_row_groups):  # whole row groups before ``start`` are never read
            n = pf.metadata.row_group(g).num_rows
            if not groups and skip >= n:
                skip -= n
                continue
            groups.append(g)
        if not groups:
            if skip:
                _too_short(path, pf.metadata.num_rows, start)
            return
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, use_threads=False):
            table = pa.Table.from_batches([batch])
            if skip:
                table, skip = table.slice(min(skip, table.num_rows)), max(0, skip - table.num_rows)
            if table.num_rows:
                yield table
        return
    if file_size(path) == 0:  # not even a header: no rows (the readers would call it malformed)
        if start:
            _too_short(path, 0, start)
        return
    url_col, _ = cfg.columns()
    read = pcsv.ReadOptions(block_size=BLOCK)
    if fmt == "jsonl":
        reader = pjson.open_json(_stream(path), read_options=pjson.ReadOptions(block_size=BLOCK))
    elif fmt == "txt":  # one URL per line; a URL never holds a raw tab or quote to split on
        reader = pcsv.open_csv(_stream(path), read_options=pcsv.ReadOptions(block_size=BLOCK, column_names=[url_col]),
                               parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False))
    else:
        parse = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
        reader = pcsv.open_csv(_stream(path), read_options=read, parse_options=parse)
        if cfg.preset == "cc3m" and url_col not in reader.schema.names and len(reader.schema.names) == 2:
            # CC3M's published tsv has no header: caption<TAB>url
            reader = pcsv.open_csv(_stream(path), parse_options=parse, read_options=pcsv.ReadOptions(
                block_size=BLOCK, column_names=["caption", "url"]))
    for batch in reader:
        table = pa.Table.from_batches([batch])
        if start >= table.num_rows:
            start -= table.num_rows
            continue
        table, start = table.slice(start), 0
        for i in range(0, table.num_rows, batch_rows):
            yield table.slice(i, batch_rows)
    if start:
        _too_short(path, None, start)


def _too_short(path: str, rows: int | None, start: int):
    have = f"has {rows} rows" if rows is not None else "has fewer rows"
    raise InputError(f"input {path} {have}, fewer than the {start} planned before: it changed other than by rows "
                     f"appended (rerun with --redo)")


def normalise(table: pa.Table, path: str, fmt: str, cfg: InputConfig) -> pa.Table:
    """``url``, ``caption`` (null for a URL-only list) and the carried columns, reserved names prefixed."""
    url_col, cap_col = cfg.columns()
    cap = None if fmt == "txt" else cap_col
    missing = [c for c in (url_col, cap) if c is not None and c not in table.column_names]
    if missing:
        raise InputError(f"input {path} has no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
                         f"set input.url_col / input.caption_col (null for a URL-only list) or input.preset")
    extras = [c for c in table.column_names if c not in (url_col, cap)]
    if cfg.extra_cols != "all":
        absent = [c for c in cfg.extra_cols if c not in table.column_names]
        if absent:
            raise InputError(f"input {path} has no column {absent[0]!r} named in input.extra_cols")
        extras = list(cfg.extra_cols)
    cols = {"url": table[url_col].cast(pa.string())}
    cols["caption"] = table[cap].cast(pa.string()) if cap else pa.nulls(table.num_rows, pa.string())
    for c in extras:
        name = PREFIX + c if c in RESERVED else c
        if name in cols:
            raise InputError(f"input {path}: column {c!r} would be stored as {name!r}, which the input also has")
        cols[name] = table[c]
    return pa.table(cols)


def read_file(path: str, fmt: str, cfg: InputConfig, start: int = 0,
              batch_rows: int = 10_000) -> Iterator[pa.Table]:
    """Normalised batches (at most ``batch_rows`` rows) of one input file, from row ``start`` on."""
    try:
        for table in _raw_batches(path, fmt, cfg, start, batch_rows):
            yield normalise(table, path, fmt, cfg)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {fmt} input {path}: {e}") from e


def metadata_schema(cfg) -> pa.Schema:
    """The columns a download will carry from the inputs into ``raw/NNNNN.parquet`` besides
    img2dataset's own (``url``, ``caption``, ``source``, every kept column, reserved names as
    ``input_<name>``), read from the first rows of each input's first file only: rules are
    checked against them before anything is downloaded. Raises :class:`InputError`."""
    fields = {"source": pa.field("source", pa.string())}
    for _, section in sections(cfg.input):
        files = input_files(section)
        path, fmt = files[0]
        for table in read_file(path, fmt, section, batch_rows=1):
            for f in table.schema:
                fields.setdefault(f.name, f)
            break
    return pa.schema(list(fields.values()))
