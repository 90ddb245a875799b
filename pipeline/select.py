"""The select stage: rules over stored scores -> selection/NNNNN.parquet (key, keep, reason).

CPU only, no model: changing a rule reruns this in seconds. Every step is per shard, as Ray
tasks; the driver holds no row. A rule may name a score column, a duplicate column (``not
duplicate``) or any column of the input's metadata in ``raw/NNNNN.parquet`` (LAION's
``punsafe``, ``pwatermark``, ``similarity``): a shard task reads only the columns its rules
name and joins them on the key. Top/bottom fractions are first turned into exact thresholds
over the whole dataset from mergeable per-shard summaries (:func:`filters.rules.resolve_fractions`:
a radix select, a few rounds of one task per shard), then one task per shard applies the
rules in order and commits ``NNNNN.parquet`` with its record (``rows``, ``kept``,
``kept_digest``, ``dropped_by``); each dropped row records the first rule it failed.

A selection is written whole: ``_summary.json`` is removed first and written last, summed from
the shard records, with the selection's fingerprint (:func:`selection_fingerprint`: the rules
and digests of the score records and duplicate groups it was computed from) and the digest of
every shard record. A killed select leaves no summary, so :func:`check_selection`, which later
stages call, refuses a half-rewritten selection instead of reading a mix of old and new shards.
Score shards that failed or were never scored are listed in the summary and the funnel
(``failed_shards``), and the command exits non-zero; the rest is selected.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from filters.rules import Rule, apply, order_keys, parse, resolve_fractions, summarize
from pipeline import dedup, shards, storage
from pipeline.config import RunConfig
from pipeline.schemas import RAW, SELECTION as SCHEMA, SELECTION_SUMMARY as SUMMARY, kept_digest

log = logging.getLogger(__name__)

DUPLICATE_COLUMNS = ("duplicate_of", "duplicate_kind")

__all__ = ["SCHEMA", "SUMMARY", "check_rules", "check_selection", "select", "selection_fingerprint"]


# -- the columns rules may name -------------------------------------------------------------


def metadata_schema(cfg: RunConfig) -> pa.Schema:
    """The input metadata columns rules may name: those of a downloaded ``raw/NNNNN.parquet``;
    before any download, img2dataset's columns and the input's own (read from its header)."""
    ids = shards.done_shards(cfg.score_input)
    if ids:
        return storage.read_schema(shards.shard_file(cfg.score_input, min(ids), ".parquet")).remove_metadata()
    from pipeline import inputs

    extra = pa.schema([])
    try:  # the columns a download will carry
        extra = inputs.metadata_schema(cfg)
    except (inputs.InputError, OSError) as err:  # an unreadable input is download's error to report
        log.debug("input columns unknown before download: %s", err)
    return pa.schema(list(RAW) + [f for f in extra if f.name not in RAW.names])


def _with_metadata(scores: pa.Schema, meta: pa.Schema) -> pa.Schema:
    """Score columns first (a name in both is the score), then the metadata's other columns."""
    return pa.schema(list(scores) + [f for f in meta if f.name not in scores.names])


def check_rules(cfg: RunConfig) -> None:
    """Fail before any work when a rule is malformed or names a column neither the config's
    scorers nor the input's metadata will have."""
    from pipeline.schemas import scores_schema

    parse(cfg.select.rules, _with_metadata(scores_schema(cfg.score.outputs), metadata_schema(cfg)))


def _scores_schema(cfg: RunConfig, ids: list[int]) -> pa.Schema:
    if not ids:
        raise FileNotFoundError(f"no scored shards in {cfg.scores_dir}; run `tapir score` first")
    schema = storage.read_schema(shards.shard_file(cfg.scores_dir, ids[0], ".parquet")).remove_metadata()
    for name in DUPLICATE_COLUMNS:
        if name not in schema.names:
            schema = schema.append(pa.field(name, pa.string()))
    return _with_metadata(schema, metadata_schema(cfg))


# -- one shard: its rows with the columns the rules name -------------------------------------


def _join(table: pa.Table, other: pa.Table, columns: list[str]) -> pa.Table:
    """``table`` with ``columns`` of ``other`` appended, matched on key (null where absent)."""
    index = pc.index_in(table["key"], other["key"])
    for name in columns:
        table = table.append_column(name, other[name].take(index))
    return table


