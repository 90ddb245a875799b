"""Cluster behaviour: per-stage resources, lost actors and tasks retried, lazy items, live metrics,
code shipped to workers; and the whole pipeline on a real two-node Ray cluster on the loopback S3
server, with the worker node killed in the middle of the score and build stages."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, tapir_cmd
from ray import cloudpickle

from pipeline import ray_backend, shards, stage_metrics, storage
from pipeline.config import load_config


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import the tests


def _exit_once(item):
    """A shard task whose worker process dies the first time it sees ``item[1]`` (a marker path)."""
    value, marker = item
    if marker == "always":
        os._exit(1)
    if marker and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return value * 2


class _Crashy:
    """A stage whose actor process dies on some items: once (a marker file), or always."""

    def setup(self):
        self.pid = os.getpid()

    def __call__(self, item):
        value, marker = item
        if marker == "always" or (marker and not os.path.exists(marker)):
            if marker != "always":
                Path(marker).touch()
            os._exit(1)
        if value < 0:
            raise ValueError(f"bad item {value}")
        return {"value": value * 2, "pid": self.pid}


class _Counted:
    """Counts its actors: each setup() leaves a file in ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder

    def setup(self):
        Path(self.folder, f"actor-{os.getpid()}").touch()

    def __call__(self, item):
        return item


class _BadSetup:
    def setup(self):
        raise RuntimeError("model missing")

    def __call__(self, item):
        return item


def _refuse_to_load():
    raise ImportError("this stage cannot be loaded on a worker")


class _Unloadable:
    """Pickles in the driver, fails to unpickle on a worker: its actors die while starting."""

    def __reduce__(self):
        return _refuse_to_load, ()


def test_a_dead_actor_is_replaced_and_its_item_retried(local_ray, tmp_path):
    items = [(1, None), (2, str(tmp_path / "once")), (3, None), (-4, None), (5, "always"), (6, None)]
    out = {item[0]: result for item, result, _ in ray_backend.run_actor_pool(
        _Crashy(), iter(items), desc="test crashy", actors=2, num_cpus=0.5, max_retries=2)}
    assert out[1]["value"] == 2 and out[3]["value"] == 6 and out[6]["value"] == 12
    assert out[2]["value"] == 4  # its actor died once: retried on a new actor
    assert isinstance(out[-4], ValueError)  # the stage's own error: not retried, reported
    assert isinstance(out[5], ray_backend.WorkLost) and "died 3 times" in str(out[5])
    assert "ActorDiedError" in str(out[5])
    # and setup errors are the stage's: every item reports it, nothing hangs or retries
    bad = list(ray_backend.run_actor_pool(_BadSetup(), [1, 2], desc="test bad", actors=1, num_cpus=0.5))
    assert [str(r) for _, r, _ in bad] == ["model missing"] * 2
    # actors that die while starting are started again a bounded number of times, then the items fail
    dead = list(ray_backend.run_actor_pool(_Unloadable(), [1, 2, 3], desc="test dead", actors=1, num_cpus=0.5,
                                           max_retries=1))
    assert len(dead) == 3 and all(isinstance(r, ray_backend.WorkLost) for _, r, _ in dead)
    assert "no actor could start" in str(dead[0][1])


def test_a_task_lost_with_its_worker_is_resubmitted(local_ray, tmp_path):
    items = [(1, str(tmp_path / "once")), (2, None), (3, "always")]
    out = {i[0]: r for i, r, _ in ray_backend.run_tasks(_exit_once, items, desc="test lost", num_cpus=0.5,
                                                         max_retries=1)}
    assert out[1] == 2 and out[2] == 4
    assert isinstance(out[3], ray_backend.WorkLost) and "lost 2 times" in str(out[3])


def test_items_are_read_lazily(local_ray):
    pulled = []

    def source():
        for i in range(50):
            pulled.append(i)
            yield i

    results = ray_backend.run_tasks(abs, source(), desc="test lazy", num_cpus=0.5, max_in_flight=3)
    next(results)
    assert len(pulled) <= 4  # three in flight, one more pulled after the first finished
    assert len(list(results)) == 49 and len(pulled) == 50
    pool = ray_backend.run_actor_pool(_Crashy(), ((i, None) for i in range(40)), desc="test lazy", actors=2,
                                      num_cpus=0.5)
    assert len(list(pool)) == 40


def test_a_pool_starts_no_more_actors_than_items(local_ray, tmp_path):
    out = list(ray_backend.run_actor_pool(_Counted(str(tmp_path)), iter([1, 2]), desc="test few", actors=4,
                                          num_cpus=0.25))
    assert sorted(r for _, r, _ in out) == [1, 2]
    assert 1 <= len(list(tmp_path.glob("actor-*"))) <= 2


