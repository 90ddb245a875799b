"""The one module that touches Ray.

Stages are plain callables; this module starts (or joins) Ray and runs them as tasks
(:func:`run_tasks`, one per shard) or on pools of actors that load a model once
(:func:`run_actor_pool`), reading the items lazily, with a progress bar and live metrics
(:class:`StageMetrics`). Work lost with its process or node is retried a bounded number of
times (Ray's task retries; a dead actor is replaced and its item queued again), then
reported as a failure naming the reason. Each stage sizes its actors from its own
resources section (:func:`actor_resources`). Joining a cluster ships Tapir's packages and
the storage settings to the workers (:func:`runtime_env`). A Ray API change touches this
file only.

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
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sized

from tqdm import tqdm

from pipeline.stage_metrics import StageMetrics

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


PACKAGES = ("pipeline", "filters", "recaption", "training")  # Tapir's code, shipped to a cluster's workers


def runtime_env(ship_code: bool) -> dict:
    """Ray's runtime environment for this run's workers: the quiet settings and the storage
    credentials and endpoints of this process (:func:`pipeline.storage.worker_env`), and
    with ``ship_code`` Tapir's packages as ``py_modules`` (uploaded once per content hash),
    so a worker node needs only the installed dependencies, not a checkout of Tapir."""
    import importlib

    from pipeline import storage

    env = {k: os.environ.get(k, v) for k, v in QUIET_ENV.items()} | storage.worker_env()
    out: dict = {"env_vars": env}
    if ship_code:
        out["py_modules"] = [os.path.dirname(importlib.import_module(p).__file__) for p in PACKAGES]
    return out


def init(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or $RAY_ADDRESS), shipping Tapir's code and storage settings to its
    workers (:func:`runtime_env`); else start Ray in-process bound to 127.0.0.1."""
    import ray

    quiet_env()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining Ray cluster at %s (shipping %s)", address, ", ".join(PACKAGES))
        ray.init(address=address, runtime_env=runtime_env(ship_code=True), log_to_driver=True,
                 logging_level=logging.WARNING)
        return
    # Ray's processes (and so its workers) get the bootstrap HOME; caches stay in the user's.
    env = runtime_env(ship_code=False)
    env["env_vars"]["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME") or \
        os.path.join(os.path.expanduser("~"), ".cache")
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
                runtime_env=env,
                logging_level=logging.WARNING,
            )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def is_initialized() -> bool:
    """Whether this process has joined Ray (without importing it when it has not)."""
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


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


