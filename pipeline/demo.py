"""`tapir demo`: the whole pipeline on a synthetic web served on loopback, no network needed."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.config import load_config

log = logging.getLogger(__name__)


def demo(output: Path, rows: int = 300, config: Path | None = None, overrides: list[str] = ()) -> int:
    from pipeline import ray_backend
    from pipeline.download import download
    from pipeline.report import format_funnel, report
    from pipeline.synthweb import WebServer, build_world

    output = Path(output).resolve()
    if output.exists():
        shutil.rmtree(output)  # a demo always starts from nothing
    web = output / "web"
    web.mkdir(parents=True)
    log.info("building a synthetic web of %d rows", rows)
    world = build_world(rows, seed=0)
    with WebServer(world) as server:
        urls = world.write_url_list(str(web / "urls.parquet"), server.base_url)
        log.info("serving it on %s", server.base_url)
        cfg = load_config(config, [f"output={output}", f"input.path={urls}", *overrides])
        try:
            download(cfg)
        finally:
            ray_backend.shutdown()
    funnel, path = report(output)
    print()
    print(format_funnel(funnel["download"]))
    print()
    print(f"run folder:   {output}")
    print(f"  URL list:   {urls}  (with each row's intended fate in column 'fate')")
    print(f"  raw shards: {cfg.raw_dir}  (NNNNN.tar + NNNNN.parquet + NNNNN_stats.json)")
    print(f"  funnel:     {path}")
    return 0 if funnel["download"]["lineage_ok"] else 1
