"""Live metrics of a running stage: JSON lines in ``FOLDER/_metrics.jsonl``, beside the progress bar.

The Ray runners (:func:`pipeline.ray_backend.run_tasks`, ``run_actor_pool``) hand every
finished item to a :class:`StageMetrics`; every ``every`` seconds, and when the runner ends,
it appends one line::

    {"time": ..., "stage": "score", "run": "20261201-101500-ab12", "elapsed_s": 12.5, "final": false,
     "shards": 7, "failed_shards": 1, "rows": 700, "ok": 655, "rows_per_s": 56.0,
     "recent_rows_per_s": 61.2, "success_rate": 0.936, "errors": {"timeout": 30, ...},
     "nodes": {"5f3a...": {"ip": "10.0.0.4", "shards": 4, "rows": 400, "ok": 390, "rows_per_s": 32.0}}}

Rows, successes and the error mix come from the stage's ``summarize(result)`` (``{"rows": n,
"ok": n_ok, "errors": {reason: n}}``); without it an item counts ``weight`` rows, all ok. A
failed item counts its weight as rows, none ok, under its exception's reason. Memory is
bounded: counters, at most ``MAX_REASONS`` error reasons (the rest as "other").

Read it while the stage runs: ``tail -f RUN/scores/_metrics.jsonl | jq -c '{rows_per_s, success_rate}'``,
or ``pandas.read_json(path, lines=True)``. On an object store, which cannot append, the file is
rewritten whole at every line (one PUT; a line every ``every`` seconds keeps it small).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from typing import Any, Callable

from pipeline import storage

log = logging.getLogger(__name__)

FILE = "_metrics.jsonl"
MAX_REASONS = 50


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:120]}" if lines else type(err).__name__


class StageMetrics:
    """Counts a stage's results as they arrive and appends a JSON line every ``every`` seconds."""

    def __init__(self, folder, stage: str, summarize: Callable[[Any], dict] | None = None, every: float = 5.0):
        self.path = storage.path(folder) / FILE
        self.stage, self.summarize, self.every = stage, summarize, every
        self.run = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
        self.start = self.last = time.time()
        self.rows = self.ok = self.shards = self.failed = 0
        self.last_rows = 0
        self.errors: Counter = Counter()
        self.nodes: dict[str, dict] = {}
        self._remote_text: str | None = None  # an object store's file as it is (rewritten whole)

    def record(self, item: Any, result: Any, node: str | None, weight: int = 1, ip: str | None = None) -> None:
        """Count one finished item (its result, or the exception it failed with)."""
        if isinstance(result, BaseException):
            rows, ok, errors = weight, 0, {_reason(result): weight}
            self.failed += 1
        elif self.summarize is not None:
            s = self.summarize(result) or {}
            rows, ok, errors = int(s.get("rows", weight)), int(s.get("ok", s.get("rows", weight))), s.get("errors", {})
        else:
            rows, ok, errors = weight, weight, {}
        self.shards += 1
        self.rows += rows
        self.ok += ok
        for reason, n in errors.items():
            if n:
                key = str(reason) if str(reason) in self.errors or len(self.errors) < MAX_REASONS else "other"
                self.errors[key] += int(n)
        if node:
            entry = self.nodes.setdefault(node, {"ip": ip, "shards": 0, "rows": 0, "ok": 0})
            entry["shards"] += 1
            entry["rows"] += rows
            entry["ok"] += ok

    def line(self, final: bool = False) -> dict:
        now = time.time()
        elapsed = max(now - self.start, 1e-9)
        recent = (self.rows - self.last_rows) / max(now - self.last, 1e-9)
        return {
            "time": round(now, 3), "stage": self.stage, "run": self.run, "elapsed_s": round(elapsed, 2),
            "final": final, "shards": self.shards, "failed_shards": self.failed, "rows": self.rows, "ok": self.ok,
            "rows_per_s": round(self.rows / elapsed, 3), "recent_rows_per_s": round(recent, 3),
            "success_rate": round(self.ok / self.rows, 4) if self.rows else None,
            "errors": dict(self.errors.most_common()),
            "nodes": {node: {**v, "rows_per_s": round(v["rows"] / elapsed, 3)} for node, v in self.nodes.items()},
        }

    def postfix(self) -> str:
        """A short summary for the progress bar."""
        rate = f", ok {self.ok / self.rows:.1%}" if self.rows else ""
        return f"{self.rows / max(time.time() - self.start, 1e-9):.1f} rows/s{rate}, {len(self.nodes)} node(s)"

    def tick(self) -> None:
        """Write a line when ``every`` seconds have passed since the last."""
        if time.time() - self.last >= self.every:
            self.write()

    def close(self) -> None:
        """The stage's runner ended: a final line (counts go on if the stage runs another pool)."""
        self.write(final=True)

    def write(self, final: bool = False) -> None:
        text = json.dumps(self.line(final), sort_keys=True) + "\n"
        self.last, self.last_rows = time.time(), self.rows
        try:
            if storage.is_remote(self.path):
                if self._remote_text is None:
                    self._remote_text = self.path.read_text() if self.path.exists() else ""
                self._remote_text += text
                self.path.write_text(self._remote_text)
            else:
                os.makedirs(self.path.parent, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(text)
        except OSError as err:  # metrics never stop a stage
            log.warning("%s: cannot write metrics to %s: %s", self.stage, self.path, err)


def read(folder) -> list[dict]:
    """Every line of ``FOLDER/_metrics.jsonl`` (all runs), oldest first."""
    path = storage.path(folder) / FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
