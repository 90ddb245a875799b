"""Shards from elsewhere (issue 11, item 4): tar members Tapir will not read (sparse, oversized,
links and devices), image bytes of formats Tapir does not write, pickles, and the README's safe
webdataset reader. Every reader refuses before reading: ``shards.read_tar``, ``tapir verify``,
the build stage, the trainers' loader and the report's image grid."""

import hashlib
import io
import json
import pickle
import shutil
import struct
import subprocess
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import tapir_cmd
from PIL import Image

from pipeline import shards
from pipeline.build import build
from pipeline.config import load_config
from pipeline.encoders import save_tiny_kl
from pipeline.manifest import verify
from pipeline.synthweb import write_curated_run

EXPANDED = 64 * 2**20  # what the sparse member claims to hold: 64 MB from a 1.5 KB tar
MEMBER = "000010001.jpg"


# -- hostile tars, made byte by byte (tarfile writes none of them) ------------------------


def gnu_sparse_tar(name: str = MEMBER, size: int = EXPANDED) -> bytes:
    """An old-GNU sparse member (type 'S') that is all hole: no data stored, ``size`` zero
    bytes when read, as `tar --sparse` writes an empty sparse file."""
    info = tarfile.TarInfo(name)
    info.type, info.mtime = tarfile.GNUTYPE_SPARSE, 0
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % size  # the one map entry: 0 bytes of data at the end
    header[398:410] = b"%011o\0" % 0
    header[483:495] = b"%011o\0" % size  # the real size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + bytes(1024)


def pax_sparse_tar(tmp: Path, name: str = MEMBER, size: int = EXPANDED) -> bytes:
    """The same through GNU tar's PAX sparse format 1.0 (GNU.sparse.* records)."""
    (tmp / "src").mkdir()
    with open(tmp / "src" / name, "wb") as f:
        f.truncate(size)
    subprocess.run(["tar", "--sparse", "--format=pax", "-b1", "-cf", str(tmp / "pax.tar"), "-C", str(tmp / "src"),
                    name], check=True)
    return (tmp / "pax.tar").read_bytes()