def _shard_rows(cfg: RunConfig, sid: int, columns: set[str]) -> pa.Table:
    """The shard's scored rows (key, score_error and ``columns``), in score order: score columns
    from ``scores/``, duplicate columns from the duplicate groups, the others from ``raw/``."""
    path = shards.shard_file(cfg.scores_dir, sid, ".parquet")
    names = set(storage.read_schema(path).names)
    table = storage.read_parquet(path, columns=["key", "score_error", *sorted(columns & names - {"key"})])
    if wanted := [c for c in DUPLICATE_COLUMNS if c in columns and c not in names]:
        table = _join(table, dedup.read(cfg, sid), wanted)
    if meta := sorted(columns - set(table.column_names)):
        path = shards.shard_file(cfg.score_input, sid, ".parquet")
        have = [c for c in meta if c in storage.read_schema(path).names]  # inputs mixed in one run may differ
        table = _join(table, storage.read_parquet(path, columns=["key", *have]), have)
        for name in sorted(set(meta) - set(have)):  # a column this shard's input lacks: missing, so every rule fails
            table = table.append_column(name, pa.nulls(table.num_rows))
    return table


def _summaries(config: dict, queries: dict, sid: int) -> dict:
    """Task: this shard's part of one round of the threshold search (see filters.rules)."""
    cfg = RunConfig.model_validate(config)
    table = _shard_rows(cfg, sid, {q.column for q in queries.values()})
    table = table.filter(pc.is_null(table["score_error"]))  # a fraction is of the scored rows
    return {i: summarize(order_keys(table[q.column]), q) for i, q in queries.items()}


def _select_shard(config: dict, rules: list[Rule], settings: dict, sid: int) -> dict:
    """Task: apply the rules to one shard and commit selection/NNNNN.parquet and its record."""
    cfg = RunConfig.model_validate(config)
    out = cfg.selection_dir
    columns = {c for r in rules for c in r.columns()}
    table = _shard_rows(cfg, sid, columns)
    base = [f"score_error: {e}" if e else None for e in table["score_error"].to_pylist()]
    keep, reason = apply(rules, table, base)
    keys = table["key"]
    part = pa.table({"key": keys, "keep": pa.array(keep), "reason": pa.array(reason, pa.string())}, schema=SCHEMA)
    name = shards.shard_name(sid)
    staging = shards.new_staging(out, sid)
    shards.write_parquet(staging / f"{name}.parquet", part)
    # the record depends only on what this shard's rows were selected from, so a shard whose inputs and
    # thresholds did not change keeps its record byte for byte (and later stages need not redo it)
    upstream = {f"scores/{name}": shards.record_digest(cfg.scores_dir, sid)}
    if any(c in DUPLICATE_COLUMNS for c in columns):
        upstream["scores/_dedup"] = hashlib.sha256(json.dumps(
            table.select(list(DUPLICATE_COLUMNS)).to_pydict(), sort_keys=True).encode()).hexdigest()
    scores = set(storage.read_schema(shards.shard_file(cfg.scores_dir, sid, ".parquet")).names)
    if columns - scores - set(DUPLICATE_COLUMNS):  # rules read the input's metadata too
        upstream[f"raw/{name}"] = shards.record_digest(cfg.score_input, sid)
    kept = pc.filter(keys, pa.array(keep)).to_pylist()
    stats = {"count": len(keep), "rows": len(keep), "kept": len(kept), "kept_digest": kept_digest(kept),
             "dropped_by": _count(reason)}
    shards.commit(staging, out, sid, [f"{name}.parquet"], stats, fingerprint=shards.fingerprint(settings, upstream))
    return stats


def _count(reasons: list) -> dict:
    return dict(Counter("score_error" if r.startswith("score_error") else r for r in reasons if r).most_common())


# -- the whole selection --------------------------------------------------------------------


