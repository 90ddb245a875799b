"""Training batches from ``tapir build`` shards, split exactly across ranks and loader workers.

The split (why every rank gets the same number of batches, even with uneven shards or fewer
shards than workers, where webdataset's per-shard split hangs DDP: webdataset #188, #225):

1. Each epoch the shard order is a seeded permutation; the manifest's sample counts place
   the shards one after another on a circle of N sample positions, and the epoch starts at a
   seeded offset on it.
2. Rank r takes the contiguous range [r * N//W, r * N//W + S*B) from that offset, of W ranks,
   where S batches of B samples is (N // W) // B rounded down to a multiple of the loader
   workers K. Every rank has exactly S batches per epoch. **Remainder policy**: the
   N - W*S*B positions past the ranks' ranges (fewer than W*B*K + W) are not trained on this
   epoch; the next epoch's offset and shard order put other samples there.
3. A rank's S batches are split into K equal contiguous blocks, one per loader worker; a
   shard may be split between ranks and workers, each reading only its part. The DataLoader
   takes a batch from each worker in turn, so the workers move through epochs together.
4. Each worker shuffles through a seeded buffer, and draws per sample (seeded by the key and
   the epoch, so the draw never depends on position): the caption kind (``caption_probs``,
   falling back in ``caption_fallback`` order when the drawn kind is empty), caption dropout,
   and the flipped variant.

A shard that cannot be read, or ends early, is skipped with a warning naming it and counted
(``faults`` in each batch); the worker makes up the missing samples from the shards after its
range, so the batch count never changes. Workers stream epoch after epoch (one DataLoader per
run). Resume: ``set_start(consumed)`` replays each worker's current epoch and drops what it had
delivered, giving exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import io
import logging
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import shards

log = logging.getLogger(__name__)

CAPTION_MEMBERS = {"alt_text": "alt.txt", "short": "short.txt", "descriptive": "descriptive.txt"}


@dataclass(frozen=True)
class Segment:
    shard: int  # index into the shard list
    start: int  # first sample (position in the tar)
    stop: int   # one past the last


def batches_per_rank(total: int, world: int, batch: int, workers: int = 1) -> tuple[int, int]:
    """(batches per rank per epoch, loader workers): at most one worker per batch, and the
    batches a multiple of the workers, so every worker's block has the same length."""
    n = (total // world) // batch
    workers = max(1, min(workers, n))
    return n - n % workers, workers


def epoch_offset(total: int, seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, 0x0FF5]).integers(total))


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n_shards).tolist()


def segments(counts: list[int], order: list[int], start: int, stop: int) -> list[Segment]:
    """The parts of shards covering positions [start, stop) of the shards laid out in ``order``
    (positions past the end wrap around: the shards lie on a circle)."""
    out, pos = [], 0
    for s in order + order:
        lo, hi = max(start, pos), min(stop, pos + counts[s])
        if lo < hi:
            out.append(Segment(s, lo - pos, hi - pos))
        pos += counts[s]
        if pos >= stop:
            break
    return out


def worker_blocks(n_batches: int, workers: int) -> list[tuple[int, int]]:
    """Equal contiguous [lo, hi) batch blocks, one per worker (n_batches is a multiple of workers)."""
    size = n_batches // workers
    return [(w * size, (w + 1) * size) for w in range(workers)]