@pytest.mark.parametrize("where", ["local", "s3"])
def test_stage_metrics_lines(local_ray, tmp_path, where, request):
    folder = str(tmp_path / "scores") if where == "local" else request.getfixturevalue("s3") + "/run/scores"
    metrics = ray_backend.StageMetrics(folder, "test", every=0.0,
                                       summarize=lambda r: {"rows": 10, "ok": 9, "errors": {"too small": 1}})
    items = [(i, None) for i in range(4)] + [(-1, None)]
    list(ray_backend.run_actor_pool(_Crashy(), items, desc="test metrics", actors=2, num_cpus=0.5, metrics=metrics,
                                    weight=lambda item: 10))
    lines = stage_metrics.read(folder)
    assert lines and lines[-1]["final"] and all(line["stage"] == "test" for line in lines)
    last = lines[-1]
    assert (last["shards"], last["failed_shards"], last["rows"], last["ok"]) == (5, 1, 50, 36)
    assert last["errors"] == {"too small": 4, "ValueError: bad item -1": 10}
    assert last["success_rate"] == 0.72 and last["rows_per_s"] > 0
    (node, entry), = last["nodes"].items()  # one node here: all successful rows on it
    assert entry["ip"] == "127.0.0.1" and entry["rows"] == 40 and entry["shards"] == 4


def test_actor_resources_per_stage(local_ray):
    cfg = load_config(None, ["output=/tmp/unused", "resources.build.gpus_per_actor=0.5", "resources.build.actors=3",
                             "resources.score.cpus_per_actor=0.5", "resources.recaption.gpus_per_actor=1"])
    assert ray_backend.actor_resources(cfg.resources.build) == {"actors": 3, "num_cpus": 1, "num_gpus": 0.5,
                                                                "max_retries": 2}
    # no GPU in this cluster (2 CPUs): gpus null -> 0, actors fill the CPUs
    assert ray_backend.actor_resources(cfg.resources.score) == {"actors": 4, "num_cpus": 0.5, "num_gpus": 0.0,
                                                                "max_retries": 2}
    # a captioner behind an HTTP server never reserves a GPU, whatever the section says
    assert ray_backend.actor_resources(cfg.resources.recaption, http_only=True)["num_gpus"] == 0
    assert ray_backend.actor_resources(cfg.resources.recaption)["num_gpus"] == 1
    assert ray_backend.actor_resources(cfg.resources.build, actors=7)["actors"] == 7


def test_older_global_resource_keys_fill_the_stages():
    cfg = load_config(None, ["output=/tmp/unused", "resources.gpus_per_actor=0.25", "resources.download_tasks=3",
                             "resources.build.gpus_per_actor=1"])
    r = cfg.resources
    assert (r.score.gpus_per_actor, r.recaption.gpus_per_actor, r.build.gpus_per_actor) == (0.25, 0.25, 1)
    assert r.download.tasks == 3
    assert type(cfg).model_validate(cfg.model_dump()).resources == r


def test_runtime_env_ships_code_and_storage_settings(s3):
    env = ray_backend.runtime_env(ship_code=True)
    assert [Path(p).name for p in env["py_modules"]] == ["pipeline", "filters", "recaption", "training"]
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert "py_modules" not in ray_backend.runtime_env(ship_code=False)


# -- the whole pipeline on a real two-node cluster, input and output on the loopback S3 server ---------------


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A Ray head node (1 CPU) started with ``ray start`` on this machine; tests add worker nodes."""
    from raycluster import LocalCluster

    with LocalCluster(cpus_per_node=1) as c:
        yield c


@pytest.fixture(scope="module")
def cluster_models(tmp_path_factory):
    from filters.clip import save_local_clip
    from pipeline.encoders import save_tiny_kl
    from recaption.tiny import save_tiny_chat_vlm

    root = tmp_path_factory.mktemp("cluster-models")
    return {"clip": save_local_clip(root / "clip"), "captioner": save_tiny_chat_vlm(root / "chat"),
            "kl": save_tiny_kl(root / "kl")}


def _pipeline_args(run: str, urls: str, models: dict) -> list[str]:
    sets = [*FAST, "download.samples_per_shard=10", "score.scorers=[basic,phash,clip]", "score.batch_size=8",
            f"score.clip.model={models['clip']}", "score.clip.pretrained=null", f"recaption.model={models['captioner']}",
            "recaption.max_new_tokens=6", "recaption.batch_size=4", f"build.vae.model={models['kl']}",
            "build.resolution=32", "build.samples_per_shard=8", "build.batch_size=4", "build.decode_threads=1",
            # the random tiny CLIP finds every pair alike: semantic dedup runs, but only identical images count
            "score.dedup.semantic_threshold=1.0"]
    return [f"output={run}", f"input.path={urls}", *sets]


def _tapir_run(cluster, tmp_path, run: str, urls: str, models: dict, name: str):
    """`tapir run --ray-address HEAD` in a subprocess (a driver joining the cluster); its output in files."""
    config = tmp_path / f"{name}.yaml"
    config.write_text("{}\n")  # everything as --set
    sets = [a for kv in _pipeline_args(run, urls, models) for a in ("--set", kv)]
    out, err = (open(tmp_path / f"{name}.{s}", "w+") for s in ("out", "err"))
    proc = subprocess.Popen(tapir_cmd("run", config, "--ray-address", cluster.address, *sets), env=cluster.env(),
                            stdout=out, stderr=err, text=True, cwd=tmp_path)
    return proc, out, err


def _finish(proc, out, err, timeout: float = 600):
    proc.wait(timeout)
    out.seek(0), err.seek(0)
    return proc.returncode, out.read(), err.read()


def _keys_of_tars(folder) -> list[str]:
    keys = []
    for sid in sorted(shards.done_shards(folder)):
        keys += [k for k, m in shards.read_tar(shards.shard_file(folder, sid, ".tar")).items() if "json" in m]
    return keys


def _check_run(run: str, rows: int) -> dict:
    """Every input row accounted for, nothing duplicated, from the run's own records on S3."""
    funnel = json.loads((storage.path(run) / "report" / "funnel.json").read_text())
    assert funnel["lineage"]["ok"], funnel["lineage"]["problems"]
    assert funnel["lineage"]["counts"]["input"] == rows
    raw = shards.read_metadata(f"{run}/raw").column("key").to_pylist()
    assert len(raw) == len(set(raw)) == rows  # each input row once in raw/
    written = _keys_of_tars(f"{run}/shards")
    assert len(written) == len(set(written)) == funnel["build"]["written"] > 0  # each sample once
    assert set(written) <= set(raw)
    return {"funnel": funnel, "written": sorted(written)}


