"""`tapir report`: the funnel of a run folder, as text and JSON.

Every input row appears in raw/ metadata exactly once; the funnel counts rows in, rows
out, successes, and failures by reason, and checks the lineage (no row lost, none twice).

Funnels add up the stages' per-shard completion records (small JSON files), never the rows;
the lineage check runs one task per source shard (its keys, stage by stage), the driver adding
up small per-shard results; the visuals draw on a sample of shards (``sample_shards``).
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards, storage
from pipeline.schemas import SELECTION_SUMMARY

SAMPLE_SHARDS = 8  # shards the report's visuals draw on


def _records(folder, ids) -> list[dict]:
    """The completion records of ``ids`` in ``folder``, read a few at a time."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda i: shards.read_stats(folder, i), ids))


def _map(fn, items: list, desc: str, local_below: int = 16):
    """``fn`` over ``items`` as Ray tasks, yielding (item, result); in this process, by the same
    function, when there are few items and this process has not joined Ray."""
    from pipeline import ray_backend

    if len(items) < local_below and not ray_backend.is_initialized():
        for item in items:
            yield item, fn(item)
        return
    from pipeline import ray_backend

    ray_backend.init()
    for item, result, _ in ray_backend.run_tasks(fn, items, desc=desc, num_cpus=1):
        if isinstance(result, Exception):
            raise result
        yield item, result


def _raw_counts(item: tuple) -> dict:
    """Reasons, attempts per row and retried successes of one raw shard, from its metadata (for
    records that do not count them)."""
    folder, sid = item
    path = shards.shard_file(folder, sid, ".parquet")
    names = storage.read_schema(path).names
    t = storage.read_parquet(path, columns=[c for c in ("status", "error_reason", "attempts") if c in names])
    attempts = t["attempts"] if "attempts" in names else pa.array([1] * t.num_rows, pa.int64())
    reasons = t["error_reason"] if "error_reason" in names else t["status"]
    return {"reasons": dict(Counter(reasons.to_pylist())),
            "attempts": {str(k): v for k, v in Counter(attempts.to_pylist()).items()},
            "retried_and_succeeded": int(pc.sum(pc.and_(pc.equal(t["status"], "success"),
                                                        pc.greater(attempts, 1))).as_py() or 0)}


def download_funnel(run_dir) -> dict:
    """The download stage's funnel from raw/'s completion records (attempts from a shard's
    metadata when its record has none)."""
    raw = storage.path(run_dir) / "raw"
    info_path = raw / "_input" / "input.json"
    rows_in = json.loads(info_path.read_text())["rows"] if info_path.exists() else None
    ids = sorted(shards.done_shards(raw))
    stats = _records(raw, ids)
    reasons, attempts, retried, rows = Counter(), Counter(), 0, 0
    missing = [sid for sid, s in zip(ids, stats) if "attempts" not in s or "reasons" not in s]
    extra = {sid: found for (_, sid), found in _map(_raw_counts, [(storage.url(raw), sid) for sid in missing],
                                                    "report download")}
    for sid, s in zip(ids, stats):
        s = {**extra.get(sid, {}), **s}
        rows += s["count"]
        reasons.update(s["reasons"])
        attempts.update({str(k): v for k, v in s["attempts"].items()})
        retried += s.get("retried_and_succeeded", 0)
    succeeded = reasons.pop("success", 0)
    return {
        "stage": "download",
        "rows_in": rows_in,
        "rows_out": rows,
        "succeeded": succeeded,
        "failed": sum(reasons.values()),
        "failed_by_reason": dict(reasons.most_common()),
        "attempts": dict(sorted(attempts.items(), key=lambda kv: int(kv[0]))),
        "retried_and_succeeded": retried,
        "shards": len(ids),
        "lineage_ok": rows_in == rows,
        **({"failed_shards": {str(k): v[:500] for k, v in sorted(failed.items())}}
           if (failed := shards.failed_shards(raw)) else {}),
    }