def resume_roles(consumed: int, workers: int) -> tuple[list[int], int]:
    """(batches each worker has delivered, the worker asked next) after the loader yielded
    ``consumed`` batches. Workers stream forever (epoch after epoch), so PyTorch's DataLoader,
    which asks them in turn, takes batch g from worker g mod workers. A resumed loader starts
    asking at worker 0 again, so worker w takes the role of worker (next + w) mod workers."""
    return [consumed // workers + (r < consumed % workers) for r in range(workers)], consumed % workers


def payload_members(manifest: dict, folder, payload: str) -> list[str]:
    """The members a payload reads: 'kl' the latents, 'vq' the tokens, 'image' the image."""
    enc = manifest["encoders"]
    if payload == "kl":
        if "kl" not in enc:
            raise ValueError(f"shards in {folder} hold no KL latents (build.vae.model was not set): "
                             "the diffusion trainer trains on pre-encoded latents")
        return ["latent_mean", "latent_std"] if enc["kl"]["store"] == "mean_std" else ["latent"]
    if payload == "vq":
        if "vq" not in enc:
            raise ValueError(f"shards in {folder} hold no VQ tokens (build.vq.model was not set): "
                             "the autoregressive trainer trains on pre-encoded tokens")
        return ["tokens"]
    if payload == "image":
        if not manifest["image"]["keep_image"]:
            raise ValueError(f"shards in {folder} hold no images (build.keep_image was off)")
        return [manifest["image"]["format"]]
    raise ValueError(f"unknown payload {payload!r}")


def decode_image(raw: bytes, flip: bool = False) -> torch.Tensor:
    """(3, H, W) float in [-1, 1] of an image member (the formats the build stage writes)."""
    with shards.open_image(raw) as im:
        arr = np.asarray(im.convert("RGB"))
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1


def _rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def _npy(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


class ShardStream(IterableDataset):
    """Batches (dicts of tensors and lists) of one rank; see the module docstring."""

    def __init__(self, folder: str | Path, manifest: dict, cfg, seed: int, world: int = 1, rank: int = 0,
                 text_kinds: list[str] | None = None, workers: int | None = None, payload: str = "kl"):
        """``cfg``: a TrainDataConfig (captions drawn per sample), or for ``payload`` 'image' any
        config with batch_size, workers, shuffle_buffer and flip (no captions read)."""
        self.folder, self.cfg, self.seed, self.world, self.rank = Path(folder), cfg, seed, world, rank
        self.names = [e["name"] for e in manifest["shards"]]
        self.counts = [e["samples"] for e in manifest["shards"]]
        self.payload, self.captions = payload, payload != "image"
        self.members = payload_members(manifest, folder, payload)
        self.has_flip = bool(manifest["image"]["flip"]) and payload != "image"
        self.text_kinds = text_kinds
        self.n_batches, self.workers = batches_per_rank(sum(self.counts), world, cfg.batch_size,
                                                        max(1, cfg.workers if workers is None else workers))
        if self.n_batches == 0:
            raise ValueError(f"{sum(self.counts)} samples in {folder} are fewer than one batch of "
                             f"{cfg.batch_size} on each of {world} rank(s)")
        if self.captions:
            # with pre-computed embeddings a caption can only fall back to a kind that was embedded
            self.fallback = [k for k in cfg.caption_fallback if text_kinds is None or k in text_kinds]
            kinds = sorted(cfg.caption_probs)  # the draw must not depend on the config's key order
            probs = np.array([cfg.caption_probs[k] for k in kinds], dtype=np.float64)
            self.kinds, self.probs = kinds, probs / probs.sum()
        self.wanted = self._wanted_members()
        self.consumed, self.epochs = 0, None

    def _wanted_members(self) -> set[str]:
        """The members a batch is made of; the rest of each sample (the image beside latents, the
        json, pooled vectors, kinds not drawn) is skipped without being copied out of the tar."""
        suffixes = [""] + (["_flip"] if self.cfg.flip and self.has_flip else [])
        if self.payload == "image":
            wanted = set(self.members)
        else:
            wanted = {f"{m}{x}.npy" for m in self.members for x in suffixes}
        if self.captions:
            wanted |= set(CAPTION_MEMBERS.values())
            for kind in self.text_kinds or []:
                wanted |= {f"text_emb_{kind}.npy", f"text_mask_{kind}.npy"}
        return wanted

    def set_start(self, consumed: int = 0, epochs: int | None = None) -> None:
        """Start after ``consumed`` batches of this rank (resume); stop after ``epochs`` epochs
        (None: stream forever, one DataLoader for the whole run, its workers kept alive)."""
        self.consumed, self.epochs = consumed, epochs

    # -- reading ---------------------------------------------------------------------------
    def _read(self, shard: int, start: int, stop: int | None, faults: list[str]) -> Iterator[dict]:
        """Raw samples [start, stop) of one shard; a read error or an early end is a fault."""
        name, n = self.names[shard], 0
        want = self.counts[shard] if stop is None else stop
        try:
            with open(self.folder / name, "rb") as f:
                for sample in tar_samples(f, name, lambda m: m.rpartition("/")[2].partition(".")[2] in self.wanted):
                    if n >= want:
                        return
                    if n >= start:
                        sample["__shard__"] = name
                        yield sample
                    n += 1
        except Exception as e:  # noqa: BLE001 - any unreadable shard is skipped and counted
            faults.append(f"{name}: unreadable ({type(e).__name__}: {e}); skipped")
            return
        if n < want:
            faults.append(f"{name}: ends after {n} samples, the manifest says {self.counts[shard]}; "
                          "truncated, the rest is skipped")

    def _source(self, segs: list[Segment], order: list[int], faults: list[str]) -> Iterator[dict]:
        for seg in segs:
            yield from self._read(seg.shard, seg.start, seg.stop, faults)
        # spares, only reached after a fault: the shards after this range, in epoch order
        after = order.index(segs[-1].shard) + 1 if segs else 0
        for lap in range(2):
            for s in order[after:] + order[:after]:
                yield from self._read(s, 0, None, faults if lap == 0 else [])
        raise RuntimeError(f"no readable samples left in {self.folder}")

    def _decode(self, raw: dict, epoch: int) -> dict:
        key = raw["__key__"]
        rng = _rng(self.seed, epoch, key)
        out = {"key": key}
        if self.captions:
            texts = {k: raw[m].decode("utf-8").strip() for k, m in CAPTION_MEMBERS.items() if m in raw}
            kind = self.kinds[rng.choice(len(self.kinds), p=self.probs)]
            drop = bool(rng.random() < self.cfg.caption_dropout)
            if not texts.get(kind):
                found = next((k for k in self.fallback if texts.get(k)), None)
                if found is None and self.cfg.empty_caption == "error":
                    raise ValueError(f"sample {key} has no caption of the kinds {self.fallback} (set "
                                     "data.empty_caption: unconditional to train it with the empty caption)")
                kind, drop = (found, drop) if found else (kind, True)
            out.update(kind=kind, drop=drop, caption="" if drop else texts[kind])
        flip = self.cfg.flip and (self.payload == "image" or self.has_flip) and rng.random() < 0.5
        if self.payload == "image":
            out["image"] = decode_image(raw[self.members[0]], flip)
        suffix = "_flip" if flip else ""
        for m in self.members if self.payload != "image" else []:
            arr = _npy(raw[f"{m}{suffix}.npy"])
            out[m] = torch.from_numpy(arr.astype(np.int64 if m == "tokens" else np.float32))
        if self.captions and self.text_kinds is not None:
            out["text_emb"] = torch.from_numpy(_npy(raw[f"text_emb_{kind}.npy"]).astype(np.float32))
            out["text_mask"] = torch.from_numpy(_npy(raw[f"text_mask_{kind}.npy"]).astype(np.int64))
        return out

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        delivered, first = resume_roles(self.consumed, nw)
        role = (first + w) % nw  # see resume_roles
        if nw != self.workers:
            raise ValueError(f"the stream was split for {self.workers} loader worker(s), the loader has {nw}")
        lo, hi = worker_blocks(self.n_batches, nw)[role]
        epoch, skip = divmod(delivered[role], hi - lo)
        while self.epochs is None or epoch < self.epochs:
            yield from self._epoch(epoch, role, lo, hi, skip)
            epoch, skip = epoch + 1, 0

    def _epoch(self, epoch: int, role: int, lo: int, hi: int, skip: int) -> Iterator[dict]:
        """Batches lo..hi-1 of this rank in ``epoch``, the first ``skip`` read but not yielded."""
        B, total = self.cfg.batch_size, sum(self.counts)
        base = epoch_offset(total, self.seed, epoch) + self.rank * (total // self.world)
        order = shard_order(len(self.names), self.seed, epoch)
        faults: list[str] = []
        source = self._source(segments(self.counts, order, base + lo * B, base + hi * B), order, faults)
        rng = np.random.default_rng([self.seed, epoch, self.rank, role])
        buffer: list[dict] = []
        for b in range(hi - lo):
            batch = []
            while len(batch) < B:
                while len(buffer) < self.cfg.shuffle_buffer and len(buffer) < (hi - lo - b) * B - len(batch):
                    buffer.append(next(source))
                i = int(rng.integers(len(buffer)))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                raw = buffer.pop()
                try:
                    batch.append(self._decode(raw, epoch))
                except (KeyError, ValueError, OSError) as e:
                    faults.append(f"{raw['__shard__']} sample {raw['__key__']}: {type(e).__name__}: {e}; "
                                  "skipped")
            if b < skip:  # resume: read again, already trained on (and its faults counted) before
                faults.clear()
                continue
            for fault in faults:
                log.warning("%s", fault)
            yield collate(batch, faults)
            faults.clear()


def collate(samples: list[dict], faults: list[str]) -> dict:
    out = {k: [s[k] for s in samples] for k in ("key", "kind", "caption") if k in samples[0]}
    if "drop" in samples[0]:
        out["drop"] = torch.tensor([s["drop"] for s in samples])
    for k in ("latent_mean", "latent_std", "latent", "tokens", "image", "text_emb", "text_mask"):
        if k in samples[0]:
            out[k] = torch.stack([s[k] for s in samples])
    out["faults"] = list(faults)
    return out


def loader(stream: ShardStream) -> DataLoader:
    """A DataLoader over a ShardStream's batches (batching happens in the workers; at most one
    worker per batch of an epoch)."""
    workers = stream.workers if stream.cfg.workers else 0
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def read_samples(folder: Path, entries: list[dict], n: int, member: str) -> list[dict]:
    """The first ``n`` samples of the given manifest shard entries: {'key', 'caption' (the
    descriptive caption, else the short one, else the alt-text), and 'latent' (the stored mean),
    'tokens' or 'image' ([-1, 1]) as ``member`` names ('latent_mean'/'latent', 'tokens', or an
    image format)}."""
    out = []
    for entry in entries:
        for key, members in _read_tar(Path(folder) / entry["name"]):
            caption = next((members[m].decode() for m in ("descriptive.txt", "short.txt", "alt.txt")
                            if members.get(m, b"").strip()), "")
            sample = {"key": key, "caption": caption}
            if member in ("jpg", "png", "webp"):
                sample["image"] = decode_image(members[member])
            elif member == "tokens":
                sample["tokens"] = torch.from_numpy(_npy(members["tokens.npy"]).astype(np.int64))
            else:
                sample["latent"] = torch.from_numpy(_npy(members[f"{member}.npy"]).astype(np.float32))
            out.append(sample)
            if len(out) == n:
                return out
    return out


def tar_samples(f, name: str, select=None) -> Iterator[dict]:
    """webdataset samples ({'__key__', ext: bytes}) of an open tar stream, reading only members
    whose name ``select`` accepts. A sparse, oversized, link or device member raises UnsafeTar
    before a byte of it is read (webdataset's own iterator would expand a sparse member)."""
    from webdataset.tariterators import group_by_keys

    def members():
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for m in shards.safe_members(tar, name):
                if select is None or select(m.name):
                    yield {"fname": m.name, "data": tar.extractfile(m).read(), "__url__": name}
                tar.members = []  # a stream keeps every header otherwise

    yield from group_by_keys(members())


def _read_tar(path: Path):
    with open(path, "rb") as f:
        for sample in tar_samples(f, str(path)):
            yield sample["__key__"], sample
