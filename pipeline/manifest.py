"""``shards/manifest.json``: what a set of training shards holds and what encoded it, and
``tapir verify``, which checks every shard against it.

The manifest records the encoders (id, subfolder, class, config and weights hashes, a
fingerprint, scaling and shift factors, latent channels, downsampling factor, stored
dtype), the image settings (resolution or buckets, flip), the members every sample has,
sample and byte counts, the caption kinds written as ``txt`` and why a sample fell back from
``build.txt_caption`` (``captions.used``), how the json member stores unsigned 64-bit values
(``json.uint64``), and one entry per shard with its sample count, size and sha256. Trainers call :func:`check_encoder` and refuse shards whose fingerprint is not their
autoencoder's.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import uuid
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards, storage
from pipeline.schemas import JSON_UINT64, MANIFEST, MANIFEST_FORMAT, target_sizes

FORMAT, NAME = MANIFEST_FORMAT, MANIFEST


class FingerprintMismatch(ValueError):
    """Shards were encoded by another model than the one a run uses."""


def _version() -> str:
    try:
        return version("tapir")
    except PackageNotFoundError:
        return "unknown"


def write(folder, build, planned: int) -> dict:
    """Gather the committed shards' records into ``manifest.json`` (written aside, renamed; one PUT
    on an object store). Holds one small entry per shard, never a row."""
    folder = storage.path(folder)
    done = sorted(shards.done_shards(folder))
    stats = {sid: shards.read_stats(folder, sid) for sid in done}
    encoders: dict = {}
    for sid, s in stats.items():
        for kind, info in s["encoders"].items():
            seen = encoders.setdefault(kind, {**info, "first_shard": sid})
            if seen["fingerprint"] != info["fingerprint"]:
                raise FingerprintMismatch(
                    f"shard {shards.shard_name(sid)} was encoded by {kind} {info['model']} (fingerprint "
                    f"{info['fingerprint'][:12]}) but shard {shards.shard_name(seen['first_shard'])} by "
                    f"{seen['model']} ({seen['fingerprint'][:12]}); remove {folder} and rebuild")
    for info in encoders.values():
        info.pop("first_shard")
    buckets: dict[str, int] = {}
    failed: dict[str, int] = {}
    for s in stats.values():
        for b, n in s["buckets"].items():
            buckets[b] = buckets.get(b, 0) + n
        for reason in s["failed"].values():
            r = reason.split(":")[0]
            failed[r] = failed.get(r, 0) + 1
    used: dict[str, dict[str, int]] = {"txt": {}, "fallback": {}}  # caption kinds written as txt, and why not
    for s in stats.values():  # the configured kind (build.txt_caption)
        for part, counts in s.get("captions", {}).items():
            for k, n in counts.items():
                used[part][k] = used[part].get(k, 0) + n
    members = sorted({m for s in stats.values() for m in s["members"]})
    combined = hashlib.sha256(json.dumps({k: v["fingerprint"] for k, v in sorted(encoders.items())},
                                         sort_keys=True).encode()).hexdigest()
    data = {
        "format": FORMAT, "tapir_version": _version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": combined, "encoders": encoders,
        "image": {"resolution": build.resolution, "crop": build.crop,
                  "buckets": [list(b) for b in target_sizes(build)], "flip": build.flip,
                  "keep_image": build.keep_image, "format": build.image_format if build.keep_image else None},
        "captions": {"txt": build.txt_caption, "used": used,
                     "text_embedding": list(build.text.captions) if build.text.model else None},
        "json": {"uint64": JSON_UINT64},
        "members": members, "samples": sum(s["count"] for s in stats.values()),
        "bytes": sum(s["bytes"] for s in stats.values()), "failed": failed, "buckets": buckets,
        "planned_shards": planned, "complete": len(done) == planned,
        "shards": [{"name": f"{shards.shard_name(sid)}.tar", "samples": s["count"], "bytes": s["bytes"],
                    "sha256": s["sha256"]} for sid, s in stats.items() if s["count"]],
    }
    shards.atomic_write(folder / NAME, json.dumps(data, indent=2, sort_keys=True))
    return data


def load(folder) -> dict:
    path = storage.path(folder) / NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a tapir shards folder (run `tapir build`)")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {data.get('format')!r} (expected {FORMAT})")
    return data


def check_encoder(folder: Path, kind: str, model, name: str = "") -> dict:
    """Raise FingerprintMismatch, naming the first shard concerned, unless ``model`` (a loaded
    AutoencoderKL for kind 'kl', VQModel for 'vq') is the one that encoded every shard in
    ``folder`` (each shard's completion record, then the manifest); return the encoder's record."""
    from pipeline.encoders import fingerprint

    data = load(folder)
    recorded = data["encoders"].get(kind)
    if recorded is None:
        raise FingerprintMismatch(f"shards in {folder} hold no {kind} encodings (encoders: "
                                  f"{sorted(data['encoders']) or 'none'})")
    mine = fingerprint(model)
    records = [(f"shard {shards.shard_name(sid)}.tar in {folder} was",
                shards.read_stats(folder, sid)["encoders"].get(kind)) for sid in sorted(shards.done_shards(folder))]
    for where, rec in records + [(f"shards in {folder} were", recorded)]:
        if rec is not None and rec["fingerprint"] != mine["fingerprint"]:
            raise FingerprintMismatch(
                f"{where} encoded by {rec['class']} {rec['model']} (fingerprint {rec['fingerprint'][:12]}), but "
                f"this run decodes with {mine['class']} {name} (fingerprint {mine['fingerprint'][:12]}); train "
                "with the autoencoder that built the shards or rebuild them (the fingerprint covers the weights "
                "as loaded: load in float32 to compare)")
    return recorded


def expected_members(data: dict) -> set[str]:
    """The members every sample must have, from the manifest's image and encoder settings."""
    members = {"txt", "json", "alt.txt", "short.txt", "descriptive.txt"}
    image, enc = data["image"], data["encoders"]
    if image["keep_image"]:
        members.add(image["format"])
    for suffix in [""] + (["_flip"] if image["flip"] else []):
        if "kl" in enc:
            names = ["latent_mean", "latent_std"] if enc["kl"]["store"] == "mean_std" else ["latent"]
            members |= {f"{n}{suffix}.npy" for n in names}
        if "vq" in enc:
            members.add(f"tokens{suffix}.npy")
    if "text" in enc:
        parts = ["emb", "mask"] + (["pooled"] if enc["text"]["pooled"] else [])
        members |= {f"text_{part}_{kind}.npy" for part in parts for kind in enc["text"]["captions"]}
    return members


def _expected_shape(member: str, size: list[int], data: dict) -> tuple[tuple, str] | None:
    """(shape, dtype) an array member must have, from the sample's size and the manifest."""
    w, h = size
    enc = data["encoders"]
    base = member.removesuffix(".npy").removesuffix("_flip")
    if base in ("latent", "latent_mean", "latent_std") and "kl" in enc:
        f = enc["kl"]["factor"]
        return (enc["kl"]["channels"], h // f, w // f), enc["kl"]["dtype"]
    if base == "tokens" and "vq" in enc:
        f = enc["vq"]["factor"]
        return (h // f, w // f), enc["vq"]["dtype"]
    part, _, kind = base.removeprefix("text_").partition("_")
    if base.startswith("text_") and "text" in enc and kind in enc["text"]["captions"]:
        t = enc["text"]
        return {"emb": ((t["max_length"], t["dim"]), t["dtype"]), "mask": ((t["max_length"],), "uint8"),
                "pooled": ((t["pooled_dim"],), t["dtype"])}.get(part)
    return None


def _check_sample(key: str, members: dict[str, bytes], data: dict) -> list[str]:
    faults = []
    want = expected_members(data)
    if set(members) != want:
        missing, extra = sorted(want - set(members)), sorted(set(members) - want)
        faults.append(f"sample {key}: " + ", ".join(([f"missing {missing}"] if missing else []) +
                                                   ([f"unexpected {extra}"] if extra else [])))
    try:
        record = json.loads(members["json"])
        size = [int(v) for v in record["size"]]
        assert len(size) == 2
    except Exception as e:
        return faults + [f"sample {key}: unreadable json record or size ({type(e).__name__}: {e})"]
    if record.get("key") != key:
        faults.append(f"sample {key}: json record is for key {record.get('key')!r}")
    if size not in data["image"]["buckets"]:
        faults.append(f"sample {key}: size {size[0]}x{size[1]} is not one of the manifest's sizes")
    for member, raw in members.items():
        try:
            if member.endswith(".npy"):
                arr = np.load(io.BytesIO(raw), allow_pickle=False)
                expected = _expected_shape(member, size, data)
                if expected and (arr.shape != expected[0] or arr.dtype.name != expected[1]):
                    faults.append(f"sample {key}: {member} is {arr.dtype.name}{list(arr.shape)}, "
                                  f"expected {expected[1]}{list(expected[0])}")
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    faults.append(f"sample {key}: {member} holds NaN or infinity")
                if member.startswith("tokens") and arr.size and int(arr.max()) >= data["encoders"]["vq"]["codebook_size"]:
                    faults.append(f"sample {key}: {member} holds code {int(arr.max())}, the codebook has "
                                  f"{data['encoders']['vq']['codebook_size']}")
            elif member in ("jpg", "png", "webp"):
                with shards.open_image(raw) as im:  # only the formats shards hold
                    im.load()
                    if list(im.size) != list(size):
                        faults.append(f"sample {key}: image is {im.size[0]}x{im.size[1]}, record says "
                                      f"{size[0]}x{size[1]}")
            elif member.endswith("txt"):
                raw.decode("utf-8")
        except Exception as e:
            faults.append(f"sample {key}: {member} does not decode ({type(e).__name__}: {e})")
    return faults


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_shard(path, entry: dict, data: dict, keys: list[str] | None = None) -> list[str]:
    """Faults of one tar: size, checksum, tar structure, member names, counts, array shapes.
    The keys of its samples are appended to ``keys`` when given (for the duplicate check).

    The tar may come from anywhere: members are checked before a byte of them is read
    (:func:`pipeline.shards.safe_members`: no sparse member, link or device, none larger than
    the file itself), and samples are checked one at a time, so memory stays one sample."""
    path = storage.path(path)
    name, faults = path.name, []
    if not path.exists():
        return [f"{name}: missing"]
    size = path.stat().st_size
    if size != entry["bytes"]:
        faults.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    digest = _sha256_file(path)
    if digest != entry["sha256"]:
        faults.append(f"{name}: sha256 {digest[:12]}..., manifest says {entry['sha256'][:12]}...")
    done: set[str] = set()
    key, members = None, {}

    def finish():  # the sample just read is complete: check it, keep only its key
        if key is None:
            return
        faults.extend(f"{name}: {f}" for f in _check_sample(key, members, data))
        done.add(key)
        if keys is not None:
            keys.append(key)

    try:
        with storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            # no member of a shard can be larger than the shard itself
            for m in shards.safe_members(tar, name, max_bytes=min(shards.MAX_MEMBER_BYTES, size)):
                k, _, ext = m.name.partition(".")
                if "/" in m.name or not ext:
                    faults.append(f"{name}: bad member name {m.name!r}")
                    continue
                if k != key:
                    finish()
                    if k in done:
                        faults.append(f"{name}: members of sample {k} are not together (readers split it)")
                    key, members = k, {}
                if ext in members:
                    faults.append(f"{name}: member {m.name} appears twice")
                members[ext] = tar.extractfile(m).read()
                tar.members = []  # tarfile keeps every header otherwise
            finish()
            f.seek(tar.offset)  # a complete tar ends with two zero blocks after its last member
            if f.read(1024) != bytes(1024):
                faults.append(f"{name}: truncated, the tar ends at byte {size} without its end-of-archive blocks")
    except shards.UnsafeTar as e:  # names the member; the rest of this tar is not read
        return faults + [str(e)]
    except (tarfile.TarError, EOFError, OSError) as e:
        faults.append(f"{name}: unreadable tar ({type(e).__name__}: {e}); truncated or corrupt")
    if len(done) != entry["samples"]:
        faults.append(f"{name}: {len(done)} samples, manifest says {entry['samples']}")
    return faults


def _partition(key: str, parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % parts


def _verify_task(item: tuple) -> list[str]:
    """One shard (a Ray task): its faults; its keys written, hash-partitioned, one file per
    partition (``SCRATCH/pNNNNNN/SHARD.parquet``), for the duplicate check."""
    folder, index, entry, data, scratch, parts = item
    keys: list[str] = []
    faults = verify_shard(storage.path(folder) / entry["name"], entry, data, keys)
    part = np.array([_partition(k, parts) for k in keys], np.int64)
    table = pa.table({"key": pa.array(keys, pa.string()), "shard": pa.array([entry["name"]] * len(keys), pa.string())})
    for p in np.unique(part):
        folder_p = storage.path(scratch) / f"p{p:06d}"
        if not storage.is_remote(folder_p):
            storage.local(folder_p).mkdir(parents=True, exist_ok=True)
        storage.write_parquet(folder_p / f"{index:08d}.parquet", table.filter(pa.array(part == p)))
    return faults


def _duplicates_task(item: tuple) -> list[str]:
    """One hash partition of every shard's keys (a Ray task): a key in two samples is a fault.
    Memory and reads: the keys of one partition."""
    scratch, part = item
    tables = [storage.read_parquet(path) for path in sorted((storage.path(scratch) / f"p{part:06d}").glob("*.parquet"))]
    if not tables:
        return []
    keys = pa.concat_tables(tables)
    counts = keys.group_by("key").aggregate([("key", "count")])
    twice = counts.filter(pc.greater(counts["key_count"], 1))["key"]
    if not len(twice):
        return []
    found = keys.filter(pc.is_in(keys["key"], twice)).to_pylist()
    where: dict[str, list[str]] = {}
    for r in found:
        where.setdefault(r["key"], []).append(r["shard"])
    return [f"{ws[j]}: sample {k} also in {ws[0]}" for k, ws in sorted(where.items()) for j in range(1, len(ws))]


def _run(fn, items: list, progress: bool, desc: str, in_process: bool):
    """``fn`` over ``items`` as Ray tasks (or here, in order, for a small folder with no Ray up)."""
    if in_process:
        for item in items:
            yield item, fn(item)
        return
    from pipeline import ray_backend

    for item, result, _ in ray_backend.run_tasks(fn, items, desc=desc, num_cpus=1):
        if isinstance(result, Exception):
            raise result
        yield item, result


def verify(folder, progress: bool = True, keys_per_partition: int = 5_000_000,
           local_below: int = 16) -> tuple[list[str], dict]:
    """Every fault found in a shards folder, and a summary.

    One task per shard checks it (:func:`verify_shard`) and writes its keys, hash-partitioned,
    to ``FOLDER/_verify-RUNID/`` (one file per partition); then one task per partition finds keys in two samples. The driver
    holds the manifest and the faults, never the keys; a task holds one shard or one partition
    (``keys_per_partition`` keys). A folder of fewer than ``local_below`` shards, with no Ray
    running, is checked here, in this process, by the same functions."""
    folder = storage.path(folder)
    try:
        data = load(folder)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        return [f"manifest: {e}"], {}
    faults = []
    if not data["complete"]:
        faults.append(f"manifest: build incomplete, {len(data['shards'])} of {data['planned_shards']} shards "
                      "committed (rerun `tapir build`)")
    if data["shards"] and set(data["members"]) != expected_members(data):
        faults.append(f"manifest: members {data['members']} differ from what its settings imply "
                      f"{sorted(expected_members(data))}")
    listed = {e["name"] for e in data["shards"]}
    for extra in sorted(p.name for p in folder.glob("*.tar") if p.name not in listed):
        faults.append(f"{extra}: not in the manifest")
    entries = data["shards"]
    in_process = len(entries) < local_below and not _ray_running()
    if not in_process:
        from pipeline import ray_backend

        ray_backend.init()
    small = {k: v for k, v in data.items() if k != "shards"}
    parts = max(1, -(-int(data["samples"]) // keys_per_partition))
    scratch = folder / f"_verify-{uuid.uuid4().hex[:12]}"  # this run's own: two verifies never share it
    if not storage.is_remote(scratch):
        storage.local(scratch).mkdir(parents=True)
    try:
        found: dict[int, list[str]] = {}
        items = [(storage.url(folder), i, e, small, storage.url(scratch), parts) for i, e in enumerate(entries)]
        for item, result in _run(_verify_task, items, progress, "verify", in_process):
            found[item[1]] = result
        faults += [f for i in sorted(found) for f in found[i]]
        dup = {}
        for item, result in _run(_duplicates_task, [(storage.url(scratch), p) for p in range(parts)],
                                 progress, "verify keys", in_process):
            dup[item[1]] = result
        faults += sorted(f for p in dup.values() for f in p)
    finally:
        _remove(scratch)
    summary = {"shards": len(entries), "samples": data["samples"], "bytes": data["bytes"],
               "encoders": {k: v["fingerprint"][:12] for k, v in data["encoders"].items()}}
    return faults, summary


def _remove(folder) -> None:
    if not storage.is_remote(folder):
        shutil.rmtree(storage.local(folder), ignore_errors=True)
    elif folder.exists():
        folder.fs.rm(folder.path, recursive=True)


def _ray_running() -> bool:
    """Whether this process already joined Ray (ray_backend answers without importing Ray)."""
    from pipeline import ray_backend

    return ray_backend.is_initialized()
