"""The bf16 GPU paths users run on clusters: CLIP scoring, captioning, the build's encoders,
and one actor per GPU. Marked ``gpu``: skipped (and reported as skipped) without CUDA,
run when a GPU machine is lent (``python -m pytest -m gpu``). Each compares the bf16 GPU
result with the fp32 CPU result of the same model through the same stage code."""

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu


def _images(n=6, size=64, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = np.zeros((size, size, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        a[y:y + size // 3, x:x + size // 3] = rng.integers(0, 255, 3, dtype=np.uint8)
        out.append(Image.fromarray(a))
    return out


def test_clip_bf16_on_gpu_matches_fp32_on_cpu(tmp_path):
    from filters.clip import ClipScorer, save_local_clip

    model = save_local_clip(tmp_path / "clip")
    batch = {"image": _images(), "caption": ["a red square", "a blue circle", "", "a cat", "two dogs", "text"]}
    results = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "bf16")):
        scorer = ClipScorer(model, None, device, precision)
        scorer.setup()
        assert scorer.precision == precision
        results[device] = scorer(dict(batch))
    cpu, gpu = np.array(results["cpu"]["clip_score"]), np.array(results["cuda"]["clip_score"])
    assert np.abs(cpu - gpu).max() < 0.02, (cpu, gpu)
    emb_c = np.stack(results["cpu"]["clip_embedding"]).astype(np.float32)
    emb_g = np.stack(results["cuda"]["clip_embedding"]).astype(np.float32)
    assert (emb_c * emb_g).sum(-1).min() > 0.99  # cosine of unit vectors


def test_captioner_bf16_on_gpu_generates_like_fp32(tmp_path):
    from recaption.backends import TransformersCaptioner
    from recaption.tiny import save_tiny_blip

    model = save_tiny_blip(tmp_path / "blip")
    images = _images(4)
    outs = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "bf16")):
        cap = TransformersCaptioner(model, device, precision, max_new_tokens=12)
        cap.setup()
        assert next(cap.model.parameters()).device.type == device
        outs[device] = cap.generate(images, ["a picture of"] * 4, ["a picture of"] * 4, {})
    assert all(err is None and text for text, _, err in outs["cuda"])
    # random weights: bf16 may flip a near-tied argmax late in a caption, not the first words
    same = sum(c[0].split()[:2] == g[0].split()[:2] for c, g in zip(outs["cpu"], outs["cuda"]))
    assert same >= 3, (outs["cpu"], outs["cuda"])


def test_build_encoders_bf16_on_gpu_match_fp32(tmp_path):
    from pipeline.encoders import Encoders, save_tiny_kl, save_tiny_vq

    kl, vq = save_tiny_kl(tmp_path / "kl"), save_tiny_vq(tmp_path / "vq")
    images = np.stack([np.asarray(im) for im in _images(4)])
    out = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "bf16")):
        enc = Encoders(vae=kl, vq=vq, latent_dtype="float32", device=device, precision=precision)
        enc.setup()
        out[device] = enc.encode_images(images)
    a, b = out["cpu"]["latent_mean.npy"], out["cuda"]["latent_mean.npy"]
    assert np.abs(a - b).max() / (np.abs(a).max() + 1e-6) < 0.03
    ta, tb = out["cpu"]["tokens.npy"], out["cuda"]["tokens.npy"]
    assert (ta == tb).mean() > 0.9  # bf16 may move a code at a near tie, not most of them


def test_one_score_actor_per_gpu(tmp_path, url_list):
    """With GPUs in the cluster, the model scorers run one actor per GPU, on the GPU."""
    from conftest import make_config

    from filters.clip import save_local_clip
    from pipeline import ray_backend
    from pipeline.download import download
    from pipeline.score import score

    cfg = make_config(tmp_path / "run", url_list, f"score.clip.model={save_local_clip(tmp_path / 'clip')}",
                      "score.clip.pretrained=null", "score.scorers=[clip]")
    ray_backend.init(None, 4)
    try:
        download(cfg)
        gpus = ray_backend.cluster_gpus()
        assert gpus >= 1
        funnel = score(cfg)
    finally:
        ray_backend.shutdown()
    assert funnel["scored"] > 0 and not funnel.get("failed_shards")
    assert torch.cuda.device_count() == gpus
