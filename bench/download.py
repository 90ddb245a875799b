"""Download throughput: plain img2dataset versus `tapir download` (hardened fetch on).

Both download the same synthetic URL list, served on loopback by a server in its own
process, in one run, with the same shard size, image size, resize mode and threads.
Prints images/s of each and the ratio (goal: tapir >= 0.95 of img2dataset). Not a
test: run it by hand on a quiet machine.

    python bench/download.py --rows 2000

Runs under the test socket guard (tests/netguard): any attempt to leave loopback, in
any process, is refused and counted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import time
from pathlib import Path

from _common import guarded_workdir, violations  # bench/ is sys.path[0] for a script


def _serve(rows: int, seed: int, queue) -> None:
    from pipeline.synthweb import WebServer, build_world

    world = build_world(rows, seed=seed, noisy=False)
    server = WebServer(world)
    queue.put(server.base_url)
    server.serve_forever()


def run_img2dataset(url_list: str, out: str, args) -> tuple[float, int]:
    import img2dataset

    start = time.perf_counter()
    img2dataset.download(
        url_list=url_list, output_folder=out, processes_count=args.processes, thread_count=args.threads,
        image_size=args.image_size, resize_mode="keep_ratio", output_format="webdataset",
        input_format="parquet", url_col="URL", caption_col="TEXT", number_sample_per_shard=args.shard,
        distributor="multiprocessing", timeout=10, retries=0, enable_wandb=False, compute_hash="sha256",
    )
    elapsed = time.perf_counter() - start
    import pyarrow.parquet as pq

    ok = sum(pq.read_table(p, columns=["status"])["status"].to_pylist().count("success")
             for p in Path(out).glob("*.parquet"))
    return elapsed, ok


def run_tapir(url_list: str, out: str, args) -> tuple[float, int]:
    from pipeline import ray_backend
    from pipeline.config import load_config
    from pipeline.download import download

    cfg = load_config(None, [
        f"output={out}", f"input.path={url_list}", "input.preset=laion", "download.fetch.allow_loopback=true",
        f"download.image_size={args.image_size}", "download.resize_mode=keep_ratio",
        f"download.samples_per_shard={args.shard}", f"download.threads={args.threads}",
        f"resources.num_cpus={args.processes}", f"resources.download_tasks={args.processes}",
    ])
    start = time.perf_counter()
    funnel = download(cfg)
    elapsed = time.perf_counter() - start
    ray_backend.shutdown()
    return elapsed, funnel["succeeded"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--shard", type=int, default=250, help="rows per shard (both tools)")
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="alternate the two tools this many times")
    args = p.parse_args()

    work = guarded_workdir("tapir-bench-")
    queue = mp.get_context("spawn").Queue()
    server = mp.get_context("spawn").Process(target=_serve, args=(args.rows, 0, queue), daemon=True)
    server.start()
    base_url = queue.get(timeout=300)
    from pipeline.synthweb import build_world

    url_list = build_world(args.rows, seed=0, noisy=False).write_url_list(str(work / "urls.parquet"), base_url)
    results: dict[str, list[tuple[float, int]]] = {"img2dataset": [], "tapir": []}
    try:
        for r in range(args.repeats):
            for name, fn in (("img2dataset", run_img2dataset), ("tapir", run_tapir)):
                out = work / f"{name}-{r}"
                shutil.rmtree(out, ignore_errors=True)
                results[name].append(fn(str(url_list), str(out), args))
    finally:
        server.terminate()
    print(f"\nrows={args.rows} shard={args.shard} threads={args.threads} processes={args.processes} "
          f"image_size={args.image_size} (loopback server in its own process)")
    best = {}
    for name, runs in results.items():
        for i, (sec, ok) in enumerate(runs):
            print(f"  {name:<12} run {i}: {ok:>6} images in {sec:6.1f} s = {ok / sec:7.1f} img/s")
        best[name] = max(ok / sec for sec, ok in runs)
    print(f"  ratio tapir / img2dataset (best runs): {best['tapir'] / best['img2dataset']:.3f}  (goal >= 0.95)")
    print(f"  non-loopback connection attempts refused by the guard: {violations(work)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