def _nodes_that_worked(folder) -> set[str]:
    return {n for line in stage_metrics.read(folder) for n in line["nodes"]}


RUNS: dict = {}  # each run's training samples: the second of the two tests compares its own with the first's


def _same_samples_as_the_other_run(name: str, written: list[str]) -> None:
    RUNS[name] = written
    if len(RUNS) == 2:  # the node loss changed nothing in what was written
        assert RUNS["clean"] == RUNS["lossy"]


@pytest.mark.slow
def test_every_stage_on_two_nodes_with_s3(cluster, cluster_models, s3, url_list, world, tmp_path):
    """The reference run: two healthy nodes (slow: the node-loss test below runs the same stages)."""
    for node in cluster.alive()[1:]:
        cluster.kill(node)
    cluster.add_worker()
    urls, run = f"{s3}/input/urls.parquet", f"{s3}/run"
    storage.upload(Path(url_list), urls)
    code, out, err = _finish(*_tapir_run(cluster, tmp_path, run, urls, cluster_models, "clean"))
    assert code == 0, f"stdout:\n{out[-4000:]}\nstderr:\n{err[-6000:]}"
    assert "lineage: ok" in out
    _same_samples_as_the_other_run("clean", _check_run(run, len(world.rows))["written"])


def test_every_stage_on_two_nodes_with_s3_losing_a_node(cluster, cluster_models, s3, url_list, world, tmp_path):
    """`tapir run --ray-address` through every stage, input and output on S3, on a head and a worker
    node. The worker node is killed (SIGKILL to every process of it) while it holds a score item; a new
    one joins and is killed while it holds a build item. The run completes on what is left: lineage ok,
    every row once, metrics from both nodes, `tapir verify` on the cluster passes."""
    for node in cluster.alive()[1:]:  # a fresh worker node that stalls on its first score and build item
        cluster.kill(node)
    stall = tmp_path / "stall"
    stall.mkdir()
    env = {"TAPIR_TEST_STALL": "score,build", "TAPIR_TEST_STALL_DIR": str(stall), "TAPIR_TEST_STALL_S": "300"}
    node = cluster.add_worker(**env)
    urls, run = f"{s3}/input/urls.parquet", f"{s3}/run"
    storage.upload(Path(url_list), urls)
    proc, out, err = _tapir_run(cluster, tmp_path, run, urls, cluster_models, "lossy")
    killed = []
    for stage in ("score", "build"):
        deadline = time.monotonic() + 400
        while not (stall / stage).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (stall / stage).exists(), f"the worker node never started a {stage} item: {_finish(proc, out, err)}"
        assert cluster.kill(node) > 0
        killed.append(stage)
        if stage == "score":
            node = cluster.add_worker(**env)  # a new node joins; build will lose it too
    code, stdout, stderr = _finish(proc, out, err)
    assert killed == ["score", "build"] and "an actor died" in stderr  # lost items were retried on new actors
    if code != 0:  # the run may end with failed shards recorded; its rerun completes them
        code, stdout, stderr = _finish(*_tapir_run(cluster, tmp_path, run, urls, cluster_models, "rerun"))
    assert code == 0, f"stdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-6000:]}"
    result = _check_run(run, len(world.rows))
    for stage in ("raw", "scores", "selection", "captions", "shards"):  # live metrics of every stage
        lines = stage_metrics.read(f"{run}/{stage}")
        assert lines and lines[-1]["final"], stage
    assert len(_nodes_that_worked(f"{run}/raw")) == 2  # the download ran on both nodes
    ips = {n["ip"] for s in ("raw", "scores", "shards") for line in stage_metrics.read(f"{run}/{s}")
           for n in line["nodes"].values()}
    assert ips and all(ipaddress.ip_address(ip).is_loopback for ip in ips)  # every node on loopback
    verify = subprocess.run(tapir_cmd("verify", f"{run}/shards", "--ray-address", cluster.address), env=cluster.env(),
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    _same_samples_as_the_other_run("lossy", result["written"])
