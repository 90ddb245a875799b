"""Shared by the benchmarks: a work folder under the test socket guard, synthetic shards."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUARD = ROOT / "tests" / "netguard"


def guarded_workdir(prefix: str) -> Path:
    """A fresh temp folder; the socket guard installed here and, through PYTHONPATH and
    sitecustomize, in every process started from now on (Ray's included)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["TAPIR_NETGUARD_LOG"] = str(work / "netguard.log")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GUARD), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(GUARD))
    import tapir_netguard

    tapir_netguard.install()
    from pipeline.ray_backend import quiet_env

    quiet_env()
    return work


def violations(work: Path) -> int:
    log = work / "netguard.log"
    return sum("VIOLATION" in line for line in log.read_text().splitlines()) if log.exists() else 0


def write_shards(folder: Path, n: int, per_shard: int) -> list[tuple[bytes, str]]:
    """Synthetic scenes written as img2dataset would: NNNNN.tar/.parquet/_stats.json."""
    import pyarrow as pa

    from pipeline import shards
    from pipeline.synthweb import build_world

    world = build_world(n, seed=0, noisy=False)
    items = [(world.resources[r["path"]].body, r["alt"]) for r in world.rows]
    folder.mkdir(parents=True)
    for sid in range(0, -(-n // per_shard)):
        rows = items[sid * per_shard:(sid + 1) * per_shard]
        keys = [f"{sid:05d}{i:04d}" for i in range(len(rows))]
        shards.write_tar(folder / f"{sid:05d}.tar",
                         [(k, {"jpg": b, "txt": c.encode()}) for k, (b, c) in zip(keys, rows)])
        shards.write_parquet(folder / f"{sid:05d}.parquet", pa.table({
            "key": keys, "caption": [c for _, c in rows], "status": ["success"] * len(rows)}))
        (folder / f"{sid:05d}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
    return items
