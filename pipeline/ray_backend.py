"""The one module that touches Ray.

Stages are plain callables; this module starts (or joins) Ray and runs them as tasks,
one per shard, with a progress bar. A Ray API change touches this file only.

Network hygiene: a local Ray's dashboard probes the cloud metadata address
(169.254.169.254) at start-up unless ``$HOME/ray_bootstrap_config.yaml`` exists, and a
cluster started with ``ray start`` reports "usage stats disabled" to ray.io. Tapir
starts its embedded Ray with usage stats off, the report URL pointed at a closed
loopback port, and Ray's processes given a HOME that holds an empty bootstrap config
(Ray keeps its auth token there too); workers get ``XDG_CACHE_HOME`` set to the user's
cache, so model caches stay where they were.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

log = logging.getLogger(__name__)

# Settings every process Ray starts must see, set in the driver before Ray starts.
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",  # discard port on loopback, never ray.io
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations asks PyPI for updates on import otherwise
    "WANDB_MODE": "disabled",  # img2dataset imports wandb
    "RAY_DEDUP_LOGS": "0",
}


def quiet_env() -> None:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def bootstrap_home() -> Path:
    """A HOME for Ray's own processes holding an empty ray_bootstrap_config.yaml (no cloud probe)."""
    home = Path(tempfile.gettempdir()) / f"tapir-ray-home-{os.getuid()}"
    home.mkdir(exist_ok=True)
    cfg = home / "ray_bootstrap_config.yaml"
    if not cfg.exists():
        cfg.write_text("{}\n")
    return home


@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or $RAY_ADDRESS), else start Ray in-process bound to 127.0.0.1."""
    import ray

    quiet_env()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Ray's processes (and so its workers) get the bootstrap HOME; caches stay in the user's.
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    worker_env = {"env_vars": {k: os.environ[k] for k in QUIET_ENV} | {"XDG_CACHE_HOME": cache}}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=worker_env, log_to_driver=True, logging_level=logging.WARNING)
        return
    # Ray maps 127.0.0.1 to the machine's routable address unless cluster mode is off (as it
    # is on macOS and Windows); an embedded Ray needs no outside address, so it binds loopback.
    from ray._private import ray_constants

    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _env(HOME=str(bootstrap_home()), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"):
            ray.init(
                num_cpus=num_cpus,
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                runtime_env=worker_env,
                logging_level=logging.WARNING,
            )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def _import(modules: list[str]) -> None:
    import importlib

    quiet_env()
    for name in modules:
        importlib.import_module(name)


def warm_up(modules: list[str], num_cpus: float = 1) -> None:
    """Import ``modules`` in as many workers as there are CPUs, without waiting: the
    imports (seconds for img2dataset or torch) then overlap with the driver's planning."""
    import ray

    remote = ray.remote(num_cpus=num_cpus)(_import)
    for _ in range(max(1, int(cluster_cpus() / max(num_cpus, 1e-3)))):
        remote.remote(modules)


def _apply(fn: Callable[[Any], Any], item: Any) -> tuple[str, Any]:
    import ray

    return ray.get_runtime_context().get_node_id(), fn(item)


class TaskTimeout(TimeoutError):
    """A task ran past ``run_tasks``'s ``timeout`` and was cancelled."""