def selection_fingerprint(cfg: RunConfig) -> dict:
    """The fingerprint a complete selection made with ``cfg``'s rules from the current
    ``scores/`` carries (in ``_summary.json``)."""
    from pipeline.score import scores_digest

    groups = dedup.summary(cfg)  # the duplicate groups' record: its fingerprint names what they were made from
    upstream = {"scores": scores_digest(cfg.scores_dir),
                "scores/_dedup": groups["fingerprint"]["hash"] if groups else None}
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
    """Refuse scores made with other score settings than ``cfg``'s, or stale duplicate groups.
    (Whether a score shard still matches its raw shard is ``tapir score``'s check.)"""
    from pipeline.score import shard_settings

    want = {"settings": shard_settings(cfg.score)}
    for sid in ids:
        have = shards.read_stats(cfg.scores_dir, sid).get("fingerprint")
        if not have or have.get("settings") != want["settings"]:
            raise shards.StageChanged(f"select: {cfg.scores_dir}/{shards.shard_name(sid)} was scored with other "
                                      f"settings: {shards.explain_change(have and {'settings': have['settings']}, want)}"
                                      f"; rerun `tapir score` (with --redo)")
    if needs_dedup and (reason := dedup.staleness(cfg)):
        raise shards.StageChanged(f"select: the duplicate groups in {cfg.scores_dir} (_dedup) do not match the "
                                  f"scores: {reason}; rerun `tapir score`")


def _unscored(cfg: RunConfig, ids: list[int]) -> dict[str, str]:
    """{shard id: reason} of the raw shards that have no score shard (ids as strings, as every funnel has them)."""
    failed = shards.failed_shards(cfg.scores_dir)
    return {str(sid): failed.get(sid, "not scored; run `tapir score`")
            for sid in sorted(shards.done_shards(cfg.score_input) - set(ids))}


def _tasks(fn, ids: list[int], desc: str, metrics=None):
    """Run ``fn(shard id)`` as one Ray task per shard; yield (id, result); a failed shard raises."""
    from pipeline import ray_backend

    for sid, result, _ in ray_backend.run_tasks(fn, ids, desc=desc, metrics=metrics):
        if isinstance(result, Exception):
            raise RuntimeError(f"select: shard {shards.shard_name(sid)} failed: {type(result).__name__}: "
                               f"{result}") from result
        yield sid, result


def select(cfg: RunConfig) -> dict:
    """Apply cfg.select.rules to scores/ and write selection/ whole; return its funnel
    (``failed_shards`` lists raw shards that have no scores)."""
    from pipeline import ray_backend
    from pipeline.report import select_funnel

    folder, out = cfg.scores_dir, cfg.selection_dir
    ids = sorted(shards.done_shards(folder))
    rules = parse(cfg.select.rules, _scores_schema(cfg, ids))
    _check_scores(cfg, ids, any(r.kind == "dup" for r in rules))
    made_from = selection_fingerprint(cfg)
    config = cfg.model_dump(mode="json")
    ray_backend.quiet_env()
    ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)

    def run_round(queries: dict):
        for _, part in _tasks(functools.partial(_summaries, config, queries), ids, "select: thresholds"):
            yield part

    rules = resolve_fractions(rules, run_round)
    thresholds = {r.text: r.value for r in rules if r.kind == "top"}
    unscored = _unscored(cfg, ids)
    out.mkdir(parents=True, exist_ok=True)
    shards.clear_staging(out)
    (out / SUMMARY).unlink(missing_ok=True)  # from here until the new summary, the selection reads as incomplete
    shards.fsync_path(out)
    settings = {"select.rules": list(cfg.select.rules), "select.thresholds": thresholds}
    rows, kept, dropped = 0, 0, Counter()
    metrics = ray_backend.StageMetrics(out, "select", summarize=lambda s: {"rows": s["rows"], "ok": s["rows"]})
    for _, stats in _tasks(functools.partial(_select_shard, config, rules, settings), ids, "select", metrics):
        rows, kept = rows + stats["rows"], kept + stats["kept"]
        dropped.update(stats["dropped_by"])
    for sid in shards.done_shards(out) - set(ids):  # a selection of a score shard that no longer exists
        shards.stats_path(out, sid).unlink()
        shards.shard_file(out, sid, ".parquet").unlink(missing_ok=True)
    summary = {
        "rules": [{"rule": r.text, **({"threshold": r.value} if r.kind == "top" else {})} for r in rules],
        "rows": rows, "kept": kept,
        "dropped_by": dict(dropped.most_common()),
        "unscored_shards": unscored,
        "fingerprint": made_from,
        "shards": {shards.shard_name(sid): shards.record_digest(out, sid) for sid in ids},
    }
    shards.atomic_write(out / SUMMARY, json.dumps(summary, indent=2, default=float))
    funnel = select_funnel(cfg.output)
    if unscored:
        log.error("%d raw shard(s) have no scores, their rows are in no selection: %s", len(unscored),
                  ", ".join(f"{k} ({v.splitlines()[0][:120]})" for k, v in list(unscored.items())[:5]))
        funnel["failed_shards"] = unscored
    return funnel