def _tar(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def symlink_tar(name: str = MEMBER) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return _tar(info)


def fifo_tar(name: str = MEMBER) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return _tar(info)


def oversized_tar(name: str = MEMBER, declared: int = 8**11 - 1) -> bytes:
    """A header claiming 8 GB (the largest a ustar header holds) followed by a few bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime = declared, 0
    return info.tobuf(format=tarfile.USTAR_FORMAT) + b"not 8 GB" + bytes(1024)


HOSTILE = {"sparse": gnu_sparse_tar, "symlink": symlink_tar, "fifo": fifo_tar, "oversized": oversized_tar}
WHY = {"sparse": "is a sparse file", "symlink": "is not a regular file", "fifo": "is not a regular file",
       "oversized": "over the"}
HAS_GNU_TAR = shutil.which("tar") is not None and "GNU tar" in subprocess.run(
    ["tar", "--version"], capture_output=True, text=True).stdout


# -- other image formats under an image member's name --------------------------------------


def psd(w: int, h: int) -> bytes:
    """A minimal Photoshop file (Pillow reads PSD but cannot write it)."""
    return (b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3) + struct.pack(">IIIH", 0, 0, 0, 0)
            + bytes(3 * w * h))


def payload(fmt: str, w: int = 64, h: int = 64) -> bytes:
    if fmt == "PSD":
        return psd(w, h)
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


FOREIGN = ["GIF", "BMP", "TIFF", "PSD"]


def test_payloads_are_valid_images_pillow_would_parse():
    for fmt in FOREIGN:  # the refusals below are the format limit's doing, not broken bytes
        with Image.open(io.BytesIO(payload(fmt))) as im:
            im.load()
            assert (im.format, im.size) == (fmt, (64, 64))


# -- fixtures --------------------------------------------------------------------------------


def _config(run: Path, *sets):
    return load_config(None, [f"output={run}", "input.path=unused", "build.resolution=64",
                              "build.samples_per_shard=4", "build.batch_size=4", "resources.num_cpus=2", *sets])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """12 kept rows in 2 source shards, all good, captioned."""
    root = tmp_path_factory.mktemp("untrusted") / "run"
    write_curated_run(root, 12, per_shard=6, faults=False, drop_every=None)
    return root


@pytest.fixture(scope="module")
def built(run, tmp_path_factory, local_ray):
    """Shards with images, KL latents, captions and json: 3 shards of 4 samples."""
    kl = save_tiny_kl(tmp_path_factory.mktemp("kl") / "kl")
    cfg = _config(run, f"build.vae.model={kl}", "build.latent_dtype=float32")
    funnel = build(cfg)
    assert funnel["written"] == 12 and verify(cfg.shards_dir, progress=False)[0] == []
    return cfg


def _replace_shard(folder: Path, name: str, data: bytes) -> None:
    """Put ``data`` as shard ``name`` and make the manifest agree on its size and checksum, so
    only what is inside the tar can be at fault."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == name)
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


# -- shards.read_tar (the lead's pipeline/shards.py) ----------------------------------------


@pytest.mark.parametrize("kind", sorted(HOSTILE) + ["pax sparse"])
def test_read_tar_refuses_unsafe_members_before_reading(kind, tmp_path):
    if kind == "pax sparse" and not HAS_GNU_TAR:
        pytest.skip("GNU tar is not installed (the old-GNU sparse case runs without it)")
    data = pax_sparse_tar(tmp_path) if kind == "pax sparse" else HOSTILE[kind]()
    assert len(data) <= 10240  # a record at most
    path = tmp_path / "00001.tar"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(shards.UnsafeTar) as err:
            shards.read_tar(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and repr(MEMBER) in str(err.value)
    assert WHY[kind.split()[-1]] in str(err.value)
    assert peak < 4 * 2**20, peak  # refused from the header, not read


# -- tapir verify ------------------------------------------------------------------------------


def test_verify_reports_unsafe_members_as_faults_without_reading_them(built, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(built.shards_dir, folder)
    bad = {"00000.tar": "sparse", "00001.tar": "symlink", "00002.tar": "oversized"}
    for name, kind in bad.items():
        _replace_shard(folder, name, HOSTILE[kind]())
    tracemalloc.start()
    start = time.time()
    try:
        faults, _ = verify(folder, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # the 64 MB sparse member was never expanded
    assert time.time() - start < 30
    assert len(faults) == 3, faults
    for fault, (name, kind) in zip(faults, bad.items()):
        assert fault.startswith(f"{name}: member {MEMBER!r} ") and WHY[kind] in fault, fault
    proc = subprocess.run(tapir_cmd("verify", folder), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # faults, not a crash
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FAULT")]
    assert len(lines) == 3 and all(f"member {MEMBER!r}" in line for line in lines), proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("fmt", FOREIGN)
def test_verify_refuses_other_image_formats_under_a_jpg_name(built, tmp_path, fmt):
    folder = tmp_path / "shards"
    shutil.copytree(built.shards_dir, folder)
    samples = shards.read_tar(folder / "00001.tar")
    key = sorted(samples)[0]
    size = json.loads(samples[key]["json"])["size"]
    samples[key]["jpg"] = payload(fmt, *size)  # a valid image of the right size, of another format
    shards.write_tar(folder / "00001.tar", sorted(samples.items()))
    _replace_shard(folder, "00001.tar", (folder / "00001.tar").read_bytes())
    faults, _ = verify(folder, progress=False)
    assert len(faults) == 1 and faults[0].startswith(f"00001.tar: sample {key}: jpg does not decode "
                                                     "(UnidentifiedImageError"), faults


# -- the build stage, the trainers' reader, the report grid -----------------------------------


def test_build_refuses_other_image_formats_in_raw_shards(run, tmp_path, local_ray):
    from pipeline.visual import _image
    from training.data import decode_image

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("shards"))
    raw = shards.read_tar(copy / "raw" / "00001.tar")
    keys = sorted(raw)[:len(FOREIGN)]
    for key, fmt in zip(keys, FOREIGN):
        raw[key]["jpg"] = payload(fmt)
    shards.write_tar(copy / "raw" / "00001.tar", sorted(raw.items()))
    cfg = _config(copy)
    funnel = build(cfg)
    assert funnel["written"] == 12 - len(FOREIGN)
    failed = {}
    for sid in shards.done_shards(cfg.shards_dir):
        failed.update(shards.read_stats(cfg.shards_dir, sid)["failed"])
    assert sorted(failed) == keys
    assert all(reason.startswith("decode error: UnidentifiedImageError") for reason in failed.values()), failed
    for key, fmt in zip(keys, FOREIGN):
        assert _image(copy / "raw", 1, key, {}) is None  # the report's grid shows a blank
        with pytest.raises(Image.UnidentifiedImageError):
            decode_image(payload(fmt))


def test_build_refuses_a_raw_shard_with_a_sparse_member_before_any_work(run, tmp_path, local_ray):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("shards"))
    (copy / "raw" / "00001.tar").write_bytes(gnu_sparse_tar())
    with pytest.raises(shards.UnsafeTar, match=f"00001.tar: member {MEMBER!r} is a sparse file"):
        build(_config(copy))
    assert not shards.done_shards(copy / "shards")


def test_the_trainers_reader_refuses_unsafe_members(built, tmp_path):
    from training.data import read_samples, tar_samples

    folder = tmp_path / "shards"
    shutil.copytree(built.shards_dir, folder)
    for kind in ("sparse", "symlink", "oversized"):
        (folder / "00001.tar").write_bytes(HOSTILE[kind]())
        tracemalloc.start()
        try:
            with pytest.raises(shards.UnsafeTar, match=WHY[kind]):
                read_samples(folder, [{"name": "00001.tar"}], 4, "jpg")
            with open(folder / "00001.tar", "rb") as f, pytest.raises(shards.UnsafeTar, match="00001.tar: member"):
                list(tar_samples(f, "00001.tar", lambda name: name.endswith(".jpg")))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * 2**20, (kind, peak)
    ok = read_samples(folder, [{"name": "00000.tar"}], 4, "latent_mean")  # safe shards still read
    assert len(ok) == 4 and ok[0]["latent"].shape == (4, 16, 16)


# -- the README's safe webdataset reader --------------------------------------------------------

SAFE_READER = '''\
import io
import json

import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.autodecode import handle_extension

folder = "runs/demo/shards"  # shards from elsewhere? run `tapir verify` on them first
manifest = json.load(open(f"{folder}/manifest.json"))
members = set(manifest["members"])  # read only these: never a .pyd, .pickle or .pth


def image(data):  # only the formats Tapir writes, not every format Pillow can parse
    with Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "WEBP"]) as im:
        return im.convert("RGB")


dataset = wds.WebDataset(
    [f"{folder}/{shard['name']}" for shard in manifest["shards"]], shardshuffle=False,
    select_files=lambda name: name.rpartition("/")[2].partition(".")[2] in members,
).decode(
    handle_extension("jpg png webp", image),
    handle_extension("npy", lambda data: np.load(io.BytesIO(data), allow_pickle=False)),
    handle_extension("json", json.loads),
    handle_extension("txt", bytes.decode),
    pre=[], post=[],  # no default handlers: they unpickle .pyd/.pickle, torch.load .pth, gunzip .gz
)
for sample in dataset:
    latent, caption = sample["latent_mean.npy"], sample["txt"]
'''


class _CreatesAFile:
    """A pickle that creates a file when unpickled: what a hostile .pyd member can do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_the_readme_safe_reader_never_unpickles(built, tmp_path):
    import webdataset as wds

    folder = tmp_path / "shards"
    shutil.copytree(built.shards_dir, folder)
    marker = tmp_path / "unpickled"
    samples = shards.read_tar(folder / "00001.tar")
    key = sorted(samples)[0]
    samples[key]["pyd"] = pickle.dumps(_CreatesAFile(marker))
    shards.write_tar(folder / "00001.tar", sorted(samples.items()))
    _replace_shard(folder, "00001.tar", (folder / "00001.tar").read_bytes())
    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    # the threat: webdataset's default decoders unpickle it
    assert len(list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))) == 12 and marker.exists()
    marker.unlink()
    scope: dict = {}
    exec(SAFE_READER.replace('"runs/demo/shards"', repr(str(folder))), scope)
    assert not marker.exists()
    read = list(scope["dataset"])
    assert len(read) == 12 and not any("pyd" in s for s in read)
    s = next(s for s in read if s["__key__"] == key)
    assert isinstance(s["jpg"], Image.Image) and s["jpg"].size == (64, 64)
    assert isinstance(s["latent_mean.npy"], np.ndarray) and s["latent_mean.npy"].shape == (4, 16, 16)
    assert isinstance(s["json"], dict) and s["json"]["key"] == key
    assert isinstance(s["txt"], str) and isinstance(s["alt.txt"], str)
    assert scope["latent"].shape == (4, 16, 16) and isinstance(scope["caption"], str)
    faults, _ = verify(folder, progress=False)  # and `tapir verify` names the stray member
    assert faults == [f"00001.tar: sample {key}: unexpected ['pyd']"]


def test_the_readme_shows_the_tested_safe_reader():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert SAFE_READER in readme, "paste SAFE_READER (tests/test_verify_untrusted.py) into README.md as is"
