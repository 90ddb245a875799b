"""Reading URL lists: parquet, csv, tsv, jsonl; LAION, CC3M and DataComp column presets.

The input is read once, checked (the URL and caption columns exist) and written as one
normalised parquet (``url``, ``caption``, then every carried column) in the run folder.
img2dataset's reader shards that file, so a resumed run shards exactly the same rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from pipeline.config import InputConfig

FORMATS = ("parquet", "csv", "tsv", "jsonl")


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
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt == "jsonl":
            return pjson.read_json(path)
        delimiter = "\t" if fmt == "tsv" else ","
        table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
        if cfg.preset == "cc3m" and url_col not in table.column_names and table.num_columns == 2:
            # CC3M's published tsv has no header: caption<TAB>url
            table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(column_names=["caption", "url"]),
                                  parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
        return table
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {fmt} input {path}: {e}") from e


def normalise(cfg: InputConfig, dest: Path) -> dict:
    """Read every input file, check columns, write ``dest`` (parquet) atomically; return a summary."""
    url_col, cap_col = cfg.columns()
    tables = []
    for path, fmt in input_files(cfg):
        table = read_one(path, fmt, cfg)
        missing = [c for c in (url_col, cap_col) if c is not None and c not in table.column_names]
        if missing:
            raise InputError(f"input {path} has no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
                             f"set input.url_col / input.caption_col or input.preset")
        extras = [c for c in table.column_names if c not in (url_col, cap_col)]
        if cfg.extra_cols != "all":
            absent = [c for c in cfg.extra_cols if c not in table.column_names]
            if absent:
                raise InputError(f"input {path} has no column {absent[0]!r} named in input.extra_cols")
            extras = list(cfg.extra_cols)
        reserved = {"key", "status", "error_message", "width", "height", "original_width", "original_height",
                    "attempts", "error_reason", "sha256", "md5", "sha512", "url", "caption"}
        extras = [c for c in extras if c not in reserved]
        cols = {"url": table[url_col].cast(pa.string())}
        cols["caption"] = table[cap_col].cast(pa.string()) if cap_col else pa.nulls(table.num_rows, pa.string())
        for c in extras:
            cols[c] = table[c]
        tables.append(pa.table(cols))
    table = pa.concat_tables(tables, promote_options="permissive")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, dest)
    summary = {"rows": table.num_rows, "source": str(cfg.path), "columns": table.column_names}
    dest.with_name("input.json").write_text(json.dumps(summary, indent=2))
    return summary
