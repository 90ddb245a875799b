"""`tapir report`: the funnel of a run folder, as text and JSON.

Every input row appears in raw/ metadata exactly once; the funnel counts rows in, rows
out, successes, and failures by reason, and checks the lineage (no row lost, none twice).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards


def download_funnel(run_dir: Path) -> dict:
    raw = Path(run_dir) / "raw"
    info_path = raw / "_input" / "input.json"
    rows_in = json.loads(info_path.read_text())["rows"] if info_path.exists() else None
    meta = shards.read_metadata(raw)
    keys = meta["key"].to_pylist()
    reasons = Counter(meta["error_reason"].to_pylist())
    attempts = Counter(meta["attempts"].to_pylist())
    succeeded = reasons.pop("success", 0)
    duplicated = len(keys) - len(set(keys))
    return {
        "stage": "download",
        "rows_in": rows_in,
        "rows_out": len(keys),
        "succeeded": succeeded,
        "failed": sum(reasons.values()),
        "failed_by_reason": dict(reasons.most_common()),
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "retried_and_succeeded": int(pc.sum(pc.and_(pc.equal(meta["status"], "success"),
                                                    pc.greater(meta["attempts"], 1))).as_py() or 0),
        "shards": len(shards.done_shards(raw)),
        "lineage_ok": rows_in == len(keys) and duplicated == 0,
        "duplicated_keys": duplicated,
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
        lines.append(f"  LINEAGE BROKEN: {f['rows_in']} rows in, {f['rows_out']} out, {f['duplicated_keys']} duplicated keys")
    if f.get("ray_nodes_used"):
        lines.append(f"  ran on {f['ray_nodes_used']} Ray node(s)")
    for sid, err in f.get("failed_shards", {}).items():
        lines.append(f"  shard {sid} FAILED (rerun to retry): {err.splitlines()[0]}")
    return "\n".join(lines)


def score_funnel(run_dir: Path, scores: Path | None = None) -> dict:
    scores = Path(scores or Path(run_dir) / "scores")
    ids = shards.done_shards(scores)
    stats = [shards.read_stats(scores, i) for i in ids]
    reasons = Counter()
    for s in stats:
        reasons.update(s.get("error_reasons", {}))
    dedup = {}
    if (scores / "_dedup.parquet").exists():
        import pyarrow.parquet as pq

        kinds = pq.read_table(scores / "_dedup.parquet", columns=["duplicate_kind"])["duplicate_kind"]
        dedup = {k: v for k, v in Counter(kinds.drop_null().to_pylist()).most_common()}
    out = {"stage": "score", "rows_in": sum(s["count"] for s in stats), "scored": sum(s["scored"] for s in stats),
           "failed": sum(s["errors"] for s in stats), "failed_by_reason": dict(reasons.most_common()),
           "duplicates_by_kind": dedup, "shards": len(ids)}
    failed = shards.failed_shards(scores)  # recorded on disk by this run or an earlier one
    if failed:
        out["failed_shards"] = {str(k): v[:500] for k, v in sorted(failed.items())}
    return out


def select_funnel(run_dir: Path) -> dict:
    path = Path(run_dir) / "selection" / "_summary.json"
    summary = json.loads(path.read_text())
    out = {"stage": "select", "rows_in": summary["rows"], "kept": summary["kept"],
           "dropped": summary["rows"] - summary["kept"], "dropped_by_rule": summary["dropped_by"],
           "rules": summary["rules"]}
    if summary.get("unscored_shards"):  # raw shards with no scores: the selection has a hole
        out["failed_shards"] = {f"score/{k}": v for k, v in summary["unscored_shards"].items()}
    return out


def recaption_funnel(run_dir: Path) -> dict:
    import pyarrow.parquet as pq

    folder = Path(run_dir) / "captions"
    ids = sorted(shards.done_shards(folder))
    if not ids:
        raise FileNotFoundError(f"no captions in {folder}")
    t = pa.concat_tables([pq.read_table(folder / f"{shards.shard_name(i)}.parquet",
                                        columns=["status", "reason"]) for i in ids])
    reasons = Counter()
    for r in t["reason"].drop_null().to_pylist():
        for part in r.split("; "):
            reasons[part.split(" after ")[0]] += 1
    status = t["status"].to_pylist()
    ok, partial = status.count("ok"), status.count("partial")  # partial: one caption kind good, one failed
    return {"stage": "recaption", "rows_in": t.num_rows, "captioned": ok, "partial": partial,
            "failed": t.num_rows - ok - partial, "failed_by_reason": dict(reasons.most_common()), "shards": len(ids)}


def build_funnel(run_dir: Path, folder: Path | None = None) -> dict:
    """The build stage's funnel of RUN/shards (or of another shards ``folder``)."""
    folder = Path(folder) if folder else Path(run_dir) / "shards"
    ids = sorted(shards.done_shards(folder))
    plan = folder / "_plan.json"
    if not plan.exists():
        raise FileNotFoundError(f"no build in {folder}")
    planned = json.loads(plan.read_text())
    stats = [shards.read_stats(folder, i) for i in ids]
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


def _keys(folder: Path, sid: int, where=None) -> list[str]:
    import pyarrow.parquet as pq

    t = pq.read_table(folder / f"{shards.shard_name(sid)}.parquet", columns=["key"] + ([where[0]] if where else []))
    if where:
        t = t.filter(pc.equal(t[where[0]], where[1]))
    return t["key"].to_pylist()


