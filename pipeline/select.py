"""The select stage: rules over stored scores -> selection/NNNNN.parquet (key, keep, reason).

CPU only, no model: changing a rule reruns this in seconds. Top/bottom fractions are
turned into thresholds over the whole dataset first (DataComp), then every shard is
written with the same thresholds; each dropped row records the first rule it failed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.rules import apply, parse, resolve_fractions
from pipeline import shards
from pipeline.config import RunConfig

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("key", pa.string()), ("keep", pa.bool_()), ("reason", pa.string())])


def check_rules(cfg: RunConfig) -> None:
    """Fail before any work when a rule is malformed or names a score the config won't produce."""
    from pipeline.score import expected_schema

    parse(cfg.select.rules, expected_schema(cfg.score))


def _scores_schema(folder: Path) -> pa.Schema:
    first = next(iter(sorted(folder.glob("0*.parquet"))), None)
    if first is None:
        raise FileNotFoundError(f"no scored shards in {folder}; run `tapir score` first")
    schema = pq.read_schema(first)
    dedup = folder / "_dedup.parquet"
    if dedup.exists():
        for f in pq.read_schema(dedup):
            if f.name != "key":
                schema = schema.append(f)
    return schema


def _count(reasons: list) -> dict:
    from collections import Counter

    return dict(Counter("score_error" if r.startswith("score_error") else r for r in reasons if r).most_common())


def select(cfg: RunConfig) -> dict:
    """Apply cfg.select.rules to scores/ and write selection/; return its funnel."""
    from pipeline.score import read_scores

    folder, out = cfg.scores_dir, cfg.selection_dir
    rules = parse(cfg.select.rules, _scores_schema(folder))
    needed = sorted({"key", "score_error"} | {c for r in rules for c in r.columns() if c not in
                                              ("duplicate_of", "duplicate_kind")})
    ids = sorted(shards.done_shards(folder))
    table = read_scores(folder, needed)
    shard_of = np.concatenate([np.full(pq.read_metadata(folder / f"{shards.shard_name(i)}.parquet").num_rows, i)
                               for i in ids])
    if (folder / "_dedup.parquet").exists():
        dedup = pq.read_table(folder / "_dedup.parquet")
        order = {k: i for i, k in enumerate(dedup["key"].to_pylist())}
        take = pa.array([order[k] for k in table["key"].to_pylist()])
        for col in ("duplicate_of", "duplicate_kind"):
            table = table.append_column(col, dedup[col].take(take))
    errors = table["score_error"].to_pylist()
    base = [f"score_error: {e}" if e else None for e in errors]
    valid = table.filter(pc.is_null(table["score_error"]))
    rules = resolve_fractions(rules, valid)
    keep, reason = apply(rules, table, base)
    out.mkdir(parents=True, exist_ok=True)
    shards.clear_staging(out)
    for sid in ids:
        rows = np.nonzero(shard_of == sid)[0]
        part = pa.table({"key": table["key"].take(pa.array(rows)), "keep": pa.array(keep[rows]),
                         "reason": pa.array([reason[i] for i in rows], pa.string())}, schema=SCHEMA)
        staging = shards.new_staging(out, sid)
        name = shards.shard_name(sid)
        shards.write_parquet(staging / f"{name}.parquet", part)
        shards.commit(staging, out, sid, [f"{name}.parquet"], {"count": len(rows), "kept": int(keep[rows].sum())})
    summary = {
        "rules": [{"rule": r.text, **({"threshold": r.value} if r.kind == "top" else {})} for r in rules],
        "rows": len(keep), "kept": int(keep.sum()),
        "dropped_by": _count(reason),
    }
    (out / "_summary.json").write_text(json.dumps(summary, indent=2, default=float))
    from pipeline.report import select_funnel

    return select_funnel(Path(cfg.output))