def _stall_hook(desc: str) -> None:
    """Tests of node loss: ``TAPIR_TEST_STALL=score,build`` in a node's environment stalls the
    first item of those stages on that node for ``TAPIR_TEST_STALL_S`` seconds, after creating
    ``$TAPIR_TEST_STALL_DIR/<stage>`` (a test waits for it, then kills the node mid-item)."""
    stages, stage = os.environ.get("TAPIR_TEST_STALL"), (desc.split() or [""])[0]
    if not stages or stage not in stages.split(","):
        return
    try:
        fd = os.open(os.path.join(os.environ["TAPIR_TEST_STALL_DIR"], stage), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return  # stalled once already
    os.close(fd)
    time.sleep(float(os.environ.get("TAPIR_TEST_STALL_S", "60")))


def _apply(fn: Callable[[Any], Any], item: Any, desc: str = "") -> tuple[str, Any]:
    import ray

    _stall_hook(desc)
    return ray.get_runtime_context().get_node_id(), fn(item)


class TaskTimeout(TimeoutError):
    """A task ran past ``run_tasks``'s ``timeout`` and was cancelled."""


class WorkLost(RuntimeError):
    """An item's worker or actor died (process killed, node lost) more often than allowed."""


def _lost_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for work lost with its process or node, not raised by the stage."""
    from ray import exceptions as e

    return (e.RayActorError, e.WorkerCrashedError, e.NodeDiedError, e.ObjectLostError, e.LocalRayletDiedError,
            e.OutOfMemoryError, e.TaskUnschedulableError, e.ActorUnschedulableError)


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:limit]


_END = object()


def _bar(items, desc, unit, weight, total):
    if total is None and isinstance(items, Sized):
        total = sum(weight(i) for i in items)
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1)


def run_tasks(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    desc: str,
    num_cpus: float = 1,
    max_in_flight: int | None = None,
    max_retries: int = 2,
    weight: Callable[[Any], int] = lambda item: 1,
    total: int | None = None,
    unit: str = "shard",
    timeout: float | None = None,
    metrics: StageMetrics | None = None,
) -> Iterator[tuple[Any, Any, str | None]]:
    """Run ``fn(item)`` as Ray tasks; yield ``(item, result, node_id)`` as they finish.

    ``items`` is read lazily, at most ``max_in_flight`` ahead (default: one per CPU). A task
    that raises is yielded as ``(item, exception, None)``: one bad shard never stops the
    others. A task lost with its worker or node is resubmitted by Ray up to ``max_retries``
    times, then yielded with a :class:`WorkLost` naming the reason. A task still running
    ``timeout`` seconds after it was submitted is cancelled, its worker killed, and yielded
    with a :class:`TaskTimeout`. The bar advances by ``weight(item)`` per finished task
    (``total``: the bar's end, when known; a list's weights are summed). ``metrics``
    (:class:`StageMetrics`) records every result and writes its lines as the stage runs.
    """
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False)(_apply)
    lost = _lost_errors()
    limit = max_in_flight or max(1, int(cluster_cpus() / max(num_cpus, 1e-3)))
    pending: dict = {}  # ref -> (item, submitted at)
    source = iter(items)
    bar = _bar(items, desc, unit, weight, total)
    try:
        while True:
            while len(pending) < limit and (item := next(source, _END)) is not _END:
                pending[remote.remote(fn, item, desc)] = (item, time.monotonic())
            if not pending:
                return
            wait = metrics.every if metrics else None
            if timeout is not None:
                left = max(0.0, min(t for _, t in pending.values()) + timeout - time.monotonic())
                wait = left if wait is None else min(wait, left)
            done, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            if timeout is not None:  # the oldest may have run out of time (and others with it)
                now = time.monotonic()
                for ref in [r for r, (_, t) in pending.items() if now - t >= timeout and r not in done]:
                    item, _ = pending.pop(ref)
                    ray.cancel(ref, force=True)
                    log.error("%s: a task ran past %gs; cancelled", desc, timeout)
                    yield _finish(bar, metrics, weight, item,
                                  TaskTimeout(f"did not finish within {timeout:g}s; cancelled"), None)
            for ref in done:
                item, _ = pending.pop(ref)
                try:
                    node, result = ray.get(ref)
                except lost as err:
                    node, result = None, WorkLost(f"its worker was lost {max_retries + 1} times "
                                                  f"({type(err).__name__}: {_first_line(err)})")
                except Exception as err:  # a failed task is data, reported to the caller
                    node, result = None, _cause(err)
                yield _finish(bar, metrics, weight, item, result, node)
            if metrics:
                metrics.tick()
    finally:
        bar.close()
        if metrics:
            metrics.close()
        for ref in pending:
            ray.cancel(ref, force=True)


def _finish(bar, metrics, weight, item, result, node):
    """Count a finished item on the bar and in the metrics; the triple the runners yield."""
    bar.update(weight(item))
    if metrics:
        metrics.record(item, result, node, weight(item), ip=_node_ip(node))
        bar.set_postfix_str(metrics.postfix(), refresh=False)
    return item, result, node


_NODE_IPS: dict[str, str] = {}


def _node_ip(node: str | None) -> str | None:
    """A node's IP address (from Ray's node table, read again when a node is new)."""
    if node and node not in _NODE_IPS:
        import ray

        _NODE_IPS.update({n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes()})
    return _NODE_IPS.get(node) if node else None


def _cause(err: Exception) -> Exception:
    """The stage's own exception inside Ray's task error (its message, not Ray's traceback)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, Exception) else err


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def actor_resources(res, http_only: bool = False, actors: int | None = None) -> dict:
    """Keyword arguments of :func:`run_actor_pool` for a stage's resources section
    (``cfg.resources.score`` / ``.recaption`` / ``.build``): ``actors``, ``num_cpus``,
    ``num_gpus``, ``max_retries``. ``gpus_per_actor`` null means 1 when the cluster has GPUs;
    an HTTP-only stage (a captioner behind an OpenAI-compatible server) reserves none.
    ``actors`` (a stage's own older ``actors`` key) wins over ``res.actors``; unset, the pool
    fills the cluster's GPUs (or CPUs, without GPUs) at these sizes."""
    gpus = 0.0 if http_only else (res.gpus_per_actor if res.gpus_per_actor is not None else
                                  (1.0 if cluster_gpus() else 0.0))
    cpus = res.cpus_per_actor
    count = actors or res.actors or (int(cluster_gpus() / gpus) if gpus else int(cluster_cpus() / cpus))
    return {"actors": max(1, count), "num_cpus": cpus, "num_gpus": gpus, "max_retries": res.max_retries}


class _StageActor:
    """Holds one stage object: ``setup()`` once when the actor starts, then calls. A setup
    error is kept and raised by every call (an error of the stage, not a lost actor)."""

    def __init__(self, stage: Any, desc: str = ""):
        quiet_env()
        self.stage, self.desc, self.error = stage, desc, None
        try:
            self.stage.setup()
        except Exception as err:  # reported per item by run(), like any stage error
            self.error = err

    def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, item: Any) -> tuple[str, Any]:
        import ray

        if self.error is not None:
            raise self.error
        _stall_hook(self.desc)
        return ray.get_runtime_context().get_node_id(), self.stage(item)