def lineage(run_dir: Path) -> dict:
    """Follow every row from the input list to the training samples, stage by stage.

    Each stage must account for exactly the rows the stage before handed it, shard by
    shard: input rows = raw rows; downloaded rows = scored rows; scored = selected-or-
    dropped; kept = captioned (or recorded failed); kept = planned for the build, and
    planned = written + recorded build failures. A shard a stage has not made (failed,
    or not run yet) is listed with its recorded failure reason. Returns the counts and
    the problems found (``ok`` when there are none)."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    raw, scores, sel, caps, out = (run_dir / n for n in ("raw", "scores", "selection", "captions", "shards"))
    problems: list[str] = []
    counts: dict[str, int] = {}

    def missing(folder: Path, sid: int, stage: str) -> str:
        reason = shards.failed_shards(folder).get(sid)
        return f"{stage}: shard {shards.shard_name(sid)} " + (f"FAILED: {reason.splitlines()[0][:200]}" if reason
                                                                else "not made (rerun the stage)")

    f = download_funnel(run_dir) if shards.done_shards(raw) else None
    if f is None:
        return {"ok": False, "counts": {}, "problems": ["download: no raw shards"]}
    counts["input"], counts["raw"], counts["downloaded"] = f["rows_in"], f["rows_out"], f["succeeded"]
    if not f["lineage_ok"]:
        problems.append(f"download: {f['rows_in']} input rows, {f['rows_out']} recorded, "
                        f"{f['duplicated_keys']} keys twice")
    problems += [missing(raw, sid, "download") for sid in sorted(shards.failed_shards(raw))]
    stages = [("score", scores, raw, ("status", "success"), "scored"),
              ("select", sel, scores, None, "selected"),
              ("recaption", caps, sel, ("keep", True), "captioned")]
    for stage, folder, up, where, label in stages:
        made = shards.done_shards(folder)  # listed once per folder, not once per shard
        if not made:
            continue
        n = 0
        for sid in sorted(shards.done_shards(up)):
            if sid not in made:
                problems.append(missing(folder, sid, stage))
                continue
            want, have = _keys(up, sid, where), _keys(folder, sid)
            n += len(have)
            if sorted(want) != sorted(have):
                lost, extra = set(want) - set(have), set(have) - set(want)
                problems.append(f"{stage}: shard {shards.shard_name(sid)} has {len(lost)} row(s) of the stage before "
                                f"missing" + (f" (e.g. {min(lost)})" if lost else "") +
                                (f" and {len(extra)} unknown row(s) (e.g. {min(extra)})" if extra else ""))
        counts[label] = n
        if stage == "select":
            counts["kept"] = sum(len(_keys(sel, sid, ("keep", True))) for sid in made)
    if (out / "_plan.json").exists() and (out / "_plan.parquet").exists():
        plan = pq.read_table(out / "_plan.parquet", columns=["key", "shard"])
        planned = plan["key"].to_pylist()
        counts["planned"] = len(planned)
        if "kept" in counts and sorted(planned) != sorted(
                k for sid in shards.done_shards(sel) for k in _keys(sel, sid, ("keep", True))):
            problems.append(f"build: the plan holds {len(planned)} rows, the selection keeps {counts['kept']}; "
                            "rerun `tapir build`")
        if len(set(planned)) != len(planned):
            problems.append(f"build: {len(planned) - len(set(planned))} row(s) planned twice")
        per_shard = Counter(plan["shard"].to_pylist())
        written, built = 0, shards.done_shards(out)
        for sid in sorted(per_shard):
            if sid not in built:
                problems.append(missing(out, sid, "build"))
                continue
            st = shards.read_stats(out, sid)
            written += st["count"]
            if st["count"] + len(st.get("failed", {})) != per_shard[sid]:
                problems.append(f"build: shard {shards.shard_name(sid)} planned {per_shard[sid]} rows, wrote "
                                f"{st['count']} and recorded {len(st.get('failed', {}))} failed")
        counts["written"] = written
    return {"ok": not problems, "counts": counts, "problems": problems}


def format_lineage(lin: dict) -> str:
    order = ("input", "raw", "downloaded", "scored", "selected", "kept", "captioned", "planned", "written")
    chain = " -> ".join(f"{k} {lin['counts'][k]}" for k in order if k in lin["counts"])
    head = f"lineage: {'ok' if lin['ok'] else 'BROKEN'}: {chain}"
    return "\n".join([head] + [f"  {p}" for p in lin["problems"][:20]] +
                     ([f"  ... and {len(lin['problems']) - 20} more"] if len(lin["problems"]) > 20 else []))


def report(run_dir: Path, visuals: bool = True) -> tuple[dict, Path]:
    """Compute the funnel of every stage ``run_dir`` holds, write report/funnel.json (and,
    once scores or captions exist, plots, sample grids and report/index.html); return
    the funnel and the JSON's path."""
    run_dir = Path(run_dir)
    funnel = {"download": download_funnel(run_dir)}
    if shards.done_shards(run_dir / "scores"):
        funnel["score"] = score_funnel(run_dir)
    if (run_dir / "selection" / "_summary.json").exists():
        funnel["select"] = select_funnel(run_dir)
    if shards.done_shards(run_dir / "captions"):
        funnel["recaption"] = recaption_funnel(run_dir)
    if (run_dir / "shards" / "_plan.json").exists():
        funnel["build"] = build_funnel(run_dir)
    funnel["lineage"] = lineage(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "funnel.json"
    path.write_text(json.dumps(funnel, indent=2))
    if visuals and ("score" in funnel or "recaption" in funnel):
        from pipeline.visual import write_visuals

        write_visuals(run_dir, funnel, out)
    return funnel, path
