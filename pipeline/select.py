"""The select stage: rules over stored scores -> selection/NNNNN.parquet (key, keep, reason).

CPU only, no model: changing a rule reruns this in seconds. Top/bottom fractions are
turned into thresholds over the whole dataset first (DataComp), then every shard is
written with the same thresholds; each dropped row records the first rule it failed.

A selection is written whole: ``_summary.json`` is removed first and written last, with
the selection's fingerprint (:func:`selection_fingerprint`: the rules and digests of the
score records and ``_dedup.parquet`` it was computed from) and the digest of every shard
record it wrote. A killed select leaves no summary, so :func:`check_selection`, which
later stages call, refuses a half-rewritten selection instead of reading a mix of old and
new shards. Score shards that failed or were never scored are listed in the summary and
the funnel (``failed_shards``), and the command exits non-zero; the rest is selected.
"""

from __future__ import annotations

import hashlib
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
SUMMARY = "_summary.json"


def check_rules(cfg: RunConfig) -> None:
    """Fail before any work when a rule is malformed or names a score the config won't produce."""
    from pipeline.score import expected_schema

    parse(cfg.select.rules, expected_schema(cfg.score))


def _scores_schema(folder: Path, ids: list[int]) -> pa.Schema:
    if not ids:
        raise FileNotFoundError(f"no scored shards in {folder}; run `tapir score` first")
    schema = pq.read_schema(folder / f"{shards.shard_name(ids[0])}.parquet")
    dedup = folder / "_dedup.parquet"
    if dedup.exists():
        for f in pq.read_schema(dedup):
            if f.name != "key":
                schema = schema.append(f)
    return schema.remove_metadata()


def _count(reasons: list) -> dict:
    from collections import Counter

    return dict(Counter("score_error" if r.startswith("score_error") else r for r in reasons if r).most_common())


def _dedup_hash(folder: Path) -> str | None:
    path = folder / "_dedup.parquet"
    if not path.exists():
        return None
    return hashlib.sha256((pq.read_schema(path).metadata or {}).get(b"tapir.fingerprint", b"")).hexdigest()


def selection_fingerprint(cfg: RunConfig) -> dict:
    """The fingerprint a complete selection made with ``cfg``'s rules from the current
    ``scores/`` carries (in ``_summary.json``)."""
    from pipeline.score import scores_digest

    upstream = {"scores": scores_digest(cfg.scores_dir), "scores/_dedup": _dedup_hash(cfg.scores_dir)}
    return shards.fingerprint({"select.rules": list(cfg.select.rules)}, upstream)


def check_selection(cfg: RunConfig) -> dict:
    """The selection's summary when ``selection/`` is complete, self-consistent and made
    with ``cfg``'s rules from the current ``scores/``; otherwise :class:`shards.StageChanged`
    naming what to rerun. Recaption and build call it before they read ``selection/``.

    The summary's ``unscored_shards`` ({shard id: reason}) lists the raw shards that have
    no scores (failed or never scored), whose rows no selection covers."""
    folder = cfg.selection_dir
    path = folder / SUMMARY
    if not path.exists():
        raise shards.StageChanged(f"{folder} holds no complete selection (none was made, or `tapir select` was "
                                  f"interrupted); run `tapir select`")
    summary = json.loads(path.read_text())
    want = selection_fingerprint(cfg)
    have = summary.get("fingerprint")
    if not have or have.get("hash") != want["hash"]:
        raise shards.StageChanged(f"{folder} was selected differently: {shards.explain_change(have, want)}; "
                                  f"run `tapir select`")
    records = {shards.shard_name(sid): shards.record_digest(folder, sid) for sid in shards.done_shards(folder)}
    if records != summary.get("shards"):
        odd = sorted(set(records.items()) ^ set((summary.get("shards") or {}).items()))
        raise shards.StageChanged(f"{folder}: shard {odd[0][0]} does not belong to the selection its {SUMMARY} "
                                  f"describes; run `tapir select`")
    return summary


def _check_scores(cfg: RunConfig, ids: list[int], needs_dedup: bool) -> None:
    """Refuse scores made with other score settings than ``cfg``'s, or a stale ``_dedup.parquet``.
    (Whether a score shard still matches its raw shard is ``tapir score``'s check: select
    reads no raw shard.)"""
    from pipeline.score import dedup_staleness, shard_settings

    want = {"settings": shard_settings(cfg.score)}
    for sid in ids:
        have = shards.read_stats(cfg.scores_dir, sid).get("fingerprint")
        if not have or have.get("settings") != want["settings"]:
            raise shards.StageChanged(f"select: {cfg.scores_dir}/{shards.shard_name(sid)} was scored with other "
                                      f"settings: {shards.explain_change(have and {'settings': have['settings']}, want)}"
                                      f"; rerun `tapir score` (with --redo)")
    if needs_dedup and (reason := dedup_staleness(cfg)):
        raise shards.StageChanged(f"select: {cfg.scores_dir}/_dedup.parquet does not match the scores: {reason}; "
                                  f"rerun `tapir score`")


