"""`tapir report`: the funnel of a run folder, as text and JSON.

Every input row appears in raw/ metadata exactly once; the funnel counts rows in, rows
out, successes, and failures by reason, and checks the lineage (no row lost, none twice).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

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


def report(run_dir: Path) -> tuple[dict, Path]:
    """Compute the funnel of ``run_dir``, write report/funnel.json, return both."""
    funnel = {"download": download_funnel(run_dir)}
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "funnel.json"
    path.write_text(json.dumps(funnel, indent=2))
    return funnel, path
