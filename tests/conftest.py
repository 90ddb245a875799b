"""Test-wide fixtures: the socket guard in every process, the synthetic web, a local Ray.

No test may contact any address but loopback. The guard (tests/netguard) is installed
in this process and, through PYTHONPATH + sitecustomize, in every Python process the
tests start (CLI subprocesses, Ray's dashboard and workers). Any refused attempt is
logged; a test during which one happens fails, even if the code under test swallowed
the error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
GUARD_DIR = HERE / "netguard"
sys.path.insert(0, str(GUARD_DIR))
sys.path.insert(1, str(HERE))  # test helpers (s3server)

import tapir_netguard  # noqa: E402


def pytest_configure(config):
    log = Path(os.environ.get("TAPIR_NETGUARD_LOG") or (Path(config.rootpath) / ".pytest_cache" / "netguard.log"))
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    os.environ["TAPIR_NETGUARD_LOG"] = str(log)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GUARD_DIR), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    tapir_netguard.install()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where CUDA is, and are reported as skipped (never passed) elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def violations() -> list[str]:
    return [line for line in Path(os.environ["TAPIR_NETGUARD_LOG"]).read_text().splitlines() if "VIOLATION" in line]


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """A test that sets torch's thread count in this process (a stage's setup does) leaves it as
    it found it: in random order, the next test's float results must not depend on who ran first."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_packet_leaves_loopback():
    before = len(violations())
    tapir_netguard.ATTEMPTS.clear()
    yield
    new = violations()[before:]
    assert not new, "a process tried to reach a non-loopback address:\n" + "\n".join(new)


@pytest.fixture(scope="session")
def world():
    from pipeline.synthweb import build_world

    return build_world(60, seed=3)


@pytest.fixture(scope="session")
def web(world):
    from pipeline.synthweb import WebServer

    with WebServer(world) as server:
        yield server


@pytest.fixture(scope="session")
def url_list(web, world, tmp_path_factory):
    path = tmp_path_factory.mktemp("web") / "urls.parquet"
    return world.write_url_list(str(path), web.base_url)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback for the session; the environment (AWS_ENDPOINT_URL, fake keys)
    points every process the tests start at it while it runs."""
    from s3server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def s3(s3_server) -> str:
    """A fresh, empty bucket on the loopback S3 server: ``"s3://BUCKET"``."""
    return s3_server.bucket()


@pytest.fixture(autouse=True)
def _local_ray_up(request):
    """A test that uses ``local_ray`` gets it up: a test before may have shut it down (every
    stage run in-process ends with ``ray_backend.shutdown()``), and Ray's auto-init would start
    one without Tapir's settings (its HOME and auth token), which fails to start."""
    if "local_ray" in request.fixturenames:
        from pipeline import ray_backend

        ray_backend.init(num_cpus=2)
    yield


@pytest.fixture(scope="session")
def local_ray(s3_server):
    """Ray in this process for the session; started after the S3 server, so its workers see the endpoint."""
    from pipeline import ray_backend

    ray_backend.init(num_cpus=2)
    yield
    ray_backend.shutdown()


FAST = [
    "download.fetch.allow_loopback=true", "download.timeout=2", "download.fetch.read_deadline=3",
    "download.fetch.max_bytes=2000000", "download.retry_wait=0", "download.samples_per_shard=25",
    "download.threads=16", "download.image_size=64", "input.preset=laion",
]


def make_config(output, url_list, *overrides):
    from pipeline.config import load_config

    return load_config(None, [f"output={output}", f"input.path={url_list}", *FAST, *overrides])


def tapir_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]
