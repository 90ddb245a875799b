"""The autoregressive model (LlamaGen-style): it memorises sequences and greedy sampling returns them, the KV
cache samples as the full recomputation, guidance at scale 1 is conditional sampling, padding is masked out,
and the named sizes have LlamaGen's parameter counts."""

import json

import pytest
import torch

from training.ar_model import AR_SIZES, ARTransformer, _sample, ar_arguments, loss, sample

CODES, GRID, TEXT_DIM, TEXT_LEN = 16, (4, 4), 8, 5


def _texts(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random text embeddings (n, T, E) and masks (n, T) with 0-3 padding positions at the end."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g)
    lengths = torch.randint(2, TEXT_LEN + 1, (n,), generator=g)
    mask = (torch.arange(TEXT_LEN)[None] < lengths[:, None]).long()
    return emb, mask


def _model(seed: int = 0, std: float | None = None) -> ARTransformer:
    torch.manual_seed(seed)
    model = ARTransformer("tiny", CODES, GRID, TEXT_DIM, TEXT_LEN)
    if std is not None:  # random weights large enough for peaked, position-dependent predictions
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1:
                    p.normal_(std=std)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is fastest, and far faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_model() -> ARTransformer:
    return _model(1, std=0.5)


def _null() -> tuple[torch.Tensor, torch.Tensor]:
    return _texts(1, seed=99)


def test_overfits_and_greedy_sampling_reproduces():
    model = _model().train()
    emb, mask = _texts(4, seed=0)
    mask[0, -2:] = 0  # at least one caption padded, with the predicting position T-1 padding
    tokens = torch.randint(0, CODES, (4, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(400):
        value = loss(model(tokens, emb, mask), tokens)
        opt.zero_grad()
        value.backward()
        opt.step()
        if value.item() < 0.01:
            break
    assert value.item() < 0.01
    null_emb, null_mask = _null()
    assert torch.equal(sample(model, emb, mask, null_emb, null_mask, temperature=0.0), tokens)
    assert model.training  # sampling restores the mode


def test_kv_cache_samples_as_recomputation(random_model):
    emb, mask = _texts(5, seed=2)
    null_emb, null_mask = _null()
    runs = [sample(random_model, emb, mask, null_emb, null_mask, cfg_scale=3.0, temperature=1.0, top_k=8, top_p=0.9,
                   generator=torch.Generator().manual_seed(7), use_cache=use_cache) for use_cache in (True, False)]
    assert runs[0].shape == (5, GRID[0] * GRID[1]) and runs[0].dtype == torch.long
    assert torch.equal(runs[0], runs[1])
    assert len(runs[0].unique()) > 4  # a real draw, not one code everywhere
    greedy = [sample(random_model, emb, mask, null_emb, null_mask, cfg_scale=3.0, temperature=0.0,
                     use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(greedy[0], greedy[1])


def test_guidance_at_scale_one_is_conditional_sampling(random_model):
    emb, mask = _texts(4, seed=3)
    null_emb, null_mask = _null()
    # greedy decoding by hand: the full conditional forward, its argmax at each position in turn
    tokens = torch.zeros(4, GRID[0] * GRID[1], dtype=torch.long)
    with torch.no_grad():
        for i in range(tokens.shape[1]):
            tokens[:, i] = random_model(tokens, emb, mask)[:, i].argmax(-1)
    for guided in (False, True):
        assert torch.equal(_sample(random_model, emb, mask, null_emb, null_mask, 1.0, 0.0, None, None, None,
                                   use_cache=True, guided=guided), tokens)
    drawn = [_sample(random_model, emb, mask, null_emb, null_mask, 1.0, 1.0, 10, None,
                     torch.Generator().manual_seed(5), use_cache=True, guided=guided) for guided in (False, True)]
    assert torch.equal(drawn[0], drawn[1])
    assert torch.equal(drawn[0], sample(random_model, emb, mask, null_emb, null_mask, cfg_scale=1.0, top_k=10,
                                        generator=torch.Generator().manual_seed(5)))
    # the unconditional stream does act at other scales
    assert not torch.equal(sample(random_model, emb, mask, null_emb, null_mask, cfg_scale=3.0, temperature=0.0),
                           tokens)


def test_padding_is_masked_out(random_model):
    emb, mask = _texts(3, seed=4)
    mask[:, 2:] = 0
    mask[1, 2:] = 1  # row 1 unpadded
    tokens = torch.randint(0, CODES, (3, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = random_model(tokens, emb, mask)
        changed = emb.clone()
        changed[:, 2:] = torch.randn(3, TEXT_LEN - 2, TEXT_DIM)  # padding of rows 0 and 2, including position T-1
        after = random_model(tokens, changed, mask)
        torch.testing.assert_close(after[[0, 2]], logits[[0, 2]], rtol=0, atol=1e-6)
        assert (after[1] - logits[1]).abs().max() > 0.1
        changed = emb.clone()
        changed[0, 1] += 1.0  # an unmasked position
        assert (random_model(tokens, changed, mask)[0] - logits[0]).abs().max() > 0.1
        # padding takes no part in attention: RoPE is relative, so a caption padded on the left (every position
        # shifted) gives the logits of the same caption unpadded, from the model and from the sampler
        left = torch.cat([torch.randn(3, 2, TEXT_DIM), emb[:, :3]], 1)
        left_mask = torch.cat([torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 3, dtype=torch.long)], 1)
        ones = torch.ones(3, 3, dtype=torch.long)
        torch.testing.assert_close(random_model(tokens, left, left_mask), random_model(tokens, emb[:, :3], ones),
                                   rtol=1e-4, atol=1e-4)
    null_emb, null_mask = _null()
    assert torch.equal(sample(random_model, left, left_mask, null_emb, null_mask, temperature=0.0),
                       sample(random_model, emb[:, :3], ones, null_emb[:, :3], null_mask[:, :3], temperature=0.0))


def test_top_k_and_top_p_filter(random_model):
    emb, mask = _texts(4, seed=6)
    null_emb, null_mask = _null()
    greedy = sample(random_model, emb, mask, null_emb, null_mask, cfg_scale=2.0, temperature=0.0)
    for filters in ({"top_k": 1}, {"top_p": 1e-6}):  # either keeps only the most likely code
        assert torch.equal(sample(random_model, emb, mask, null_emb, null_mask, cfg_scale=2.0, temperature=2.0,
                                  generator=torch.Generator().manual_seed(0), **filters), greedy)
    assert not torch.equal(sample(random_model, emb, mask, null_emb, null_mask, cfg_scale=2.0, temperature=2.0,
                                  generator=torch.Generator().manual_seed(0)), greedy)


def test_sizes_shapes_and_arguments(tmp_path):
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in ARTransformer(name, 16384, (16, 16), 2048, 120).parameters())
                  for name in ("B", "L", "XL")}
    assert 100e6 < counts["B"] < 150e6 and 300e6 < counts["L"] < 400e6 and 700e6 < counts["XL"] < 850e6, counts
    assert AR_SIZES["B"]["intermediate_size"] == 2048 and AR_SIZES["L"]["intermediate_size"] == 2816
    assert ar_arguments("100M") == ar_arguments("B") and ar_arguments("700M") == AR_SIZES["XL"]
    args = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}
    (tmp_path / "mine.json").write_text(json.dumps(args))
    assert ar_arguments(str(tmp_path / "mine.json")) == args
    with pytest.raises(ValueError, match="tiny, B, L, XL"):
        ar_arguments("huge")

    model = ARTransformer(str(tmp_path / "mine.json"), CODES, GRID, TEXT_DIM, TEXT_LEN)
    assert len(model.blocks()) == 3 and model.llm.config.hidden_size == 32
    codes = torch.tensor([[3, 9]])  # raster positions 5 and 6 of the 4x4 grid: row 1, columns 1 and 2
    torch.testing.assert_close(model.embed(codes, 5)[0], model.llm.model.embed_tokens.weight[[3, 9]]
                               + model.row_embed.weight[[1, 1]] + model.col_embed.weight[[1, 2]])
    assert model.llm.config.max_position_embeddings == TEXT_LEN + 16
    rebuilt = ARTransformer(**json.loads(json.dumps(model.config())))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    emb, mask = _texts(2, seed=5)
    tokens = torch.randint(0, CODES, (2, 16))
    model.train().gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.blocks())
    logits = model(tokens, emb, mask)
    assert logits.shape == (2, 16, CODES) and logits.dtype == torch.float32
    value = loss(logits, tokens)
    value.backward()
    assert value.shape == () and all(p.grad is not None for p in model.parameters())
