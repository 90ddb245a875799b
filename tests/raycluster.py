"""A real multi-node Ray cluster on this machine for the tests: ``ray start`` head and worker nodes.

Every node has a loopback address of its own (the head 127.0.0.2, worker node N 127.0.0.N+2) and a temporary folder of its own (``--temp-dir``), so its
processes (raylet, agents, workers) are found by that folder in their command lines: a test
kills one node (SIGKILL to each of its processes, as a lost machine) without touching the
other nodes or any other Ray on the machine (``ray stop`` would stop them all).

Network hygiene as pipeline/ray_backend.py: HOME holds an empty ray_bootstrap_config.yaml (no
cloud metadata probe) and Ray's auth token; usage stats off, the report URL on a closed
loopback port; the socket guard rides along on PYTHONPATH. Token authentication is on
(``RAY_AUTH_MODE=token``, a token of the test's own): a driver needs :meth:`LocalCluster.env` to connect.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psutil

from s3server import free_port

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP = "127.0.0.2"


class LocalCluster:
    """``with LocalCluster() as c: c.add_worker(); ... c.kill(node)``; every process ends on exit."""

    def __init__(self, cpus_per_node: int = 1):
        self.root = Path(tempfile.mkdtemp(prefix="trc-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        self.home = self.root / "home"
        self.home.mkdir()
        (self.home / "ray_bootstrap_config.yaml").write_text("{}\n")
        self.cpus = cpus_per_node
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.nodes: list[Path] = []
        self.token = uuid.uuid4().hex + uuid.uuid4().hex  # the cluster's auth token, for nodes and drivers

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for the nodes and for drivers that join the cluster."""
        return {**os.environ, "HOME": str(self.home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/", "RAY_DEDUP_LOGS": "0",
                # a lost node is declared dead in a few seconds, not the default tens
                "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3", **extra}

    def _start(self, args: list[str], ip: str, **env: str) -> Path:
        temp = self.root / f"n{len(self.nodes)}"
        cmd = [RAY, "start", "--node-ip-address", ip, "--num-cpus", str(self.cpus), "--num-gpus", "0",
               "--temp-dir", str(temp), "--disable-usage-stats", *args]
        self.nodes.append(temp)  # before it starts: whatever it left is stopped on exit
        try:
            proc = subprocess.run(cmd, env=self.env(**env), capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{' '.join(cmd)} hung:\n{e.stdout}\n{e.stderr}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return temp

    def __enter__(self) -> "LocalCluster":
        # Ray swaps 127.0.0.1 (and localhost) for the machine's routable address; other loopback
        # addresses it leaves alone: the head is 127.0.0.2, worker node N 127.0.0.N+2
        self._start(["--head", "--port", str(self.port), "--include-dashboard", "false"], HEAD_IP)
        return self

    def add_worker(self, **env: str) -> Path:
        """Start a worker node (``env``: extra environment its workers inherit); its temp folder names it."""
        node = self._start(["--address", self.address], f"127.0.0.{len(self.nodes) + 2}", **env)
        self.wait_for_nodes(len(self.alive()))
        return node

    def alive(self) -> list[Path]:
        return [n for n in self.nodes if self.processes(n)]

    def wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        code = ("import ray, time; ray.init(address='auto', logging_level='ERROR');"
                f"d = time.time() + {timeout};"
                f"exec('while len([n for n in ray.nodes() if n[\"Alive\"]]) < {count} and time.time() < d: "
                "time.sleep(0.5)')")
        subprocess.run([sys.executable, "-c", code], env=self.env(RAY_ADDRESS=self.address), timeout=timeout + 60,
                       capture_output=True)

    def processes(self, node: Path) -> list[psutil.Process]:
        """The processes of one node: those whose command line names its temp folder, and their children."""
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if str(node) in " ".join(p.info["cmdline"] or ()):
                    found[p.pid] = p
                    found.update({c.pid: c for c in p.children(recursive=True)})
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def kill(self, node: Path) -> int:
        """SIGKILL every process of ``node`` (a machine lost); how many there were."""
        procs = self.processes(node)
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        return len(procs)

    def __exit__(self, *exc) -> None:
        for node in reversed(self.nodes):
            self.kill(node)
        shutil.rmtree(self.root, ignore_errors=True)
