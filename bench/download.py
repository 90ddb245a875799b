"""Download throughput: img2dataset's shard downloader against the download stage's, like for like.

Both arms download the same pre-sharded URL list (as `tapir download` plans it), served on loopback by a server in a process of its own, with the same
processes, fetch threads per process, shards, image size, resize mode (keep_ratio), hash
(sha256), re-encode (jpg) and no EXIF:
  img2dataset: ``img2dataset.downloader.Downloader`` as ``img2dataset.download`` builds it
               (its Resizer, the webdataset writer), called once per shard, as its
               multiprocessing distributor calls it;
  stage:       ``pipeline.download.ShardTask``, the callable `tapir download` runs as Ray
               tasks, called once per shard: the hardened fetch, the header check before
               decoding, classification, and the atomic commit. No Ray: it runs directly in
               a process of its own.
Each run of an arm is ``--procs`` fresh processes, each taking the same share of the shards
(see bench/_common.py); imports and setup are not timed. Prints each arm's median images/s
and spread over ``--repeats`` alternating runs, and the median of the per-repeat ratios
stage / img2dataset (goal >= 0.95). Not a test. Runs under the test socket guard
(tests/netguard): any attempt to leave loopback, in any process, is refused and counted.

    python bench/download.py --rows 2000 --shard 250 --procs 2 --threads 32 --repeats 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil

from _common import compare, guarded_workdir, share, summarize, violations


def _serve(rows: int, seed: int, queue) -> None:
    from pipeline.synthweb import WebServer, build_world

    world = build_world(rows, seed=seed, noisy=False)
    server = WebServer(world)
    queue.put(server.base_url)
    server.serve_forever()


def _config(spec: dict, output: str):
    from pipeline.config import load_config

    return load_config(None, [
        f"output={output}", f"input.path={spec['urls']}", "input.preset=laion", "download.fetch.allow_loopback=true",
        f"download.image_size={spec['image_size']}", "download.resize_mode=keep_ratio",
        f"download.samples_per_shard={spec['shard']}", f"download.threads={spec['threads']}",
        "download.retry_passes=0"])


def img2dataset_arm(spec: dict, part: int, procs: int):
    """img2dataset's Downloader, built with what img2dataset.download would pass it."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    out = os.path.join(spec["work"], f"img2dataset-{os.getpid()}")
    os.makedirs(out)
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter, thread_count=spec["threads"], save_caption=True,
        resizer=Resizer(image_size=spec["image_size"], resize_mode="keep_ratio", resize_only_if_bigger=False,
                        encode_quality=95, encode_format="jpg"),  # img2dataset.download's defaults
        extract_exif=False, output_folder=out, column_list=spec["column_list"], timeout=10,
        number_sample_per_shard=spec["shard"], oom_shard_count=5, compute_hash="sha256", verify_hash_type=None,
        encode_format="jpg", retries=0, user_agent_token=None,
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"])
    mine = share(spec["shards"], part, procs)

    def work() -> dict:
        import pyarrow.parquet as pq

        for sid, path in mine:
            local = os.path.join(out, f"{sid:05d}.feather")
            shutil.copyfile(path, local)  # img2dataset deletes its input (the stage copies it too)
            downloader((sid, local))
        ok = sum(pq.read_table(os.path.join(out, f"{sid:05d}.parquet"), columns=["status"])["status"]
                 .to_pylist().count("success") for sid, _ in mine)
        return {"images": ok}

    return work


def stage(spec: dict, part: int, procs: int):
    """pipeline.download.ShardTask, as a Ray task runs it: one call per shard."""
    import img2dataset.downloader  # noqa: F401 - imported ahead, as `tapir download` warms its workers up
    import img2dataset.writer  # noqa: F401

    from pipeline.download import ShardTask
    from pipeline.input_plan import download_settings, jobs, prepare

    cfg = _config(spec, os.path.join(spec["work"], f"stage-{os.getpid()}"))
    todo = list(jobs(cfg, prepare(cfg)))  # the stage's own plan, into this process's run folder (not timed)
    task = ShardTask(cfg.model_dump(), download_settings(cfg))
    mine = share(todo, part, procs)

    def work() -> dict:
        return {"images": sum(task(job)["successes"] for job in mine)}

    return work


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--shard", type=int, default=250, help="rows per shard (both arms)")
    p.add_argument("--threads", type=int, default=32, help="fetch threads per process (both arms)")
    p.add_argument("--procs", type=int, default=2, help="processes per arm, each taking an equal share")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="runs of each arm, the order alternating")
    p.add_argument("--json", help="also write the figures (every run) to this JSON file")
    args = p.parse_args()
    load = os.getloadavg()[0]

    work = guarded_workdir("tapir-bench-download-")
    queue = mp.get_context("spawn").Queue()
    server = mp.get_context("spawn").Process(target=_serve, args=(args.rows, 0, queue), daemon=True)
    server.start()
    try:
        base_url = queue.get(timeout=300)
        import pyarrow.feather as feather
        import pyarrow.parquet as pq

        from pipeline.input_plan import jobs, prepare, rows_path
        from pipeline.synthweb import build_world

        urls = build_world(args.rows, seed=0, noisy=False).write_url_list(str(work / "urls.parquet"), base_url)
        spec = {"urls": str(urls), "work": str(work), "image_size": args.image_size, "shard": args.shard,
                "threads": args.threads}
        # the stage's own sharding, its rows files handed to img2dataset's arm as feather
        cfg = _config(spec, str(work / "plan"))
        todo, paths = list(jobs(cfg, prepare(cfg))), []
        for sid, *_ in todo:
            table = pq.read_table(rows_path(cfg.raw_dir, sid, cfg.download.shard_digits))
            feather.write_feather(table, work / f"{sid:05d}.feather")
            paths.append((sid, str(work / f"{sid:05d}.feather")))
        spec.update(column_list=table.column_names, shards=paths)
        if len(todo) % args.procs:
            print(f"warning: {len(todo)} shards do not split evenly over {args.procs} processes")
        print(f"{args.rows} rows in {len(todo)} shards, image_size {args.image_size} keep_ratio, loopback server "
              f"in its own process", flush=True)
        runs = compare({"img2dataset": img2dataset_arm, "stage": stage}, spec, repeats=args.repeats,
                       procs=args.procs, threads=None)
    finally:
        server.terminate()
    summarize(runs, "img2dataset", "stage", 0.95, procs=args.procs, threads=None, load_before=load,
              labels={"img2dataset": "img2dataset: its Downloader per shard",
                      "stage": "stage: pipeline.download.ShardTask per shard (hardened fetch, commit)"},
              notes=[f"fetch threads per process: {args.threads} (both arms)",
                     f"non-loopback connection attempts refused by the guard: {violations(work)}"],
              json_path=args.json)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