def format_funnel(f: dict) -> str:
    lines = [f"download: {f['rows_in']} rows in -> {f['rows_out']} rows recorded in {f['shards']} shards"]
    pct = 100 * f["succeeded"] / max(1, f["rows_out"])
    lines.append(f"  succeeded  {f['succeeded']:>8}  ({pct:.1f}%, {f['retried_and_succeeded']} after a retry)")
    lines.append(f"  failed     {f['failed']:>8}")
    for reason, n in f["failed_by_reason"].items():
        lines.append(f"    {reason:<22}{n:>8}")
    if not f["lineage_ok"]:
        lines.append(f"  LINEAGE BROKEN: {f['rows_in']} rows in, {f['rows_out']} out")
    if f.get("ray_nodes_used"):
        lines.append(f"  ran on {f['ray_nodes_used']} Ray node(s)")
    for sid, err in f.get("failed_shards", {}).items():
        lines.append(f"  shard {sid} FAILED (rerun to retry): {err.splitlines()[0]}")
    return "\n".join(lines)


def score_funnel(run_dir, scores=None) -> dict:
    scores = storage.path(scores or storage.path(run_dir) / "scores")
    ids = sorted(shards.done_shards(scores))
    stats = _records(scores, ids)
    reasons = Counter()
    for s in stats:
        reasons.update(s.get("error_reasons", {}))
    summary = scores / "_dedup" / "_summary.json"  # pipeline.dedup's record: counts by kind
    dedup = json.loads(summary.read_text()).get("duplicates", {}) if summary.exists() else {}
    out = {"stage": "score", "rows_in": sum(s["count"] for s in stats), "scored": sum(s["scored"] for s in stats),
           "failed": sum(s["errors"] for s in stats), "failed_by_reason": dict(reasons.most_common()),
           "duplicates_by_kind": dedup, "shards": len(ids)}
    failed = shards.failed_shards(scores)  # recorded on disk by this run or an earlier one
    if failed:
        out["failed_shards"] = {str(k): v[:500] for k, v in sorted(failed.items())}
    return out


def select_funnel(run_dir) -> dict:
    path = storage.path(run_dir) / "selection" / SELECTION_SUMMARY
    summary = json.loads(path.read_text())
    out = {"stage": "select", "rows_in": summary["rows"], "kept": summary["kept"],
           "dropped": summary["rows"] - summary["kept"], "dropped_by_rule": summary["dropped_by"],
           "rules": summary["rules"]}
    if summary.get("unscored_shards"):  # raw shards with no scores: the selection has a hole
        out["failed_shards"] = {f"score/{k}": v for k, v in summary["unscored_shards"].items()}
    return out


def _caption_reasons(item: tuple) -> dict:
    """Failure reasons of one captions shard (for records that do not count them)."""
    folder, sid = item
    reasons = Counter()
    for r in storage.read_parquet(shards.shard_file(folder, sid, ".parquet"), columns=["reason"])["reason"] \
            .drop_null().to_pylist():
        for part in r.split("; "):
            reasons[part.split(" after ")[0]] += 1
    return dict(reasons)


def recaption_funnel(run_dir) -> dict:
    folder = storage.path(run_dir) / "captions"
    ids = sorted(shards.done_shards(folder))
    if not ids:
        raise FileNotFoundError(f"no captions in {storage.url(folder)}")
    stats = _records(folder, ids)
    reasons = Counter()
    for s in stats:
        reasons.update(s.get("reasons", {}))
    missing = [(storage.url(folder), sid) for sid, s in zip(ids, stats) if "reasons" not in s]
    for _, found in _map(_caption_reasons, missing, "report captions"):
        reasons.update(found)
    rows = sum(s["count"] for s in stats)
    ok, partial = sum(s.get("ok", 0) for s in stats), sum(s.get("partial", 0) for s in stats)
    return {"stage": "recaption", "rows_in": rows, "captioned": ok, "partial": partial,  # partial: one kind good
            "failed": rows - ok - partial, "failed_by_reason": dict(reasons.most_common()), "shards": len(ids)}


