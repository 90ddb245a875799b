"""The build plan: which kept row goes to which output shard, from per-shard records.

The driver never lists a key. It reads each selection shard's completion record (``kept``:
rows kept, ``kept_digest``: digest of their keys, written at commit time by ``tapir select``)
and cuts the kept rows, in (source shard, key) order, into output shards of ``per_shard``
rows each: output shard ``k`` holds global rows ``[k * per_shard, (k + 1) * per_shard)``,
which :meth:`Plan.slices` turns into (source shard, start, stop) ranges of each source's
sorted kept keys. The build task of an output shard reads those keys itself
(:func:`planned_rows`) and checks them against the record.

``per_shard`` is ``build.samples_per_shard``, lowered so that ``per_shard`` of the largest
planned sample fit ``build.max_shard_bytes``. The largest sample of each source shard is
measured by a task (tar headers and image sizes: :func:`source_size`) and cached in
``shards/_sizes/NNNNN.json`` under the digests it was measured from, so a resumed build
measures nothing again. The plan (``shards/_plan.json``) is a list of (source, kept) pairs:
memory is one integer pair per source shard.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from pipeline import shards, storage
from pipeline.config import BuildConfig, RunConfig
from pipeline.schemas import IMAGE_MEMBERS, RECORD_KEPT, RECORD_KEPT_DIGEST, kept_digest, target_sizes

log = logging.getLogger(__name__)

PLAN_FILE = "_plan.json"
SIZES = "_sizes"
NPY_HEADER = 128  # bytes before the data in a .npy member
TEXT_MEMBERS, TEXT_BYTES = 5, 500  # txt, alt.txt, short.txt, descriptive.txt, json: planned size each
TAR_END = 10240  # end-of-archive blocks, padded to tarfile's record size


class BuildError(ValueError):
    """The shards folder cannot be built into as asked (mixed plans, encoders or inputs)."""


@dataclass
class Plan:
    """Output shards cut from the kept rows of each source shard (see the module's doc)."""

    sources: list[tuple[int, int]]  # (source shard, kept rows), in shard order, kept > 0
    per_shard: int
    sample_bytes: int = 0  # the largest planned sample, bytes
    _offsets: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self):
        self.sources = [(int(s), int(n)) for s, n in self.sources]
        self._offsets = [0, *itertools.accumulate(n for _, n in self.sources)]

    @property
    def samples(self) -> int:
        return self._offsets[-1]

    @property
    def shards(self) -> int:
        return -(-self.samples // self.per_shard)

    def count(self, shard: int) -> int:
        return max(0, min(self.per_shard, self.samples - shard * self.per_shard))

    def slices(self, shard: int) -> list[tuple[int, int, int]]:
        """(source shard, start, stop): output shard ``shard``'s ranges of its sources' sorted kept keys."""
        lo, hi = shard * self.per_shard, min(self.samples, (shard + 1) * self.per_shard)
        out = []
        i = bisect.bisect_right(self._offsets, lo) - 1
        while lo < hi and i < len(self.sources):
            start, stop = self._offsets[i], self._offsets[i + 1]
            take = min(hi, stop)
            if take > lo:
                out.append((self.sources[i][0], lo - start, take - start))
            lo, i = max(lo, take), i + 1
        return out

    def to_json(self) -> str:
        return json.dumps({"shards": self.shards, "samples": self.samples, "per_shard": self.per_shard,
                           "sample_bytes": self.sample_bytes, "sources": [list(s) for s in self.sources]})

    @classmethod
    def load(cls, folder) -> "Plan":
        data = json.loads((storage.path(folder) / PLAN_FILE).read_text())
        return cls([tuple(s) for s in data["sources"]], data["per_shard"], data.get("sample_bytes", 0))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in log aspect ratio (ties: the larger one)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def _in_tar(n: int) -> int:
    """Bytes a member of n bytes takes in a tar: a 512-byte header, data padded to 512."""
    return 512 + -(-n // 512) * 512


def sample_bytes(b: BuildConfig, infos: dict, size: tuple[int, int], image_bytes: int) -> int:
    """Planned bytes of one sample in a tar: the image, exact array sizes (the pooled text
    vector taken as wide as the hidden states), and the text members (4 captions and the
    json record) at one block each, headers included."""
    from pipeline.encoders import smallest_uint

    w, h = size
    item = np.dtype(b.latent_dtype).itemsize
    arrays = []
    if "kl" in infos:
        f, c = infos["kl"]["factor"], infos["kl"]["channels"]
        arrays += [c * (h // f) * (w // f) * item] * (2 if b.vae.store == "mean_std" else 1)
    if "vq" in infos:
        f = infos["vq"]["factor"]
        arrays.append((h // f) * (w // f) * smallest_uint(infos["vq"]["codebook_size"]).itemsize)
    arrays *= 2 if b.flip else 1
    if "text" in infos:
        dim = infos["text"]["dim"]
        per_kind = [b.text.max_length * dim * item, b.text.max_length] + ([dim * item] if b.text.pooled else [])
        arrays += per_kind * len(b.text.captions)
    total = sum(_in_tar(NPY_HEADER + n) for n in arrays) + TEXT_MEMBERS * _in_tar(TEXT_BYTES)
    return total + (_in_tar(image_bytes) if b.keep_image else 0)


def _member_sizes(tar_path) -> dict[str, int]:
    """Image bytes per key from the tar headers alone (an unsafe member raises UnsafeTar here,
    before any work)."""
    sizes: dict[str, int] = {}
    with storage.open_read(tar_path) as f, tarfile.open(fileobj=f, mode="r") as tar:
        for m in shards.safe_members(tar, tar_path):
            key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
            if ext in IMAGE_MEMBERS:
                sizes[key] = m.size
    return sizes


def source_files(cfg: RunConfig, source: int) -> tuple:
    """The raw tar and metadata of a source shard; BuildError when either is missing."""
    tar, meta = (shards.shard_file(cfg.score_input, source, s) for s in (".tar", ".parquet"))
    for path in (tar, meta):
        if not path.exists():
            raise BuildError(f"{storage.url(path)} is missing, but {storage.url(cfg.selection_dir)} keeps rows of "
                             f"shard {shards.shard_name(source)}: was raw/ (or score.input) moved or partly deleted? "
                             "rerun `tapir download`")
    return tar, meta


def kept_keys(cfg: RunConfig, source: int) -> list[str]:
    """The kept keys of one selection shard, sorted, checked against its completion record (a
    parquet changed behind its record would make the plan and the fingerprints lie)."""
    sel = storage.read_parquet(shards.shard_file(cfg.selection_dir, source, ".parquet"), columns=["key", "keep"])
    keys = sorted(sel.filter(pc.equal(sel["keep"], True))["key"].to_pylist())
    record = shards.read_stats(cfg.selection_dir, source)
    want = record.get(RECORD_KEPT_DIGEST)
    if record.get(RECORD_KEPT, len(keys)) != len(keys) or (want and want != kept_digest(keys)):
        raise BuildError(f"selection/{shards.shard_name(source)}.parquet keeps {len(keys)} rows, which is not what "
                         f"its completion record says ({record.get(RECORD_KEPT)} rows, kept_digest); it changed "
                         "after `tapir select` committed it: rerun `tapir select`")
    return keys


def planned_rows(cfg: RunConfig, infos: dict, source: int) -> list[dict]:
    """Every kept row of one source shard in key order: its training size (bucket) and planned
    bytes. Runs in tasks and build actors (one shard's rows), never over the dataset."""
    b, sizes = cfg.build, target_sizes(cfg.build)
    square = nearest_bucket(1, 1, sizes)
    keys = kept_keys(cfg, source)
    if not keys:
        return []
    tar, meta_path = source_files(cfg, source)
    dims: dict = {}
    if {"width", "height"} <= set(storage.read_schema(meta_path).names):
        meta = storage.read_parquet(meta_path, columns=["key", "width", "height"])
        dims = dict(zip(meta["key"].to_pylist(), zip(meta["width"].to_pylist(), meta["height"].to_pylist())))
    image_sizes = _member_sizes(tar)
    rows = []
    for key in keys:
        w, h = dims.get(key, (None, None))
        size = nearest_bucket(w, h, sizes) if w and h else square  # unknown size: the squarest
        image = image_sizes.get(key, 0)
        if w and h:  # the stored image is the crop at the training size: scale the download's bytes
            image = int(image * size[0] * size[1] / (w * h))
        rows.append({"key": key, "source": source, "width": size[0], "height": size[1],
                     "est_bytes": sample_bytes(b, infos, size, image)})
    return rows


SIZE_EXCLUDE = ("actors", "decode_threads", "output", "batch_size", "device", "precision", "samples_per_shard",
                "max_shard_bytes", "txt_caption", "image_quality")


def _size_key(cfg: RunConfig, infos: dict, source: int, digests: dict) -> str:
    settings = shards.settings_of(cfg.build, "build", SIZE_EXCLUDE)
    settings["infos"] = {k: {f: v.get(f) for f in ("factor", "channels", "codebook_size", "dim")}
                         for k, v in sorted(infos.items())}
    skip = (f"{storage.path(cfg.captions_dir).name}/", f"{storage.path(cfg.scores_dir).name}/")
    upstream = {k: v for k, v in digests.items() if not k.startswith(skip)}  # sizes: selection and raw only
    return shards.fingerprint(settings, upstream)["hash"]


def source_size(item: tuple) -> dict:
    """A Ray task: the kept rows and largest planned sample of one source shard."""
    config, infos, source = item
    rows = planned_rows(RunConfig.model_validate(config), infos, source)
    return {"kept": len(rows), "max_bytes": max((r["est_bytes"] for r in rows), default=0)}


def _largest_samples(cfg: RunConfig, infos: dict, sources: list[int], digests) -> int:
    """The largest planned sample over ``sources``: from the size cache, else measured by tasks."""
    b = cfg.build
    if not b.keep_image:  # every member's size is known from the settings
        return max(sample_bytes(b, infos, size, 0) for size in target_sizes(b))
    folder = storage.path(cfg.shards_dir) / SIZES
    largest, todo = 0, []

    def cached(source: int):
        key = _size_key(cfg, infos, source, digests(source))
        path = folder / f"{shards.shard_name(source)}.json"
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return source, key, None
        return source, key, data["max_bytes"] if data.get("key") == key else None

    with ThreadPoolExecutor(16) as pool:
        for source, key, size in pool.map(cached, sources):
            if size is None:
                todo.append((source, key))
            else:
                largest = max(largest, size)
    if todo:
        from pipeline import ray_backend

        log.info("measuring the samples of %d source shard(s)", len(todo))
        ray_backend.init(cfg.resources.ray_address, cfg.resources.num_cpus)
        keys = dict(todo)
        if not storage.is_remote(folder):
            storage.local(folder).mkdir(parents=True, exist_ok=True)
        config = cfg.model_dump()
        for (_, _, source), result, _ in ray_backend.run_tasks(
                source_size, [(config, infos, s) for s, _ in todo], desc="plan", num_cpus=1):
            if isinstance(result, Exception):
                raise result
            shards.atomic_write(folder / f"{shards.shard_name(source)}.json",
                                json.dumps({"key": keys[source], **result}))
            largest = max(largest, result["max_bytes"])
    return largest


def make_plan(cfg: RunConfig, infos: dict, digests) -> Plan:
    """The plan from the selection's completion records (``kept``) and the largest planned
    sample (``digests``: source -> :func:`pipeline.build.source_digests`, for the size cache)."""
    b = cfg.build
    ids = sorted(shards.done_shards(cfg.selection_dir))
    with ThreadPoolExecutor(16) as pool:
        records = list(pool.map(lambda s: shards.read_stats(cfg.selection_dir, s), ids))
    sources = []
    for sid, record in zip(ids, records):
        if RECORD_KEPT not in record:
            raise BuildError(f"selection/{shards.shard_name(sid)}_stats.json records no '{RECORD_KEPT}' count "
                             "(made by an older tapir): rerun `tapir select`")
        if record[RECORD_KEPT]:
            sources.append((sid, record[RECORD_KEPT]))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda s: source_files(cfg, s[0]), sources))  # a missing raw shard stops here
    largest = _largest_samples(cfg, infos, [s for s, _ in sources], digests) if sources else 0
    per_shard = b.samples_per_shard
    if largest:
        per_shard = max(1, min(per_shard, (b.max_shard_bytes - TAR_END) // largest))
    return Plan(sources, per_shard, largest)
