"""An S3-compatible server on loopback for the tests: moto in server mode, in a subprocess.

:class:`S3Server` starts ``python -m moto.server -H 127.0.0.1 -p PORT`` on a free port, waits
until it answers, and points this process's environment at it (``AWS_ENDPOINT_URL``, fake
keys, a region, no EC2 metadata lookups), so s3fs, boto3, CLI subprocesses and Ray workers
(``pipeline.storage.worker_env``) all reach it. :meth:`S3Server.bucket` creates a fresh bucket
and returns its ``s3://`` URL.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # botocore never probes 169.254.169.254 for credentials
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on 127.0.0.1 (context manager; restores the environment on exit)."""

    def __init__(self, start_timeout: float = 60.0):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._old_env: dict[str, str | None] = {}

    def __enter__(self) -> "S3Server":
        env = {**os.environ, **ENV}
        # moto logs every request: to a file, never a pipe nobody drains
        self.log = tempfile.NamedTemporaryFile(prefix="tapir-moto-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not answer on {self.endpoint} in {self.start_timeout}s")
                time.sleep(0.2)
        values = {**ENV, "AWS_ENDPOINT_URL": self.endpoint}
        self._old_env = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        return self

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name unless given); its ``s3://`` URL."""
        import boto3

        name = name or f"tapir-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name=ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()
            os.unlink(self.log.name)
            self.log = None

    def log_tail(self, chars: int = 2000) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-chars:]

    def __exit__(self, *exc) -> None:
        self.stop()
        for k, v in self._old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
