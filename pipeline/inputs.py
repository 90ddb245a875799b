"""Reading URL lists: parquet, csv, tsv, jsonl, txt; LAION, CC3M and DataComp column presets.

The input is read once, checked (the URL and caption columns exist, there is at least one
row) and written as one normalised parquet (``url``, ``caption``, then every carried
column) in the run folder. img2dataset's reader shards that file, so a resumed run shards
exactly the same rows. ``caption_col: null`` (and a ``.txt`` list, one URL per line) means
a URL-only list: every caption is null.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from pipeline import shards
from pipeline.config import InputConfig

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")


class InputError(ValueError):
    """The URL list cannot be used; the message names the file and what is wrong."""


def input_files(cfg: InputConfig) -> list[tuple[Path, str]]:
    path = Path(cfg.path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and _format(p, cfg) is not None) if path.is_dir() else [path]
    if not files:
        raise InputError(f"input folder {path} holds no {cfg.format if cfg.format != 'auto' else '/'.join(FORMATS)} files")
    out = []
    for f in files:
        fmt = _format(f, cfg)
        if fmt is None:
            raise InputError(f"input {f}: cannot tell its format from the extension; set input.format")
        out.append((f, fmt))
    return out


def _format(path: Path, cfg: InputConfig) -> str | None:
    if cfg.format != "auto":
        return cfg.format if path.name.endswith(f".{cfg.format}") or not Path(cfg.path).is_dir() else None
    name = path.name.lower().removesuffix(".gz")
    for fmt in FORMATS:
        if name.endswith("." + fmt) or (fmt == "jsonl" and name.endswith(".json")):
            return fmt
    return None


def read_one(path: Path, fmt: str, cfg: InputConfig) -> pa.Table:
    url_col, _ = cfg.columns()
    if path.stat().st_size == 0:  # not even a header: no rows (the readers would call it malformed)
        return pa.table({url_col: pa.array([], pa.string())})
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt == "jsonl":
            return pjson.read_json(path)
        if fmt == "txt":  # one URL per line; a URL never holds a raw tab or quote to split on
            return pcsv.read_csv(path, read_options=pcsv.ReadOptions(column_names=[url_col]),
                                 parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False))
        delimiter = "\t" if fmt == "tsv" else ","
        table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
        if cfg.preset == "cc3m" and url_col not in table.column_names and table.num_columns == 2:
            # CC3M's published tsv has no header: caption<TAB>url
            table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(column_names=["caption", "url"]),
                                  parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
        return table
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {fmt} input {path}: {e}") from e


RESERVED = {"key", "status", "error_message", "width", "height", "original_width", "original_height",
            "attempts", "error_reason", "sha256", "md5", "sha512", "url", "caption"}


def normalise(cfg: InputConfig, dest: Path) -> dict:
    """Read every input file, check columns, write ``dest`` (parquet) atomically; return a summary
    (rows, source, columns, and ``digest``: the sha256 of ``dest``)."""
    url_col, cap_col = cfg.columns()
    tables = []
    for path, fmt in input_files(cfg):
        table = read_one(path, fmt, cfg)
        cap = None if fmt == "txt" else cap_col
        missing = [c for c in (url_col, cap) if c is not None and c not in table.column_names]
        if missing and table.num_rows:
            raise InputError(f"input {path} has no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
                             f"set input.url_col / input.caption_col (null for a URL-only list) or input.preset")
        if missing:  # no rows, maybe not even a header: nothing to carry
            continue
        extras = [c for c in table.column_names if c not in (url_col, cap)]
        if cfg.extra_cols != "all":
            absent = [c for c in cfg.extra_cols if c not in table.column_names]
            if absent:
                raise InputError(f"input {path} has no column {absent[0]!r} named in input.extra_cols")
            extras = list(cfg.extra_cols)
        cols = {"url": table[url_col].cast(pa.string())}
        cols["caption"] = table[cap].cast(pa.string()) if cap else pa.nulls(table.num_rows, pa.string())
        for c in extras:
            if c not in RESERVED:
                cols[c] = table[c]
        tables.append(pa.table(cols))
    if not tables or sum(t.num_rows for t in tables) == 0:
        raise InputError(f"input {cfg.path} holds no rows: nothing to download")
    table = pa.concat_tables(tables, promote_options="permissive")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shards.atomic_write_parquet(dest, table)
    digest = hashlib.sha256()
    with open(dest, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"rows": table.num_rows, "source": str(cfg.path), "columns": table.column_names,
            "digest": digest.hexdigest()}


def source_fingerprint(cfg: InputConfig) -> dict:
    """What the normalised input is made from: the input settings (columns as resolved) and
    each input file's path, size and modification time (cheap: no file is read)."""
    url_col, cap_col = cfg.columns()
    settings = {"input.path": str(Path(cfg.path).resolve()), "input.format": cfg.format,
                "input.preset": cfg.preset, "input.url_col": url_col, "input.caption_col": cap_col,
                "input.extra_cols": cfg.extra_cols}
    files = {}
    for path, _ in input_files(cfg):
        st = path.stat()
        files[str(path.resolve())] = f"{st.st_size} bytes, modified {st.st_mtime_ns}"
    return shards.fingerprint(settings, files)