def build_funnel(run_dir, folder=None) -> dict:
    """The build stage's funnel of RUN/shards (or of another shards ``folder``)."""
    folder = storage.path(folder) if folder else storage.path(run_dir) / "shards"
    ids = sorted(shards.done_shards(folder))
    plan = folder / "_plan.json"
    if not plan.exists():
        raise FileNotFoundError(f"no build in {storage.url(folder)}")
    planned = json.loads(plan.read_text())
    stats = _records(folder, ids)
    reasons = Counter(r.split(":")[0] for s in stats for r in s["failed"].values())
    buckets = Counter()
    captions = {"txt": Counter(), "fallback": Counter()}  # which caption each sample's txt is, and why not
    for s in stats:
        buckets.update(s["buckets"])
        for part, counts in s.get("captions", {}).items():
            captions.setdefault(part, Counter()).update(counts)
    return {"stage": "build", "rows_in": planned["samples"], "written": sum(s["count"] for s in stats),
            "failed": sum(reasons.values()), "failed_by_reason": dict(reasons.most_common()),
            "shards": len(ids), "planned_shards": planned["shards"], "bytes": sum(s["bytes"] for s in stats),
            "buckets": dict(sorted(buckets.items())),
            "captions": {k: dict(v.most_common()) for k, v in captions.items()}}


def _failed_lines(f: dict) -> str:
    return "".join(f"\n  shard {sid} FAILED (rerun to retry): {str(err).splitlines()[0][:300] if err else ''}"
                   for sid, err in f.get("failed_shards", {}).items())


def format_stage(f: dict) -> str:
    if "stage" not in f:
        return format_lineage(f)
    if f["stage"] == "download":
        return format_funnel(f)
    if f["stage"] == "recaption":
        lines = [f"recaption: {f['rows_in']} kept rows in -> {f['captioned']} captioned, "
                 f"{f.get('partial', 0)} partial (one kind only), {f['failed']} failed"]
        lines += [f"    {r:<30}{n:>8}" for r, n in f["failed_by_reason"].items()]
        return "\n".join(lines) + _failed_lines(f)
    if f["stage"] == "build":
        lines = [f"build: {f['rows_in']} rows planned -> {f['written']} samples in {f['shards']} of "
                 f"{f['planned_shards']} shards ({f['bytes'] / 1e6:.1f} MB), {f['failed']} failed"]
        lines += [f"    {r:<30}{n:>8}" for r, n in f["failed_by_reason"].items()]
        if len(f["buckets"]) > 1:
            lines.append("  buckets: " + ", ".join(f"{b} {n}" for b, n in f["buckets"].items()))
        used = f.get("captions", {})
        if used.get("txt"):
            lines.append("  txt caption: " + ", ".join(f"{k} {n}" for k, n in used["txt"].items())
                         + ("; fell back: " + ", ".join(f"{r} {n}" for r, n in used["fallback"].items())
                            if used.get("fallback") else ""))
        return "\n".join(lines) + _failed_lines(f)
    if f["stage"] == "score":
        lines = [f"score: {f['rows_in']} images in -> {f['scored']} scored, {f['failed']} failed"]
        lines += [f"    {r:<22}{n:>8}" for r, n in f["failed_by_reason"].items()]
        lines += [f"  duplicates ({kind})".ljust(24) + f"{n:>8}" for kind, n in f["duplicates_by_kind"].items()]
        return "\n".join(lines) + _failed_lines(f)
    lines = [f"select: {f['rows_in']} rows in -> {f['kept']} kept, {f['dropped']} dropped"]
    thresholds = {r["rule"]: r["threshold"] for r in f["rules"] if "threshold" in r}
    for rule, n in f["dropped_by_rule"].items():
        note = f"  (threshold {thresholds[rule]:.4g})" if rule in thresholds else ""
        lines.append(f"    {rule:<30}{n:>8}{note}")
    return "\n".join(lines) + _failed_lines(f)


