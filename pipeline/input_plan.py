"""Download shards planned as the inputs are read: never the whole input in one place.

Inputs are walked in order (the run's input sections, each one's files sorted by name, each
file's rows in order) and cut into shards of ``download.samples_per_shard`` rows; a shard
never spans two inputs, so it has one ``source``, and shard ids run on across inputs, so
keys never collide. Each shard is written just before it is handed out:

- ``raw/_input/NNNNN.parquet``: its rows (``url``, ``caption``, ``source``, carried columns);
- ``raw/_input/NNNNN.json``: its plan record, written after the rows: its pieces (file, first
  row, end row), the digest of its rows file, the rows planned up to it and the *cursor*
  (input, file, row) after it, and the files whose end it reached.

A rerun first hands out the planned shards not yet done, then continues from the last
record's cursor, reading only from that file's row on (a parquet file skips whole row groups).
``raw/_input/input.json`` holds the plan's generation: the inputs' fingerprint (settings and
every file's size and time), where the generation starts (first shard, each file's first
row) and, once the inputs are read to the end, each file's row count. ``extend`` starts a
new generation from those counts: new files, and rows appended to old ones, become new
shards after the existing ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shards, storage
from pipeline.config import ConfigError
from pipeline.inputs import InputError, _key, input_files, read_file, sections, source_fingerprint

log = logging.getLogger(__name__)


def rows_path(raw, sid: int, digits: int):
    return storage.path(raw) / "_input" / f"{shards.shard_name(sid, digits)}.parquet"


def record_path(raw, sid: int, digits: int):
    return storage.path(raw) / "_input" / f"{shards.shard_name(sid, digits)}.json"


def planned_ids(raw) -> list[int]:
    """Shard ids with a plan record."""
    folder = storage.path(raw) / "_input"
    return sorted(int(p.name[:-5]) for p in folder.glob("*.json") if re.fullmatch(r"\d+\.json", p.name))


def read_record(raw, sid: int, digits: int) -> dict:
    return json.loads(record_path(raw, sid, digits).read_text())


def wipe(raw) -> None:
    """Remove the plan (rows files, records, input.json): the inputs are planned again."""
    folder = storage.path(raw) / "_input"
    if not folder.exists():
        return
    for p in list(folder.iterdir()):
        if p.is_file():
            p.unlink(missing_ok=True)
        elif storage.is_remote(p):
            p.fs.rm(p.path, recursive=True)
        else:
            import shutil

            shutil.rmtree(p, ignore_errors=True)


@dataclass
class Shard:
    """One planned shard: id, source, rows and the digest of its rows file."""

    sid: int
    source: str
    rows: int
    digest: str
    new: bool = False  # planned by this run (False: read back from an earlier run's record)


@dataclass
class Planner:
    """Cuts the inputs into shards lazily (see the module doc).

    ``info`` is the generation (input.json's content, written back when the walk ends);
    ``download.limit`` and ``download.max_shards`` stop the plan early (rows and shards in
    raw/ in all): a later run continues from the cursor."""

    cfg: object  # RunConfig
    info: dict
    digits: int

    @property
    def raw(self):
        return self.cfg.raw_dir

    def shards(self, done: set[int]) -> Iterator[Shard]:
        """Shards to download: those planned by earlier runs and not ``done``, then new ones (done or not)."""
        raw, d = self.raw, self.digits
        planned = planned_ids(raw)
        for sid in planned:
            if sid not in done:
                rec = read_record(raw, sid, d)
                yield Shard(sid, rec["source"], rec["rows"], rec["digest"])
        if not self.info.get("complete"):
            yield from self._plan(planned)
        shards.atomic_write(storage.path(raw) / "_input" / "input.json", json.dumps(self.info, indent=2))

    def _resume_state(self, planned: list[int]) -> tuple[tuple | None, dict, int, int]:
        """(cursor, files finished, rows planned, next shard id) where this generation stopped."""
        first = self.info["first_shard"]
        mine = [s for s in planned if s >= first]
        if not mine:
            return None, {}, self.info["rows_before"], first
        d = self.digits
        finished, last = {}, None
        with ThreadPoolExecutor(16) as pool:  # the files this generation's records saw end, and the last cursor
            for last in pool.map(lambda s: read_record(self.raw, s, d), mine):
                finished.update(last["finished"])
        return tuple(last["cursor"]), finished, last["rows_total"], mine[-1] + 1

    def _walk(self, cursor: tuple | None) -> Iterator[tuple[int, int, str, str, object, int]]:
        """(input index, file index, source, file, format, first row) of every file still to read."""
        start = self.info["start"]
        for i, (name, section) in enumerate(sections(self.cfg.input)):
            if cursor is not None and i < cursor[0]:
                continue
            for j, (path, fmt) in enumerate(input_files(section)):
                key = _key(path)
                row = start.get(key, 0)
                if cursor is not None and i == cursor[0]:
                    if j < cursor[1]:
                        continue
                    if j == cursor[1]:
                        if key != cursor[2]:  # the fingerprint matched, so the listing should too
                            raise InputError(f"input {name}: file {j} is {key}, the plan recorded {cursor[2]}")
                        row = cursor[3]
                yield i, j, name, path, (fmt, section), row

    def _plan(self, planned: list[int]) -> Iterator[Shard]:
        d, sps = self.cfg.download, self.cfg.download.samples_per_shard
        cursor, finished, total, sid = self._resume_state(planned)
        limit, max_shards = d.limit, d.max_shards
        state = {"finished_since": {}}
        buf: list[pa.Table] = []
        pieces: list[list] = []
        have, current = 0, None
        seen_rows = {}  # rows read per input in this generation (an empty first input is an error)

        def emit(source: str, where: tuple) -> Shard:
            nonlocal buf, pieces, have, total, sid
            table = pa.concat_tables(buf, promote_options="permissive")
            table = table.append_column("source", pa.array([source] * table.num_rows, pa.string()))
            shard = self._write(sid, source, table, pieces, where, total + table.num_rows, state)
            total += table.num_rows
            sid += 1
            buf, pieces, have = [], [], 0
            return shard

        stopped = False
        for i, j, source, path, (fmt, section), row in self._walk(cursor):
            if current is not None and current[0] != i and have:  # a shard never spans two inputs
                yield emit(current[1], current[:1] + current[2:])
            key = _key(path)
            current = (i, source, j, key, row)
            if self._full(total + have, sid, limit, max_shards):
                stopped = True
                break
            for table in read_file(path, fmt, section, start=row, batch_rows=sps):
                seen_rows[i] = seen_rows.get(i, 0) + table.num_rows
                while table.num_rows:
                    room = sps - have
                    if limit is not None:
                        room = min(room, limit - total - have)
                    take = table.slice(0, room)
                    buf.append(take)
                    pieces.append([key, row, row + take.num_rows])
                    have, row, table = have + take.num_rows, row + take.num_rows, table.slice(room)
                    current = (i, source, j, key, row)
                    if have == sps or (limit is not None and total + have >= limit):
                        yield emit(source, (i, j, key, row))
                        if self._full(total, sid, limit, max_shards):
                            stopped = True
                            break
                if stopped:
                    break
            if stopped:
                break
            state["finished_since"][key] = finished[key] = row
        else:
            if have:
                yield emit(current[1], current[:1] + current[2:])
        if not stopped:
            if self.info["generation"] == 0 and total == 0:
                raise InputError(f"input {self._describe()} holds no rows: nothing to download")
            for i, (name, _) in enumerate(sections(self.cfg.input)):
                if self.info["generation"] == 0 and cursor is None and not seen_rows.get(i):
                    log.warning("input %s (%s) holds no rows", name, self._describe(i))
            end = dict(self.info["start"]) | finished
            self.info.update(complete=True, end=end)
        self.info.update(rows=total, next_shard=sid)

    def _describe(self, i: int = 0) -> str:
        section = sections(self.cfg.input)[i][1]
        return section.path if isinstance(section.path, str) else ", ".join(section.path)

    @staticmethod
    def _full(rows: int, sid: int, limit, max_shards) -> bool:
        return (limit is not None and rows >= limit) or (max_shards is not None and sid >= max_shards)

    def _write(self, sid: int, source: str, table: pa.Table, pieces: list, cursor: tuple, rows_total: int,
               state: dict) -> Shard:
        """Write a shard's rows, then its plan record (the record says the shard is planned)."""
        sink = io.BytesIO()
        pq.write_table(table, sink)
        data = sink.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        shards.atomic_write(rows_path(self.raw, sid, self.digits), data)
        record = {"shard": sid, "source": source, "rows": table.num_rows, "digest": digest, "pieces": pieces,
                  "cursor": list(cursor), "rows_total": rows_total, "finished": state["finished_since"],
                  "generation": self.info["generation"]}
        shards.atomic_write(record_path(self.raw, sid, self.digits), json.dumps(record))
        state["finished_since"] = {}
        return Shard(sid, source, table.num_rows, digest, new=True)


def new_generation(cfg, fingerprint: dict, previous: dict | None, extend: bool) -> dict:
    """input.json of a new plan generation: the first (``previous`` None or not extended) or,
    with ``extend``, one that starts where the previous, complete one ended."""
    if not extend or previous is None:
        return {"fingerprint": fingerprint, "generation": 0, "first_shard": 0, "start": {}, "rows_before": 0,
                "complete": False, "rows": 0}
    old_fp = previous.get("fingerprint") or {}
    if old_fp.get("settings") != fingerprint["settings"]:
        raise shards.StageChanged(f"download --extend: the input settings changed: "
                                  f"{shards.explain_change(old_fp, fingerprint)}; extend adds rows, it does not "
                                  f"reread them (use --redo)")
    if not previous.get("complete"):
        raise shards.StageChanged("download --extend: the previous run did not plan its inputs to the end (a --limit "
                                  "or --max-shards, or it was stopped); finish it with the inputs it had first")
    end = previous["end"]
    gone = sorted(set(end) - set(fingerprint["upstream"]))
    if gone:
        raise InputError(f"download --extend: input file {gone[0]} is gone; extend only adds rows (use --redo)")
    return {"fingerprint": fingerprint, "generation": previous["generation"] + 1,
            "first_shard": previous["next_shard"], "start": end, "rows_before": previous["rows"],
            "complete": False, "rows": previous["rows"]}


def plan_fingerprint(cfg) -> dict:
    """The inputs' fingerprint plus the settings that cut shards."""
    return source_fingerprint(cfg.input, {"download.samples_per_shard": cfg.download.samples_per_shard,
                                          "download.shard_digits": cfg.download.shard_digits})


def declare_digits(cfg) -> None:
    """Name raw/'s shards with ``download.shard_digits`` digits from the first commit on."""
    shards.set_digits(cfg.raw_dir, cfg.download.shard_digits)


# -- what made raw/: settings and input -----------------------------------------------------

# Download settings that change how fast or how much, not what: left out of the fingerprint.
_NOT_OUTPUT = ("threads", "timeout", "retries", "retry_passes", "retry_wait", "shard_timeout", "limit",
               "max_shards", "extend")


def download_settings(cfg) -> dict:
    """The download settings that shape a shard's rows and bytes, as dotted keys."""
    settings = shards.settings_of(cfg.download, "download", exclude=_NOT_OUTPUT)
    settings.pop("download.fetch.read_deadline", None)  # a deadline, like the timeouts
    return settings


def shard_fingerprint(settings: dict, sid: int, digest: str, digits: int) -> dict:
    """A shard's fingerprint: the download settings and the digest of its planned rows."""
    return shards.fingerprint(settings, {f"raw/_input/{shards.shard_name(sid, digits)}.parquet": digest})


def _remove_shard(raw, sid: int) -> None:
    for suffix in (".tar", ".parquet", "_failed.json", "_stats.json"):
        shards.shard_file(raw, sid, suffix).unlink(missing_ok=True)


def prepare(cfg) -> Planner:
    """Check what raw/ holds against the settings and the inputs, and return the planner.

    Committed shards made with other settings, or from another input (unless ``extend`` adds
    rows to it), raise :class:`shards.StageChanged`; with ``cfg.redo`` they are redone."""
    if not sections(cfg.input):
        raise ConfigError("download needs an input section (input.path: the URL list)")
    raw, d = cfg.raw_dir, cfg.download
    settings = download_settings(cfg)

    def recorded(sid):  # the settings now, with the rows the shard was made from
        return shards.fingerprint(settings, (shards.read_stats(raw, sid).get("fingerprint") or {}).get("upstream"))

    for sid in shards.stale_shards(raw, recorded, redo=cfg.redo, stage="download"):
        _remove_shard(raw, sid)
    done = shards.done_shards(raw)
    if not done:
        declare_digits(cfg)
    elif shards.digits(raw) != d.shard_digits:
        raise ConfigError(f"download.shard_digits is {d.shard_digits}, but {raw} names its shards with "
                          f"{shards.digits(raw)} digits")
    fingerprint = plan_fingerprint(cfg)
    info_path = storage.path(raw) / "_input" / "input.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else None
    if info is not None and (info.get("fingerprint") or {}).get("hash") == fingerprint["hash"]:
        pass  # the same inputs: resume the plan where it stopped
    elif info is not None and d.extend:
        info = new_generation(cfg, fingerprint, info, extend=True)
    elif info is not None and done and not cfg.redo:
        raise shards.StageChanged(
            f"download: {raw} was made from another input: {shards.explain_change(info.get('fingerprint'), fingerprint)}"
            f". Rerun with --extend to download only rows added since, with --redo to read the input again and redo "
            f"the shards it changes, or use another output folder")
    else:
        wipe(raw)
        info = new_generation(cfg, fingerprint, None, extend=False)
    (storage.path(raw) / "_input").mkdir(parents=True, exist_ok=True)
    shards.atomic_write(info_path, json.dumps(info, indent=2))
    shards.atomic_write(storage.path(raw) / "config.json", cfg.model_dump_json(indent=2))  # it matches raw/
    return Planner(cfg, info, d.shard_digits)


def jobs(cfg, planner: Planner) -> Iterator[tuple[int, str, str, int]]:
    """(shard id, 'first', rows digest, rows) of every planned shard to download, planned lazily.
    A newly planned shard already committed from the same rows is skipped; from other rows it
    raises :class:`shards.StageChanged`, or with ``cfg.redo`` is redone."""
    raw, digits = cfg.raw_dir, cfg.download.shard_digits
    settings = download_settings(cfg)
    done = shards.done_shards(raw)
    for shard in planner.shards(done):
        if shard.sid in done:
            have = shards.read_stats(raw, shard.sid).get("fingerprint") or {}
            want = shard_fingerprint(settings, shard.sid, shard.digest, digits)
            if have.get("hash") == want["hash"]:
                continue
            if not cfg.redo:
                raise shards.StageChanged(
                    f"download: {raw} holds shard {shards.shard_name(shard.sid, digits)} made differently: "
                    f"{shards.explain_change(have, want)}. Rerun with --redo to redo the affected shards")
            _remove_shard(raw, shard.sid)
        yield shard.sid, "first", shard.digest, shard.rows
    if planner.info.get("complete"):  # shards past the plan's end were planned from an older input
        end = planner.info["next_shard"]
        for sid in sorted(set(shards.done_shards(raw)) | set(shards.failed_shards(raw))):
            if sid >= end:
                _remove_shard(raw, sid)