def run_tasks(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    desc: str,
    num_cpus: float = 1,
    max_in_flight: int | None = None,
    weight: Callable[[Any], int] = lambda item: 1,
    unit: str = "shard",
    timeout: float | None = None,
) -> Iterator[tuple[Any, Any, str | None]]:
    """Run ``fn(item)`` as Ray tasks; yield ``(item, result, node_id)`` as they finish.

    A task that raises is yielded as ``(item, exception, None)``: one bad shard never stops
    the others. A task still running ``timeout`` seconds after it was submitted (at most
    ``max_in_flight`` are, so it has been running about as long) is cancelled, its worker
    killed, and yielded with a :class:`TaskTimeout`. The bar advances by ``weight(item)``
    (rows, say) per finished task.
    """
    import ray

    items = list(items)
    remote = ray.remote(num_cpus=num_cpus, max_retries=1)(_apply)
    limit = max_in_flight or max(1, int(cluster_cpus() / max(num_cpus, 1e-3)))
    pending: dict = {}  # ref -> (item, submitted at)
    queue = iter(items)
    bar = tqdm(total=sum(weight(i) for i in items), desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1)
    try:
        while True:
            while len(pending) < limit:
                item = next(queue, None)
                if item is None:
                    break
                pending[remote.remote(fn, item)] = (item, time.monotonic())
            if not pending:
                return
            wait = None
            if timeout is not None:
                wait = max(0.0, min(t for _, t in pending.values()) + timeout - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            if not done:  # the oldest ran out of time (and maybe others with it)
                now = time.monotonic()
                for ref in [r for r, (_, t) in pending.items() if now - t >= timeout]:
                    item, _ = pending.pop(ref)
                    ray.cancel(ref, force=True)
                    log.error("%s: a task ran past %gs; cancelled", desc, timeout)
                    bar.update(weight(item))
                    yield item, TaskTimeout(f"did not finish within {timeout:g}s; cancelled"), None
            for ref in done:
                item, _ = pending.pop(ref)
                try:
                    node, result = ray.get(ref)
                except Exception as err:  # a failed task is data, reported to the caller
                    node, result = None, _cause(err)
                bar.update(weight(item))
                yield item, result, node
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)


def _cause(err: Exception) -> Exception:
    """The stage's own exception inside Ray's task error (its message, not Ray's traceback)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, Exception) else err


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


class _StageActor:
    """Holds one stage object: ``setup()`` once when the actor starts, then calls."""

    def __init__(self, stage: Any):
        quiet_env()
        self.stage = stage
        self.stage.setup()

    def run(self, item: Any) -> tuple[str, Any]:
        import ray

        return ray.get_runtime_context().get_node_id(), self.stage(item)


def run_actor_pool(
    stage: Any,
    items: Iterable[Any],
    *,
    desc: str,
    actors: int,
    num_cpus: float = 1,
    num_gpus: float = 0,
    weight: Callable[[Any], int] = lambda item: 1,
    unit: str = "shard",
) -> Iterator[tuple[Any, Any, str | None]]:
    """Run ``stage(item)`` on a pool of actors that each ran ``stage.setup()`` once (a model
    loaded per actor, on a GPU when ``num_gpus``); yield ``(item, result, node_id)`` as they
    finish, an exception in place of the result for an item that failed."""
    import ray

    items = list(items)
    if not items:
        return
    cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=1)(_StageActor)
    pool = [cls.remote(stage) for _ in range(max(1, min(actors, len(items))))]
    idle, pending, queue = list(pool), {}, iter(items)
    bar = tqdm(total=sum(weight(i) for i in items), desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1)
    try:
        while True:
            while idle:
                item = next(queue, None)
                if item is None:
                    break
                actor = idle.pop()
                pending[actor.run.remote(item)] = (item, actor)
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                item, actor = pending.pop(ref)
                idle.append(actor)
                try:
                    node, result = ray.get(ref)
                except Exception as err:  # a failed item is data, reported to the caller
                    node, result = None, _cause(err)
                bar.update(weight(item))
                yield item, result, node
    finally:
        bar.close()
        for actor in pool:
            ray.kill(actor)


def run_torch_trainer(loop: Callable[[dict], None], config: dict, workers: int, use_gpu: bool,
                      address: str | None = None, num_cpus: int | None = None) -> dict:
    """Run a training loop on ``workers`` Ray Train workers (TorchTrainer: one process each,
    the torch process group set up before ``loop`` runs); return Ray Train's result metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init(address, num_cpus)
    trainer = TorchTrainer(loop, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                           run_config=RunConfig(storage_path=str(Path(tempfile.gettempdir()) / "tapir-ray-train")))
    result = trainer.fit()
    if result.error:
        raise result.error
    return dict(result.metrics or {})