def _keys(folder, sid: int, where=None) -> list[str]:
    path = shards.shard_file(folder, sid, ".parquet")
    t = storage.read_parquet(path, columns=["key"] + ([where[0]] if where else []))
    if where:
        t = t.filter(pc.equal(t[where[0]], where[1]))
    return t["key"].to_pylist()


STAGES = [("score", "scores", "raw", ("status", "success"), "scored"),
          ("select", "selection", "scores", None, "selected"),
          ("recaption", "captions", "selection", ("keep", True), "captioned")]


def _lineage_shard(item: tuple) -> dict:
    """One source shard's lineage (a task): each stage that made it holds exactly the rows the
    stage before handed it. Memory: one shard's keys."""
    run, sid, made = item
    run = storage.path(run)
    raw = _keys(run / "raw", sid)
    counts, problems = {"raw": len(raw)}, []
    twice = len(raw) - len(set(raw))
    for stage, folder, up, where, label in STAGES:
        if not made.get(folder):
            continue
        want, have = _keys(run / up, sid, where), _keys(run / folder, sid)
        counts[label] = len(have)
        if sorted(want) != sorted(have):
            lost, extra = set(want) - set(have), set(have) - set(want)
            problems.append(f"{stage}: shard {shards.shard_name(sid)} has {len(lost)} row(s) of the stage before "
                            f"missing" + (f" (e.g. {min(lost)})" if lost else "") +
                            (f" and {len(extra)} unknown row(s) (e.g. {min(extra)})" if extra else ""))
        if stage == "select":
            counts["kept"] = len(_keys(run / folder, sid, ("keep", True)))
    return {"counts": counts, "problems": problems, "twice": twice}


def _build_lineage(out, sel, kept: int | None, counts: dict, problems: list, missing) -> None:
    """The build's part: the plan takes each selection shard's kept rows (their records), and
    each output shard wrote or recorded as failed every row planned into it."""
    from pipeline.buildplan import Plan

    plan = Plan.load(out)
    counts["planned"] = plan.samples
    if kept is not None and plan.samples != kept:
        problems.append(f"build: the plan holds {plan.samples} rows, the selection keeps {kept}; rerun `tapir build`")
    ids = sorted(shards.done_shards(sel))
    records = dict(zip(ids, _records(sel, ids)))
    for source, n in plan.sources:
        if records.get(source, {}).get("kept") != n:
            problems.append(f"build: the plan takes {n} rows of selection shard {shards.shard_name(source)}, "
                            f"which keeps {records.get(source, {}).get('kept')}; rerun `tapir build`")
    built = sorted(shards.done_shards(out))
    stats = dict(zip(built, _records(out, built)))
    written = 0
    for sid in range(plan.shards):
        if sid not in stats:
            problems.append(missing(out, sid, "build"))
            continue
        st = stats[sid]
        written += st["count"]
        if st["count"] + len(st.get("failed", {})) != plan.count(sid):
            problems.append(f"build: shard {shards.shard_name(sid)} planned {plan.count(sid)} rows, wrote "
                            f"{st['count']} and recorded {len(st.get('failed', {}))} failed")
    counts["written"] = written


