"""training/evaluate.py on a tiny random CLIP saved locally and three skimage photos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from filters.clip import load_clip, save_local_clip
from training.evaluate import Evaluator, frechet_distance, inception_weights_path

PROMPTS = ["an astronaut in a white suit", "a tabby cat", "a cup of coffee"]


def photos(size=(80, 96)) -> torch.Tensor:
    """(3, 3, H, W) uint8: astronaut, chelsea, coffee, resized (not square: the crop matters)."""
    from skimage import data

    ims = [Image.fromarray(getattr(data, n)()).resize(size[::-1], Image.BICUBIC) for n in ("astronaut", "chelsea", "coffee")]
    return torch.from_numpy(np.stack([np.asarray(im) for im in ims])).permute(0, 3, 1, 2).contiguous()


def with_moments(mu, cov, n=50, seed=0) -> torch.Tensor:
    """n samples whose empirical mean and (unbiased) covariance are exactly mu and cov."""
    mu, cov = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
    x = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    x = torch.linalg.solve_triangular(torch.linalg.cholesky(torch.cov(x.T)), x.T, upper=False).T
    return x @ torch.linalg.cholesky(cov).T + mu


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_local_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def evaluator(clip_dir):
    return Evaluator(clip_dir, None, fid="clip")


def test_frechet_of_a_set_to_itself_is_zero_and_grows_with_a_shift(evaluator):
    real = torch.cat([photos(), photos().flip(-1)])
    assert abs(evaluator.frechet(real, real)) < 1e-6
    near = evaluator.frechet(real, (real.int() + 20).clamp(0, 255).to(torch.uint8))
    far = evaluator.frechet(real, (real.int() + 120).clamp(0, 255).to(torch.uint8))
    assert 0 < near < far
    f = evaluator.features(real)
    assert f.dtype == torch.float64 and f.shape == (6, 64)
    delta = torch.full((64,), 0.1, dtype=torch.float64)
    assert frechet_distance(f, f + delta) == pytest.approx(float(delta @ delta), rel=1e-6)


def test_frechet_matches_closed_forms():
    # Diagonal (commuting) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance(with_moments(mu1, torch.diag(a)), with_moments(mu2, torch.diag(b), n=70, seed=1))
    assert got == pytest.approx(expected, rel=1e-9)
    # Non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2.
    s1 = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, -0.5], [-0.5, 3.0]], dtype=torch.float64)
    m = s1 @ s2
    expected = 1.0 + float(s1.trace() + s2.trace() - 2 * torch.sqrt(m.trace() + 2 * torch.sqrt(torch.det(m))))
    got = frechet_distance(with_moments([0.0, 0.0], s1), with_moments([1.0, 0.0], s2, seed=2))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_with_fewer_samples_than_dims_is_finite_and_matches_scipy_when_full_rank():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    few = frechet_distance(torch.randn(5, 64, generator=g), torch.randn(7, 64, generator=g) + 1)
    assert math.isfinite(few) and few > 0
    x, y = torch.randn(200, 8, generator=g, dtype=torch.float64), 2 * torch.randn(300, 8, generator=g, dtype=torch.float64)
    s1, s2 = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
    ref = float(np.sum((x.mean(0) - y.mean(0)).numpy() ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-8)


def test_clip_score_equals_a_direct_open_clip_computation(evaluator, clip_dir):
    images = photos()
    score = evaluator.clip_score(images, PROMPTS)
    assert 0 <= score <= 100
    model, preprocess, tokenizer = load_clip(clip_dir)
    with torch.no_grad():
        # Same pixels through the model's own encoders: the formula is exact.
        pixels = evaluator.normalize(evaluator.geometry(images).float() / 255)
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
        cos = (img * txt).sum(-1)
        assert score == pytest.approx(float(100 * cos.clamp(min=0).mean()), abs=1e-4)
        # open_clip's PIL preprocess: the tensor path agrees up to resampling differences.
        pil = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
        cos_pil = (torch.nn.functional.normalize(model.encode_image(pil), dim=-1) * txt).sum(-1)
    assert (cos > 0).any() and torch.allclose(cos, cos_pil, atol=5e-3), (cos, cos_pil)
    assert evaluator.clip_score(images, PROMPTS[::-1]) != pytest.approx(score)


def test_feature_name_falls_back_to_clip_and_inception_says_where(clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert not inception_weights_path().exists()
    assert "clip" in Evaluator(clip_dir, None, fid="auto").feature_name.lower()
    with pytest.raises(FileNotFoundError, match=str(inception_weights_path())):
        Evaluator(clip_dir, None, fid="inception")
