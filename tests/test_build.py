"""The build stage: shards with pre-encoded latents, tokens and text embeddings; the manifest;
`tapir verify`; readers outside Tapir (webdataset, Hugging Face datasets, open_clip_train)."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from conftest import tapir_cmd
from PIL import Image, ImageOps

from pipeline import shards
from pipeline.build import CAPTION_MEMBERS, BuildError, build, make_buckets, nearest_bucket
from pipeline.config import ConfigError, load_config
from pipeline.encoders import (load_text_encoder, save_tiny_clip_text_encoder, save_tiny_kl, save_tiny_text_encoder,
                               save_tiny_vq)
from pipeline.manifest import FingerprintMismatch, check_encoder, verify
from pipeline.schemas import kept_digest
from pipeline.synthweb import write_curated_run, write_selection_summary

N_ROWS = 30  # 20 kept rows, 3 of them bad (corrupt image, missing image, no caption)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"kl": save_tiny_kl(root / "kl"), "vq": save_tiny_vq(root / "vq"),
            "text": save_tiny_text_encoder(root / "text"), "clip_text": save_tiny_clip_text_encoder(root / "clip-text"),
            "kl_other": save_tiny_kl(root / "kl-other", seed=1)}


@pytest.fixture(scope="module")
def curated(tmp_path_factory, local_ray):
    """A run folder as the stages before build leave it, scored by the real score stage with
    every scorer on (pHash among them: unsigned 64-bit values, half above 2**63)."""
    from filters.clip import save_local_clip
    from pipeline.score import score

    root = tmp_path_factory.mktemp("curated")
    fates = write_curated_run(root / "run", N_ROWS, per_shard=10)
    shutil.rmtree(root / "run" / "scores")  # the synthetic scores: replaced by real ones
    clip = save_local_clip(root / "tiny-clip")
    cfg = _config(root / "run", f"score.clip.model={clip}", "score.clip.pretrained=null", "score.batch_size=8")
    assert set(cfg.score.scorers) == {"basic", "language", "phash", "clip", "nsfw", "ocr"}  # every scorer
    score(cfg)
    write_selection_summary(root / "run", N_ROWS, len(fates))  # the selection, now of these scores
    return root / "run", fates


def _config(run: Path, *sets):
    return load_config(None, [f"output={run}", "input.path=unused", "build.resolution=64",
                              "build.samples_per_shard=6", "build.batch_size=4", "resources.num_cpus=2", *sets])


def _copy_run(curated, dest: Path) -> Path:
    shutil.copytree(curated[0], dest, ignore=shutil.ignore_patterns("shards"))
    return dest


@pytest.fixture(scope="module")
def built(curated, models, tmp_path_factory, local_ray):
    """One build with every encoder: KL (mean and std, float32), VQ and T5 text embeddings of the
    default caption kinds (descriptive, alt_text)."""
    run = _copy_run(curated, tmp_path_factory.mktemp("built") / "run")
    cfg = _config(run, f"build.vae.model={models['kl']}", f"build.vq.model={models['vq']}",
                  f"build.text.model={models['text']}", "build.latent_dtype=float32")
    funnel = build(cfg)
    return cfg, funnel


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        out.update(shards.read_tar(tar))
    return out


def test_build_writes_every_kept_row_or_its_reason(built, curated):
    cfg, funnel = built
    fates = curated[1]
    good = {k for k, f in fates.items() if f == "ok"}
    samples = _samples(cfg.shards_dir)
    assert set(samples) == good
    assert funnel["written"] == len(good) and funnel["rows_in"] == len(fates)
    assert funnel["failed_by_reason"] == {"decode error": 1, "image missing from the raw tar": 1,
                                          "no caption (alt-text empty, no synthetic caption)": 1}
    failed = {}
    for sid in shards.done_shards(cfg.shards_dir):
        failed.update(shards.read_stats(cfg.shards_dir, sid)["failed"])
    assert {fates[k] for k in failed} == {"corrupt", "missing", "no_caption"}
    manifest = json.loads((cfg.shards_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["samples"] == len(good)
    # planned 6, 6, 6, 2 by samples_per_shard; the three bad rows were all planned into shard 0
    assert [s["samples"] for s in manifest["shards"]] == [3, 6, 6, 2]
    assert manifest["encoders"]["kl"]["scaling_factor"] == 0.5 and manifest["encoders"]["kl"]["shift_factor"] == 0.1
    assert manifest["encoders"]["vq"]["dtype"] == "uint8"  # 256 codes fit a byte
    kinds = ("descriptive", "alt_text")
    text_members = [f"text_{part}_{kind}.npy" for part in ("emb", "mask", "pooled") for kind in kinds]
    assert manifest["members"] == sorted(["jpg", "txt", "alt.txt", "short.txt", "descriptive.txt", "json",
                                          "latent_mean.npy", "latent_std.npy", "tokens.npy", *text_members])
    assert manifest["captions"]["text_embedding"] == ["descriptive", "alt_text"]
    text = manifest["encoders"]["text"]
    assert (text["captions"], text["hidden_layer"], text["pooled"], text["pooling"]) == (
        ["descriptive", "alt_text"], -1, True, "mean")  # T5 has no pooler
    assert not any(name.split(".")[-1] in {"pyd", "pickle", "pkl", "pth", "pt"} for s in samples.values() for name in s)
    record = json.loads(samples[sorted(good)[0]]["json"])
    assert record["size"] == [64, 64] and isinstance(record["scores"]["clip_score"], float)
    assert record["captions"]["model"] == "synthetic-truth"
    hashes = [json.loads(s["json"])["scores"][k] for s in samples.values() for k in ("phash", "phash_mirror")]
    assert all(re.fullmatch("[0-9a-f]{16}", h) for h in hashes), hashes  # uint64 as hex, documented:
    assert manifest["json"]["uint64"].startswith("16-digit lowercase hex")
    assert max(int(h, 16) for h in hashes) >= 2**63  # the values a JSON int64 cannot hold


def test_stored_latents_and_tokens_match_direct_encoding(built, models):
    from diffusers import AutoencoderKL, VQModel

    cfg, _ = built
    vae = AutoencoderKL.from_pretrained(models["kl"]).eval()
    vq = VQModel.from_pretrained(models["vq"]).eval()
    samples = _samples(cfg.shards_dir)
    key = sorted(samples)[0]
    s = samples[key]
    image = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
    assert image.shape == (64, 64, 3)
    # the stored JPEG is lossy: re-create the exact pixels the encoder saw from the raw image
    raw = shards.read_tar(cfg.raw_dir / f"{key[:5]}.tar")[key]["jpg"]
    pixels = np.array(ImageOps.fit(Image.open(io.BytesIO(raw)).convert("RGB"), (64, 64),
                                   method=Image.Resampling.BICUBIC))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        h = vq.encode(x).latents
        tokens = vq.quantize(h)[2][2].reshape(1, h.shape[2], h.shape[3])
    mean = np.load(io.BytesIO(s["latent_mean.npy"]), allow_pickle=False)
    std = np.load(io.BytesIO(s["latent_std.npy"]), allow_pickle=False)
    assert mean.shape == (4, 16, 16) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, dist.mean[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std, dist.std[0].numpy(), rtol=1e-4, atol=1e-5)
    stored_tokens = np.load(io.BytesIO(s["tokens.npy"]), allow_pickle=False)
    assert stored_tokens.dtype == np.uint8 and stored_tokens.shape == (16, 16)
    assert (stored_tokens == tokens[0].numpy()).mean() > 0.99  # argmin ties aside, the same codes
    with torch.no_grad():  # and the stored latent decodes to what the direct latent decodes to
        from_store = vae.decode(torch.from_numpy(mean)[None]).sample
        direct = vae.decode(dist.mean).sample
    torch.testing.assert_close(from_store, direct, rtol=1e-4, atol=1e-4)


def _load(member: bytes) -> np.ndarray:
    return np.load(io.BytesIO(member), allow_pickle=False)


def _encode_directly(model: str, texts: list[str]):
    """(model output with every hidden state, attention mask) as a trainer would compute them."""
    tokenizer, encoder = load_text_encoder(model)
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out, batch["attention_mask"]


def test_each_caption_kind_is_embedded_from_its_own_text(built, models):
    cfg, _ = built
    samples = _samples(cfg.shards_dir)
    keys = sorted(samples)
    for kind in ("descriptive", "alt_text"):
        texts = [samples[k][CAPTION_MEMBERS[kind]].decode() for k in keys]
        assert all(texts)
        out, mask = _encode_directly(models["text"], texts)
        weights = mask[..., None].float()  # T5 has no pooler: the mask-weighted mean of the last states
        mean = (out.last_hidden_state * weights).sum(1) / weights.sum(1)
        for i, key in enumerate(keys):
            s = samples[key]
            emb, stored_mask = _load(s[f"text_emb_{kind}.npy"]), _load(s[f"text_mask_{kind}.npy"])
            assert emb.shape == (77, 32) and emb.dtype == np.float32 and stored_mask.dtype == np.uint8
            np.testing.assert_allclose(emb, out.last_hidden_state[i].numpy(), rtol=1e-4, atol=1e-5)
            assert (stored_mask == mask[i].numpy()).all() and 3 < stored_mask.sum() < 77
            np.testing.assert_allclose(_load(s[f"text_pooled_{kind}.npy"]), mean[i].numpy(), rtol=1e-4, atol=1e-5)
            assert json.loads(s["json"])["text_emb"] == {"descriptive": True, "alt_text": True}
    assert not np.allclose(_load(samples[keys[0]]["text_emb_descriptive.npy"]),
                           _load(samples[keys[0]]["text_emb_alt_text.npy"]))


def test_clip_penultimate_layer_pooler_output_and_empty_captions(curated, models, tmp_path, local_ray):
    run = _copy_run(curated, tmp_path / "run")
    shutil.rmtree(run / "captions")  # alt-texts only: every short caption is empty
    cfg = _config(run, f"build.text.model={models['clip_text']}", "build.text.captions=[short, alt_text]",
                  "build.text.hidden_layer=-2", "build.latent_dtype=float32")
    build(cfg)
    assert verify(cfg.shards_dir, progress=False)[0] == []
    manifest = json.loads((cfg.shards_dir / "manifest.json").read_text())
    text = manifest["encoders"]["text"]
    assert (text["class"], text["hidden_layer"], text["pooling"]) == ("CLIPTextModel", -2, "pooler_output")
    assert manifest["captions"]["text_embedding"] == ["short", "alt_text"]
    samples = _samples(cfg.shards_dir)
    keys = sorted(samples)
    texts = [samples[k]["alt.txt"].decode() for k in keys]
    out, mask = _encode_directly(models["clip_text"], texts + [""])
    penultimate = out.hidden_states[-2]
    assert not torch.allclose(penultimate, out.last_hidden_state, atol=1e-3)
    for i, key in enumerate(keys):
        s = samples[key]
        assert json.loads(s["json"])["text_emb"] == {"short": False, "alt_text": True}
        np.testing.assert_allclose(_load(s["text_emb_alt_text.npy"]), penultimate[i].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_load(s["text_pooled_alt_text.npy"]), out.pooler_output[i].numpy(),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_load(s["text_emb_short.npy"]), penultimate[-1].numpy(), rtol=1e-4, atol=1e-5)
        assert (_load(s["text_mask_short.npy"]) == mask[-1].numpy()).all()


def test_fingerprint_mismatch_is_refused(built, models, tmp_path):
    from diffusers import AutoencoderKL

    cfg, _ = built
    same = AutoencoderKL.from_pretrained(models["kl"])
    assert check_encoder(cfg.shards_dir, "kl", same)["model"] == models["kl"]
    other = AutoencoderKL.from_pretrained(models["kl_other"])
    with pytest.raises(FingerprintMismatch) as err:
        check_encoder(cfg.shards_dir, "kl", other, name=models["kl_other"])
    recorded = json.loads((cfg.shards_dir / "manifest.json").read_text())["encoders"]["kl"]["fingerprint"]
    from pipeline.encoders import fingerprint
    assert recorded[:12] in str(err.value) and fingerprint(other)["fingerprint"][:12] in str(err.value)


def test_resuming_with_other_weights_at_the_same_path_is_refused(curated, models, tmp_path, local_ray):
    run = _copy_run(curated, tmp_path / "run")
    path = tmp_path / "vae"
    shutil.copytree(models["kl"], path)
    cfg = _config(run, f"build.vae.model={path}", "build.keep_image=false")
    build(cfg)
    for sid in (1, 2, 3):  # as if killed after the first shard
        shards.stats_path(cfg.shards_dir, sid).unlink()
        (cfg.shards_dir / f"0000{sid}.tar").unlink()
    shutil.rmtree(path)
    shutil.copytree(models["kl_other"], path)  # same path, other weights
    funnel = build(cfg)
    assert set(funnel["failed_shards"]) == {"1", "2", "3"}
    assert "fingerprint" in funnel["failed_shards"]["1"]
    assert shards.done_shards(cfg.shards_dir) == {0}  # nothing mixed in
    failed = shards.failed_shards(cfg.shards_dir)  # recorded on disk, with the reason
    assert set(failed) == {1, 2, 3} and "FingerprintMismatch" in failed[1]
    other = _config(run, f"build.vae.model={models['kl_other']}", "build.keep_image=false")
    with pytest.raises(shards.StageChanged, match=f"build.vae.model was '{path}', now '{models['kl_other']}'"):
        build(other)


def _tamper(folder: Path, how: str) -> None:
    tar = folder / "00001.tar"
    data = bytearray(tar.read_bytes())
    if how == "truncated":
        tar.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flipped byte":
        data[len(data) // 3] ^= 0x40
        tar.write_bytes(bytes(data))
    else:  # a removed member: rewrite the tar without one sample's latent or pooled text vector
        samples = shards.read_tar(tar)
        first = sorted(samples)[0]
        member = {"removed member": "latent_mean.npy", "removed text member": "text_pooled_alt_text.npy"}[how]
        del samples[first][member]
        shards.write_tar(tar, sorted(samples.items()))


@pytest.mark.parametrize("how,expected", [
    ("truncated", "truncated"), ("flipped byte", "sha256"), ("removed member", "missing ['latent_mean.npy']"),
    ("removed text member", "missing ['text_pooled_alt_text.npy']")])
def test_verify_finds_damage(built, tmp_path, how, expected):
    cfg, _ = built
    folder = tmp_path / "shards"
    shutil.copytree(cfg.shards_dir, folder)
    clean = subprocess.run(tapir_cmd("verify", folder), capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "ok, 4 shards" in clean.stdout
    _tamper(folder, how)
    proc = subprocess.run(tapir_cmd("verify", folder), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    faults = [line for line in proc.stdout.splitlines() if line.startswith("FAULT")]
    assert faults and all("00001.tar" in f for f in faults), proc.stdout
    assert any(expected in f for f in faults), proc.stdout


def test_verify_checks_arrays_even_when_checksums_are_recomputed(built, tmp_path):
    """A shard rewritten with a wrong-shaped latent and a wrong-dtype token array, its manifest
    entry updated to match: only the array checks can find it."""
    import hashlib

    cfg, _ = built
    folder = tmp_path / "shards"
    shutil.copytree(cfg.shards_dir, folder)
    tar = folder / "00002.tar"
    samples = shards.read_tar(tar)
    first, second = sorted(samples)[:2]
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 8, 8), np.float32))
    samples[first]["latent_mean.npy"] = buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, np.zeros((16, 16), np.int64))
    samples[second]["tokens.npy"] = buf.getvalue()
    shards.write_tar(tar, sorted(samples.items()))
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == "00002.tar")
    entry["bytes"], entry["sha256"] = tar.stat().st_size, hashlib.sha256(tar.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    faults, _ = verify(folder, progress=False)
    assert faults == [f"00002.tar: sample {first}: latent_mean.npy is float32[4, 8, 8], expected float32[4, 16, 16]",
                      f"00002.tar: sample {second}: tokens.npy is int64[16, 16], expected uint8[16, 16]"]


def test_verify_reports_a_missing_manifest_and_foreign_tars(built, tmp_path):
    cfg, _ = built
    folder = tmp_path / "shards"
    shutil.copytree(cfg.shards_dir, folder)
    shutil.copy(folder / "00000.tar", folder / "00099.tar")
    faults, _ = verify(folder, progress=False)
    assert faults == ["00099.tar: not in the manifest"]
    (folder / "manifest.json").unlink()
    faults, _ = verify(folder, progress=False)
    assert len(faults) == 1 and "manifest.json not found" in faults[0]


def test_buckets_and_flipped_variants(curated, models, tmp_path, local_ray):
    from diffusers import AutoencoderKL

    run = _copy_run(curated, tmp_path / "run")
    cfg = _config(run, f"build.vae.model={models['kl']}", "build.crop=buckets", "build.bucket_step=16",
                  "build.flip=true", "build.vae.store=mean", "build.samples_per_shard=50")
    funnel = build(cfg)
    buckets = make_buckets(64, 16, 2.0)
    assert (64, 64) in buckets and all(w * h <= 64 * 64 and w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert len(funnel["buckets"]) >= 3  # square, wide and tall images went to different buckets
    vae = AutoencoderKL.from_pretrained(models["kl"]).eval()
    samples = _samples(cfg.shards_dir)
    raw = {}
    for sid in range(3):
        raw.update(shards.read_tar(run / "raw" / f"{sid:05d}.tar"))
    for key, s in samples.items():
        record = json.loads(s["json"])
        w, h = record["size"]
        original = Image.open(io.BytesIO(raw[key]["jpg"])).convert("RGB")
        assert (w, h) == nearest_bucket(*original.size, buckets)
        assert Image.open(io.BytesIO(s["jpg"])).size == (w, h)
        latent = np.load(io.BytesIO(s["latent.npy"]))
        flipped = np.load(io.BytesIO(s["latent_flip.npy"]))
        assert latent.shape == flipped.shape == (4, h // 4, w // 4) and latent.dtype == np.float16
    key = next(k for k, s in samples.items() if json.loads(s["json"])["size"][0] != json.loads(s["json"])["size"][1])
    w, h = json.loads(samples[key]["json"])["size"]
    pixels = np.asarray(ImageOps.fit(Image.open(io.BytesIO(raw[key]["jpg"])).convert("RGB"), (w, h),
                                     method=Image.Resampling.BICUBIC))[:, ::-1]
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean[0].numpy()
    np.testing.assert_allclose(np.load(io.BytesIO(samples[key]["latent_flip.npy"])).astype(np.float32), mean,
                               rtol=2e-3, atol=2e-3)  # stored as float16
    faults, _ = verify(cfg.shards_dir, progress=False)
    assert faults == []


def test_shards_are_cut_by_bytes_and_captions_are_optional(curated, tmp_path, local_ray):
    run = _copy_run(curated, tmp_path / "run")
    shutil.rmtree(run / "captions")  # built straight after select: alt-texts only
    cfg = _config(run, "build.samples_per_shard=1000", "build.max_shard_bytes=40000")
    funnel = build(cfg)
    assert funnel["written"] == 17 and funnel["failed_by_reason"] == {  # the no-caption row has no alt-text
        "decode error": 1, "image missing from the raw tar": 1, "no caption (alt-text empty, no synthetic caption)": 1}
    for s in _samples(cfg.shards_dir).values():
        assert s["txt"] == s["alt.txt"] != b"" and s["short.txt"] == s["descriptive.txt"] == b""
        record = json.loads(s["json"])
        assert (record["txt"], record["txt_fallback"]) == ("alt_text", "not captioned")
    assert funnel["captions"] == {"txt": {"alt_text": 17}, "fallback": {"not captioned": 17}}
    manifest = json.loads((cfg.shards_dir / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 5
    # a plan from the raw image sizes, not a promise: the re-encoded image can differ a little
    assert all(s["bytes"] <= 40000 * 1.1 for s in manifest["shards"]), manifest["shards"]
    planned = [shards.read_stats(cfg.shards_dir, sid) for sid in shards.done_shards(cfg.shards_dir)]
    assert max(s["planned_bytes"] for s in planned) <= 40000 - 10240  # room for the end blocks
    assert max(s["planned"] for s in planned) > 1


def test_kill_then_resume_gives_identical_shards(curated, models, built, tmp_path):
    run = _copy_run(curated, tmp_path / "run")
    cfg_file = tmp_path / "build.yaml"
    cfg_file.write_text(json.dumps({
        "output": str(run), "input": {"path": "unused"}, "resources": {"num_cpus": 2},
        "build": {"resolution": 64, "samples_per_shard": 6, "batch_size": 4, "latent_dtype": "float32",
                  "vae": {"model": models["kl"]}, "vq": {"model": models["vq"]}, "text": {"model": models["text"]}},
    }))
    # killed (driver and Ray workers, SIGKILL) right after the second shard commits
    proc = subprocess.Popen(tapir_cmd("build", cfg_file), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TAPIR_KILL_AFTER_COMMITS": "2"})
    try:
        assert proc.wait(timeout=240) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = run / "shards"
    assert 2 <= len(shards.done_shards(out)) < 4, shards.done_shards(out)  # another actor may commit meanwhile
    resumed = subprocess.run(tapir_cmd("build", cfg_file), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = built[0].shards_dir
    for sid in range(4):
        name = f"{sid:05d}.tar"
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not (out / "_staging").exists()


def test_plain_webdataset_reads_the_shards(built):
    cfg, _ = built
    urls = [str(p) for p in sorted(cfg.shards_dir.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
    samples = list(dataset)
    assert len(samples) == 17
    s = samples[0]
    assert s["jpg"].shape == (64, 64, 3) and isinstance(s["txt"], str)
    assert s["latent_mean.npy"].shape == (4, 16, 16) and s["tokens.npy"].dtype == np.uint8
    assert s["json"]["size"] == [64, 64]


def test_hugging_face_datasets_reads_the_shards(built, tmp_path):
    """From a run with every scorer on: pHash values past 2**63 once made load_dataset overflow."""
    from datasets import load_dataset

    cfg, _ = built
    files = [str(p) for p in sorted(cfg.shards_dir.glob("*.tar"))]
    ds = load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 17
    row = ds[0]
    assert row["jpg"].size == (64, 64) and row["txt"]
    assert {"phash", "phash_mirror", "clip_score", "nsfw_score", "text_area"} <= set(row["json"]["scores"])
    assert max(int(r["scores"]["phash"], 16) for r in ds["json"]) >= 2**63
    assert np.asarray(row["latent_mean.npy"]).shape == (4, 16, 16)
    assert np.asarray(row["tokens.npy"]).shape == (16, 16)


def test_open_clip_train_trains_on_the_image_caption_shards(curated, tmp_path, local_ray):
    run = _copy_run(curated, tmp_path / "run")
    cfg = _config(run, "build.samples_per_shard=8")
    build(cfg)  # the image-and-caption variant: no encoders
    manifest = json.loads((cfg.shards_dir / "manifest.json").read_text())
    assert manifest["encoders"] == {} and manifest["samples"] == 17
    model = tmp_path / "clip"
    model.mkdir()
    (model / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}}))
    shard_list = "::".join(str(p) for p in sorted(cfg.shards_dir.glob("*.tar")))
    proc = subprocess.run(
        [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{model}", "--train-data", shard_list,
         "--dataset-type", "webdataset", "--train-num-samples", "16", "--batch-size", "4", "--epochs", "2",
         "--device", "cpu", "--precision", "fp32", "--workers", "1", "--zeroshot-frequency", "0",
         "--report-to", "", "--logs", str(tmp_path / "logs"), "--name", "tapir", "--save-frequency", "1",
         "--log-every-n-steps", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "tapir" / "out.log").read_text()
    assert "Train Epoch: 1" in log  # the second epoch: the loader went through every shard's end
    assert (tmp_path / "logs" / "tapir" / "checkpoints" / "epoch_2.pt").exists()


def test_bad_inputs_and_sizes_fail_before_encoding(curated, models, tmp_path):
    run = _copy_run(curated, tmp_path / "run")
    with pytest.raises(BuildError, match="not multiples of the kl encoder's downsampling factor 4"):
        build(_config(run, f"build.vae.model={models['kl']}", "build.resolution=62"))
    (run / "raw" / "00001.tar").unlink()
    with pytest.raises(BuildError, match="00001.tar is missing"):
        build(_config(run))


def _change_source_2(run: Path, what: str) -> None:
    if what == "selection":  # reselected since: one kept row of source shard 2 is dropped now
        path = run / "selection" / "00002.parquet"
        rows = pq.read_table(path).to_pylist()
        first = next(r for r in rows if r["keep"])
        first.update(keep=False, reason="clip_score >= 0.3")
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
        record = shards.read_stats(run / "selection", 2)  # and its record, as `tapir select` commits it
        record.update(kept=record["kept"] - 1, kept_digest=kept_digest(r["key"] for r in rows if r["keep"]))
        shards.stats_path(path.parent, 2).write_text(json.dumps(record))
        write_selection_summary(run, N_ROWS, 19)  # the whole selection's record, written last
        return
    else:  # recaptioned since
        path = run / "captions" / "00002.parquet"
        table = pq.read_table(path)
        pq.write_table(table.set_column(table.schema.get_field_index("short"), "short",
                                        pa.array(["a new caption"] * table.num_rows)), path)
        record = {**shards.read_stats(run / "captions", 2), "end_time": 2.0}  # a new commit, a new record
    shards.stats_path(path.parent, 2).write_text(json.dumps(record))


@pytest.mark.parametrize("what", ["selection", "captions"])
def test_changed_inputs_are_refused_or_redone_shard_by_shard(curated, tmp_path, local_ray, what):
    """Shards 2 and 3 hold rows of source shard 2, shards 0 and 1 do not: a changed selection or
    caption there is refused, naming it; with --redo only shards 2 and 3 are built again, and the
    folder ends as a fresh build of the new inputs would."""
    run = _copy_run(curated, tmp_path / "run")
    cfg = _config(run)
    build(cfg)
    before = {sid: shards.record_digest(cfg.shards_dir, sid) for sid in range(4)}
    _change_source_2(run, what)
    with pytest.raises(shards.StageChanged, match=f"build: .* 2 shards \\(00002..00003\\) made differently: .*its "
                                                  f"input {what}/00002.parquet changed since"):
        build(cfg)
    assert {sid: shards.record_digest(cfg.shards_dir, sid) for sid in range(4)} == before  # nothing touched
    funnel = build(_config(run, "redo=true"))
    after = {sid: shards.record_digest(cfg.shards_dir, sid) for sid in range(4)}
    assert [after[s] == before[s] for s in range(4)] == [True, True, False, False]  # 0 and 1 kept as they were
    fresh = _config(run, f"build.output={tmp_path / 'fresh'}")
    assert funnel["written"] == build(fresh)["written"] == (16 if what == "selection" else 17)
    for sid in range(4):
        name = f"{sid:05d}.tar"
        assert (cfg.shards_dir / name).read_bytes() == (fresh.shards_dir / name).read_bytes(), name
    assert verify(cfg.shards_dir, progress=False)[0] == []


def test_a_shard_whose_rows_all_fail_leaves_no_tar(curated, tmp_path, local_ray):
    run = _copy_run(curated, tmp_path / "run")
    raw = shards.read_tar(run / "raw" / "00000.tar")
    del raw["000000000"]  # shard 0 plans keys ...0 (now missing) and ...1 (corrupt)
    shards.write_tar(run / "raw" / "00000.tar", sorted(raw.items()))
    cfg = _config(run, "build.samples_per_shard=2")
    funnel = build(cfg)
    assert funnel["shards"] == funnel["planned_shards"] and not (cfg.shards_dir / "00000.tar").exists()
    assert shards.read_stats(cfg.shards_dir, 0)["count"] == 0
    manifest = json.loads((cfg.shards_dir / "manifest.json").read_text())
    assert manifest["complete"] and "00000.tar" not in {e["name"] for e in manifest["shards"]}
    assert verify(cfg.shards_dir, progress=False)[0] == []


def test_build_config_is_checked_before_work(tmp_path):
    with pytest.raises(ConfigError, match="neither images nor latents"):
        _config(tmp_path, "build.keep_image=false")
    with pytest.raises(ConfigError, match="flip needs an encoder"):
        _config(tmp_path, "build.flip=true")
    with pytest.raises(ConfigError, match="bucket_step must not exceed"):
        _config(tmp_path, "build.crop=buckets", "build.bucket_step=128")
    with pytest.raises(ConfigError, match="build.crop"):
        _config(tmp_path, "build.crop=squash")
    with pytest.raises(ConfigError, match="build.text.captions"):
        _config(tmp_path, "build.text.captions=[]")
    with pytest.raises(ConfigError, match="lists a kind twice"):
        _config(tmp_path, "build.text.captions=[short, alt_text, short]")
    with pytest.raises(ConfigError, match="build.text.captions"):
        _config(tmp_path, "build.text.captions=[title]")


def test_text_settings_change_the_fingerprint_and_speed_settings_do_not(tmp_path):
    from pipeline.build import shard_fingerprint

    slices = [(0, 0, 1)]
    hashes = [shard_fingerprint(_config(tmp_path, *sets), slices, {0: {}})["hash"] for sets in (
        [], ["build.text.captions=[descriptive]"], ["build.text.hidden_layer=-2"], ["build.text.pooled=false"],
        ["build.actors=3", "build.decode_threads=5", f"build.output={tmp_path / 'elsewhere'}"])]
    assert len(set(hashes[:4])) == 4 and hashes[4] == hashes[0]


def test_each_caption_kind_stands_on_its_own_and_fallbacks_are_counted(curated, tmp_path, local_ray):
    """A row whose descriptive caption failed keeps its good short one (status 'partial'), and
    the other way round; per shard, in the funnel and in the manifest, the kind written as txt
    (build.txt_caption is 'short') and why a sample fell back from it."""
    run = _copy_run(curated, tmp_path / "run")
    path = run / "captions" / "00001.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    partial, short_failed, both_failed, uncaptioned = [r for r in rows if r["status"] == "ok"][:4]
    partial.update(status="partial", descriptive=None, reason="descriptive: empty after 3 attempts")
    short_failed.update(status="partial", short=None, reason="short: empty after 3 attempts")
    both_failed.update(status="failed", short=None, descriptive=None, reason="descriptive: timeout; short: timeout")
    rows.remove(uncaptioned)  # e.g. newly kept since recaption ran
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    cfg = _config(run)
    funnel = build(cfg)
    samples = _samples(cfg.shards_dir)

    def fate(row):
        s = samples[row["key"]]
        record = json.loads(s["json"])
        return s["txt"].decode(), s["short.txt"].decode(), s["descriptive.txt"].decode(), record["txt"], \
            record["txt_fallback"]

    assert fate(partial) == (partial["short"], partial["short"], "", "short", None)
    assert fate(short_failed) == (short_failed["descriptive"], "", short_failed["descriptive"], "descriptive",
                                  "caption failed")
    alt = {r["key"]: r["caption"] for r in pq.read_table(run / "raw" / "00001.parquet").to_pylist()}
    assert fate(both_failed) == (alt[both_failed["key"]], "", "", "alt_text", "caption failed")
    assert fate(uncaptioned) == (alt[uncaptioned["key"]], "", "", "alt_text", "not captioned")
    counts = {"txt": {"short": 14, "descriptive": 1, "alt_text": 2}, "fallback": {"caption failed": 2,
                                                                                 "not captioned": 1}}
    assert funnel["captions"] == counts
    assert json.loads((cfg.shards_dir / "manifest.json").read_text())["captions"]["used"] == counts
    per_shard = [shards.read_stats(cfg.shards_dir, sid)["captions"] for sid in sorted(shards.done_shards(
        cfg.shards_dir))]
    assert sum(sum(c["txt"].values()) for c in per_shard) == funnel["written"] == 17


def _cli_build(tmp_path: Path, run: Path, build_section: dict):
    cfg_file = tmp_path / "build.yaml"
    cfg_file.write_text(json.dumps({"output": str(run), "input": {"path": "unused"}, "resources": {"num_cpus": 2},
                                    "build": {"resolution": 64, **build_section}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}  # an empty cache
    return subprocess.run(tapir_cmd("build", cfg_file), capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.parametrize("key,problem", [("vae", "misspelt path"), ("vq", "no weights"),
                                         ("text", "not cached"), ("text", "no tokenizer")])
def test_a_model_that_cannot_load_stops_build_before_any_work(curated, models, tmp_path, key, problem):
    run = _copy_run(curated, tmp_path / "run")
    section = {"vae": {"model": models["kl"]}, "vq": {"model": models["vq"]}, "text": {"model": models["text"]}}
    if problem == "misspelt path":
        bad, reason = models["kl"] + "-typo", f"no such folder {models['kl']}-typo"
    elif problem == "no weights":
        bad = str(tmp_path / "vq")
        shutil.copytree(models["vq"], bad, ignore=shutil.ignore_patterns("*.safetensors"))
        reason = f"no weights file (diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin) in {bad}"
    elif problem == "not cached":
        bad, reason = "tapir-tests/no-such-t5", "not in the local Hugging Face cache while HF_HUB_OFFLINE is set"
    else:
        bad = str(tmp_path / "t5")
        shutil.copytree(models["text"], bad, ignore=shutil.ignore_patterns("tokenizer*", "spiece*", "vocab*"))
        reason = f"no tokenizer file (tokenizer.json or tokenizer_config.json) in {bad}"
    section[key] = {"model": bad}
    proc = _cli_build(tmp_path, run, section)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"tapir: cannot load {bad} (build.{key}.model): ") and reason in lines[0], lines[0]
    assert not (run / "shards").exists()  # before any work


def test_the_driver_plans_from_records_and_reads_no_row(tmp_path, local_ray, monkeypatch):
    """The whole build with the driver forbidden to read a parquet table or open a tar: the plan
    comes from the selection's completion records (kept counts and digests), the rows are read in
    the tasks and actors. The input's name (``source``) and its columns reach the sample's json."""
    import tarfile

    run = tmp_path / "run"
    fates = write_curated_run(run, N_ROWS, per_shard=10)
    cfg = _config(run, "build.max_shard_bytes=40000")
    reads = []

    def tripwire(*args, **kwargs):
        reads.append(args[:1])
        raise AssertionError(f"the driver read rows: {args[:1]}")

    monkeypatch.setattr(pq, "read_table", tripwire)
    monkeypatch.setattr(tarfile, "open", tripwire)
    funnel = build(cfg)
    monkeypatch.undo()
    assert reads == []
    assert funnel["written"] == 17 and funnel["rows_in"] == len(fates)
    plan = json.loads((cfg.shards_dir / "_plan.json").read_text())
    assert plan["sources"] == [[0, 7], [1, 7], [2, 6]] and plan["samples"] == 20  # counts per source, no key
    assert not (cfg.shards_dir / "_plan.parquet").exists()
    planned = [shards.read_stats(cfg.shards_dir, sid) for sid in sorted(shards.done_shards(cfg.shards_dir))]
    assert 1 < plan["per_shard"] < 6 and [s["planned"] for s in planned[:-1]] == [plan["per_shard"]] * (
        len(planned) - 1)  # cut by bytes: as many of the largest sample as fit
    assert max(s["planned_bytes"] for s in planned) <= 40000 - 10240
    assert sorted(p.name for p in (cfg.shards_dir / "_sizes").iterdir()) == ["00000.json", "00001.json", "00002.json"]
    record = json.loads(next(iter(_samples(cfg.shards_dir).values()))["json"])
    assert record["source"] == "synthetic" and set(record["input"]) == {"punsafe"}
    monkeypatch.setattr(tarfile, "open", tripwire)  # a rerun measures nothing again: the sizes are cached
    assert build(cfg)["written"] == 17 and reads == []


def test_verify_as_tasks_finds_a_key_in_two_shards(built, tmp_path):
    """A sample copied into another shard, the manifest updated to match: only the cross-shard
    key check (hash-partitioned, one task per partition) can find it."""
    import hashlib

    cfg, _ = built
    folder = tmp_path / "shards"
    shutil.copytree(cfg.shards_dir, folder)
    first = shards.read_tar(folder / "00000.tar")
    key = sorted(first)[0]
    tar = folder / "00002.tar"
    samples = shards.read_tar(tar)
    samples[key] = first[key]
    shards.write_tar(tar, sorted(samples.items()))
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == "00002.tar")
    entry.update(bytes=tar.stat().st_size, sha256=hashlib.sha256(tar.read_bytes()).hexdigest(),
                 samples=entry["samples"] + 1)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    faults, summary = verify(folder, progress=False, keys_per_partition=4, local_below=0)  # tasks, 5 partitions
    assert faults == [f"00002.tar: sample {key} also in 00000.tar"] and summary["shards"] == 4
    assert not list(folder.glob("_verify*"))


def test_report_draws_its_visuals_from_a_sample_of_shards(tmp_path, local_ray):
    from pipeline.report import report

    run = tmp_path / "run"
    write_curated_run(run, N_ROWS, per_shard=5)  # 6 shards
    funnel, _ = report(run, sample_shards=2)
    assert funnel["select"]["kept"] == 20 and funnel["recaption"]["rows_in"] == 20
    assert funnel["recaption"]["failed_by_reason"] == {"descriptive: empty": 1}  # read in a task, per shard
    assert funnel["download"]["rows_out"] == N_ROWS and funnel["lineage"]["counts"]["kept"] == 20
    page = (run / "report" / "index.html").read_text()
    assert "of 2 sampled score shard(s): 00000, 00005" in page
    assert (run / "report" / "samples.png").exists() and (run / "report" / "captions.png").exists()


def test_build_verify_and_report_on_an_object_store(s3, tmp_path, local_ray):
    """The run folder on the loopback S3 server: the plan, the build actors, verify's tasks and the
    report read and write through s3fs (the shards are uploaded whole, the record last)."""
    import fsspec

    from pipeline import storage
    from pipeline.report import report

    local = tmp_path / "run"
    write_curated_run(local, 12, per_shard=6, faults=False)
    fsspec.filesystem("s3").put(str(local), f"{s3[len('s3://'):]}/run", recursive=True)
    run = f"{s3}/run"
    cfg = _config(run, "build.samples_per_shard=5")
    funnel = build(cfg)
    assert funnel["written"] == 8 and funnel["shards"] == 2, funnel
    faults, summary = verify(f"{run}/shards", progress=False, local_below=0)
    assert faults == [] and summary["samples"] == 8
    assert not list(storage.path(f"{run}/shards").glob("_verify*"))
    found, _ = report(run, sample_shards=1)
    assert found["build"]["written"] == 8 and found["lineage"]["counts"]["written"] == 8
    assert storage.path(f"{run}/report/index.html").exists() and storage.path(f"{run}/report/samples.png").exists()