def lineage(run_dir) -> dict:
    """Follow every row from the input list to the training samples, stage by stage.

    Each stage must account for exactly the rows the stage before handed it, shard by
    shard: input rows = raw rows; downloaded rows = scored rows; scored = selected-or-
    dropped; kept = captioned (or recorded failed); kept = planned for the build, and
    planned = written + recorded build failures. A shard a stage has not made (failed,
    or not run yet) is listed with its recorded failure reason. One task per raw shard reads
    its keys; the driver adds up counts. Returns the counts and the problems found (``ok``
    when there are none)."""
    run = storage.path(run_dir)
    raw, sel, out = run / "raw", run / "selection", run / "shards"
    problems: list[str] = []
    counts: dict[str, int] = {}

    def missing(folder, sid: int, stage: str) -> str:
        reason = shards.failed_shards(folder).get(sid)
        return f"{stage}: shard {shards.shard_name(sid)} " + (f"FAILED: {reason.splitlines()[0][:200]}" if reason
                                                                else "not made (rerun the stage)")

    f = download_funnel(run) if shards.done_shards(raw) else None
    if f is None:
        return {"ok": False, "counts": {}, "problems": ["download: no raw shards"]}
    counts["input"], counts["raw"], counts["downloaded"] = f["rows_in"], f["rows_out"], f["succeeded"]
    problems += [missing(raw, sid, "download") for sid in sorted(shards.failed_shards(raw))]
    made = {folder: shards.done_shards(run / folder) for _, folder, *_ in STAGES}  # listed once per folder
    chain = {"raw": shards.done_shards(raw), **made}
    items = []
    for sid in sorted(chain["raw"]):
        have = {}
        for stage, folder, up, _, _ in STAGES:
            if not made[folder] or sid not in chain[up]:
                continue
            if sid not in made[folder]:
                problems.append(missing(run / folder, sid, stage))
            else:
                have[folder] = True
        items.append((storage.url(run), sid, have))
    twice = 0
    for _, result in sorted(_map(_lineage_shard, items, "lineage"), key=lambda r: r[0][1]):
        twice += result["twice"]
        problems += result["problems"]
        for k, v in result["counts"].items():
            if k != "raw":
                counts[k] = counts.get(k, 0) + v
    if not f["lineage_ok"] or twice:
        problems.insert(0, f"download: {f['rows_in']} input rows, {f['rows_out']} recorded, {twice} keys twice")
    if (out / "_plan.json").exists():
        _build_lineage(out, sel, counts.get("kept"), counts, problems, missing)
    return {"ok": not problems, "counts": counts, "problems": problems}


def format_lineage(lin: dict) -> str:
    order = ("input", "raw", "downloaded", "scored", "selected", "kept", "captioned", "planned", "written")
    chain = " -> ".join(f"{k} {lin['counts'][k]}" for k in order if k in lin["counts"])
    head = f"lineage: {'ok' if lin['ok'] else 'BROKEN'}: {chain}"
    return "\n".join([head] + [f"  {p}" for p in lin["problems"][:20]] +
                     ([f"  ... and {len(lin['problems']) - 20} more"] if len(lin["problems"]) > 20 else []))


def report(run_dir, visuals: bool = True, sample_shards: int = SAMPLE_SHARDS) -> tuple[dict, object]:
    """Compute the funnel of every stage ``run_dir`` holds, write report/funnel.json (and,
    once scores or captions exist, plots, sample grids and report/index.html, drawn from
    ``sample_shards`` shards spread over the run); return the funnel and the JSON's path."""
    run = storage.path(run_dir)
    funnel = {"download": download_funnel(run)}
    if shards.done_shards(run / "scores"):
        funnel["score"] = score_funnel(run)
    if (run / "selection" / SELECTION_SUMMARY).exists():
        funnel["select"] = select_funnel(run)
    if shards.done_shards(run / "captions"):
        funnel["recaption"] = recaption_funnel(run)
    if (run / "shards" / "_plan.json").exists():
        funnel["build"] = build_funnel(run)
    funnel["lineage"] = lineage(run)
    out = run / "report"
    if not storage.is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    path = out / "funnel.json"
    shards.atomic_write(path, json.dumps(funnel, indent=2))
    if visuals and ("score" in funnel or "recaption" in funnel):
        from pipeline.visual import write_visuals

        write_visuals(run, funnel, out, sample_shards)
    return funnel, path