def run_actor_pool(
    stage: Any,
    items: Iterable[Any],
    *,
    desc: str,
    actors: int,
    num_cpus: float = 1,
    num_gpus: float = 0,
    max_retries: int = 2,
    weight: Callable[[Any], int] = lambda item: 1,
    total: int | None = None,
    unit: str = "shard",
    metrics: StageMetrics | None = None,
) -> Iterator[tuple[Any, Any, str | None]]:
    """Run ``stage(item)`` on a pool of actors that each ran ``stage.setup()`` once (a model
    loaded per actor, on a GPU when ``num_gpus``); yield ``(item, result, node_id)`` as they
    finish, an exception in place of the result for an item that failed.

    ``items`` is read lazily, one per idle actor. An actor that dies (its process killed, its
    node lost) is replaced by a new one and its item queued again, up to ``max_retries`` times
    per item; then the item is yielded with a :class:`WorkLost` naming the reason. Actors
    start as work arrives (one per waiting item), at most ``actors``; a replacement the
    cluster cannot place yet waits while the others go on. ``total``, ``weight``, ``metrics``: as :func:`run_tasks`.
    """
    import ray

    cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(_StageActor)
    lost = _lost_errors()
    stage_ref = ray.put(stage)  # one copy in the object store for every actor and replacement
    starting: dict = {}  # ready ref -> actor
    idle: list = []
    busy: dict = {}  # call ref -> (item, attempt, actor)
    source, ahead = iter(items), deque()  # items pulled (at most `actors` ahead) and not yet on an actor
    bar = _bar(items, desc, unit, weight, total)
    waiting_since, warned, start_failures, start_error = None, 0.0, 0, ""
    try:
        while True:
            while len(ahead) < actors and (item := next(source, _END)) is not _END:
                ahead.append((item, 0))
            while ahead and idle:
                item, attempt = ahead.popleft()
                actor = idle.pop()
                busy[actor.run.remote(item)] = (item, attempt, actor)
            if not ahead and not busy:
                return
            if ahead and not (starting or busy or idle) and start_failures > max_retries:
                # no actor could start: every item left fails with the reason
                item, _ = ahead.popleft()
                yield _finish(bar, metrics, weight, item, WorkLost(f"no actor could start: {start_error}"), None)
                continue
            if len(starting) < len(ahead) and len(starting) + len(busy) + len(idle) < actors \
                    and start_failures <= max_retries:  # an actor for each waiting item, up to `actors`
                actor = cls.remote(stage_ref, desc)
                starting[actor.ready.remote()] = actor
                continue
            done, _ = ray.wait([*busy, *starting], num_returns=1, timeout=metrics.every if metrics else 30)
            if busy or not starting:
                waiting_since = None
            elif not done:  # nothing to do but wait for actors: say so every minute
                now = time.monotonic()
                waiting_since, warned = (waiting_since, warned) if waiting_since else (now, now)
                if now - warned >= 60:
                    warned = now
                    log.warning("%s: waiting %.0fs for %d actor(s) to start: the cluster must place them (%g CPU, "
                                "%g GPU each), then their setup() runs", desc, now - waiting_since, len(starting),
                                num_cpus, num_gpus)
            for ref in done:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(actor)
                        start_failures = 0
                    except lost as err:  # died before it took any work: start another (a bounded number)
                        start_failures, start_error = start_failures + 1, f"{type(err).__name__}: {_first_line(err)}"
                        log.warning("%s: an actor died while starting (%s)%s", desc, start_error,
                                    "; starting another" if start_failures <= max_retries else "")
                    continue
                item, attempt, actor = busy.pop(ref)
                try:
                    node, result = ray.get(ref)
                    idle.append(actor)
                except lost as err:
                    ray.kill(actor)
                    reason = f"{type(err).__name__}: {_first_line(err)}"
                    if attempt < max_retries:
                        log.warning("%s: an actor died (%s); retrying its %s on a new actor (retry %d of %d)",
                                    desc, reason, unit, attempt + 1, max_retries)
                        ahead.appendleft((item, attempt + 1))
                        continue
                    node, result = None, WorkLost(f"its actor died {attempt + 1} times; last: {reason}")
                except Exception as err:  # a failed item is data, reported to the caller
                    node, result = None, _cause(err)
                    idle.append(actor)
                yield _finish(bar, metrics, weight, item, result, node)
            if metrics:
                metrics.tick()
    finally:
        bar.close()
        if metrics:
            metrics.close()
        for actor in [*starting.values(), *idle, *(a for _, _, a in busy.values())]:
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