def _unscored(cfg: RunConfig, ids: list[int]) -> dict[str, str]:
    """{shard id: reason} of the raw shards that have no score shard (ids as strings, as every funnel has them)."""
    failed = shards.failed_shards(cfg.scores_dir)
    return {str(sid): failed.get(sid, "not scored; run `tapir score`")
            for sid in sorted(shards.done_shards(cfg.score_input) - set(ids))}


def select(cfg: RunConfig) -> dict:
    """Apply cfg.select.rules to scores/ and write selection/ whole; return its funnel
    (``failed_shards`` lists raw shards that have no scores)."""
    from pipeline.score import read_scores

    folder, out = cfg.scores_dir, cfg.selection_dir
    ids = sorted(shards.done_shards(folder))
    rules = parse(cfg.select.rules, _scores_schema(folder, ids))
    dups = any(r.kind == "dup" for r in rules)
    _check_scores(cfg, ids, dups)
    made_from = selection_fingerprint(cfg)
    needed = sorted({"key", "score_error"} | {c for r in rules for c in r.columns() if c not in
                                              ("duplicate_of", "duplicate_kind")})
    table = read_scores(folder, needed)
    shard_of = np.concatenate([np.full(pq.read_metadata(folder / f"{shards.shard_name(i)}.parquet").num_rows, i)
                               for i in ids])
    if dups:
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
    unscored = _unscored(cfg, ids)
    out.mkdir(parents=True, exist_ok=True)
    shards.clear_staging(out)
    (out / SUMMARY).unlink(missing_ok=True)  # from here until the new summary, the selection reads as incomplete
    shards.fsync_path(out)
    thresholds = {r.text: r.value for r in rules if r.kind == "top"}
    for sid in ids:
        rows = np.nonzero(shard_of == sid)[0]
        part = pa.table({"key": table["key"].take(pa.array(rows)), "keep": pa.array(keep[rows]),
                         "reason": pa.array([reason[i] for i in rows], pa.string())}, schema=SCHEMA)
        staging = shards.new_staging(out, sid)
        name = shards.shard_name(sid)
        shards.write_parquet(staging / f"{name}.parquet", part)
        # the record depends only on what this shard's rows were selected from, so a shard whose inputs and
        # thresholds did not change keeps its record byte for byte (and later stages need not redo it)
        upstream = {f"scores/{name}": shards.record_digest(folder, sid)}
        if dups:
            upstream["scores/_dedup"] = hashlib.sha256(json.dumps(
                table.select(["duplicate_of", "duplicate_kind"]).take(pa.array(rows)).to_pydict(),
                sort_keys=True).encode()).hexdigest()
        shards.commit(staging, out, sid, [f"{name}.parquet"], {"count": len(rows), "kept": int(keep[rows].sum())},
                      fingerprint=shards.fingerprint({"select.rules": list(cfg.select.rules),
                                                      "select.thresholds": thresholds}, upstream))
    for sid in shards.done_shards(out) - set(ids):  # a selection of a score shard that no longer exists
        shards.stats_path(out, sid).unlink()
        (out / f"{shards.shard_name(sid)}.parquet").unlink(missing_ok=True)
    summary = {
        "rules": [{"rule": r.text, **({"threshold": r.value} if r.kind == "top" else {})} for r in rules],
        "rows": len(keep), "kept": int(keep.sum()),
        "dropped_by": _count(reason),
        "unscored_shards": unscored,
        "fingerprint": made_from,
        "shards": {shards.shard_name(sid): shards.record_digest(out, sid) for sid in ids},
    }
    shards.atomic_write(out / SUMMARY, json.dumps(summary, indent=2, default=float))
    from pipeline.report import select_funnel

    funnel = select_funnel(Path(cfg.output))
    if unscored:
        log.error("%d raw shard(s) have no scores, their rows are in no selection: %s", len(unscored),
                  ", ".join(f"{k} ({v.splitlines()[0][:120]})" for k, v in list(unscored.items())[:5]))
        funnel["failed_shards"] = unscored
    return funnel
