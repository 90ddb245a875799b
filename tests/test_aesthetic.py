"""The aesthetic head over stored CLIP embeddings (LAION's predictor formats), alone and in the
score stage: weights saved from heads built here, loaded through the same loader a user's are."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import make_config

from filters.aesthetic import AestheticScorer, build_head, check_aesthetic, load_state_dict
from pipeline import shards, storage
from pipeline.config import ModelLoadError


def improved_predictor(dim: int, seed: int = 0) -> torch.nn.Module:
    """christophschuhmann/improved-aesthetic-predictor's MLP, as its repository defines it."""

    class MLP(torch.nn.Module):
        def __init__(self, input_size):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
                torch.nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(seed)
    return MLP(dim).eval()


def linear_head(dim: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(dim, 1).eval()  # sa_0_4_vit_l_14_linear.pth: keys weight, bias


def save(head: torch.nn.Module, path) -> str:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
    else:
        torch.save(head.state_dict(), str(path))
    return str(path)


def _embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)  # as the clip scorer stores them


def _expected(head, emb: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.nn.functional.normalize(torch.from_numpy(emb.astype(np.float32)), dim=-1)
        return head(x)[:, 0].numpy()


@pytest.mark.parametrize("make,suffix", [(improved_predictor, ".pth"), (improved_predictor, ".safetensors"),
                                         (linear_head, ".pth")], ids=["mlp-pth", "mlp-safetensors", "linear-pth"])
def test_scores_are_the_head_on_normalised_embeddings(tmp_path, make, suffix):
    head = make(64)
    weights = save(head, tmp_path / f"head{suffix}")
    emb = _embeddings(6, 64)
    table = pa.table({"key": list("abcdef"), "clip_embedding": pa.array(
        [None if i == 2 else e for i, e in enumerate(emb)], pa.list_(pa.float16(), 64))})
    scorer = AestheticScorer(weights)
    scorer.setup()
    out = scorer(table)
    got = out["aesthetic_score"].to_pylist()
    assert out.schema.field("aesthetic_score").type == pa.float32() and got[2] is None  # no embedding, no score
    want = _expected(head, emb)
    assert np.allclose([g for i, g in enumerate(got) if i != 2], np.delete(want, 2), atol=1e-5)
    assert scorer(out).column_names == out.column_names  # a rerun replaces the column, never adds one


def test_architecture_is_told_from_the_keys(tmp_path):
    mlp = build_head(load_state_dict(save(improved_predictor(32), tmp_path / "a.pth")))
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [1024, 128, 64, 16, 1]
    lin = build_head(load_state_dict(save(linear_head(32), tmp_path / "b.pth")))
    assert isinstance(lin, torch.nn.Linear) and lin.in_features == 32


def test_weights_that_cannot_serve_name_the_key(tmp_path):
    clip = f"local-dir:{tmp_path / 'clip'}"
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 64}}))
    torch.save({"fc.weight": torch.zeros(1, 64)}, tmp_path / "odd.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "pickled.pth")  # not tensors
    cases = [(str(tmp_path / "missing.pth"), "FileNotFoundError"), (str(tmp_path / "odd.pth"), "unrecognised keys"),
             (str(tmp_path / "pickled.pth"), ""), (save(linear_head(768), tmp_path / "l14.pth"),
                                                   "reads 768-d embeddings; score.clip.model local-dir:")]
    for weights, reason in cases:
        with pytest.raises(ModelLoadError) as err:
            check_aesthetic(weights, clip)
        assert err.value.key == "score.aesthetic.weights" and reason in err.value.reason, str(err.value)
    check_aesthetic(save(linear_head(64), tmp_path / "ok.pth"), clip)


def test_rules_on_aesthetic_score_need_the_head_configured(tmp_path):
    from filters.rules import RuleError, parse
    from pipeline.score import expected_schema

    cfg = make_config(tmp_path / "run", "unused.parquet", "score.aesthetic.weights=/any/head.pth")
    assert expected_schema(cfg.score).field("aesthetic_score").type == pa.float32()
    parse(["aesthetic_score >= 5.5", "top 30% by aesthetic_score"], expected_schema(cfg.score))
    off = make_config(tmp_path / "run", "unused.parquet")
    with pytest.raises(RuleError, match="unknown score 'aesthetic_score'"):
        parse(["aesthetic_score >= 5.5"], expected_schema(off.score))
    from pipeline.select import check_rules  # what `tapir run` checks before any work

    check_rules(make_config(tmp_path / "run", "unused.parquet", "score.aesthetic.weights=/any/head.pth",
                            'select.rules=["aesthetic_score >= 5.5"]'))
    with pytest.raises(RuleError, match="unknown score 'aesthetic_score'"):
        check_rules(make_config(tmp_path / "run", "unused.parquet", 'select.rules=["aesthetic_score >= 5.5"]'))
    with pytest.raises(ValueError, match="needs the clip scorer"):
        make_config(tmp_path / "run", "unused.parquet", "score.aesthetic.weights=/h.pth", "score.scorers=[basic]",
                    "score.dedup.near=false", "score.dedup.semantic=false")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Downloaded-looking shards (images stored at half their original size) and a tiny CLIP."""
    from filters.clip import save_local_clip
    from pipeline.synthweb import write_curated_run

    tmp = tmp_path_factory.mktemp("aesthetic")
    write_curated_run(tmp / "src", 6, per_shard=3, faults=False, drop_every=None)
    return tmp, save_local_clip(tmp / "clip")


def _config(tmp, clip, weights, *more):
    return make_config(tmp / "run", "unused.parquet", f"score.input={tmp / 'src' / 'raw'}", "score.scorers=[basic,clip]",
                       f"score.clip.model={clip}", "score.clip.pretrained=null", "score.dedup.near=false",
                       "score.dedup.semantic=false", f"score.aesthetic.weights={weights}", *more)


def _shard(cfg, sid):
    return storage.read_parquet(shards.shard_file(cfg.scores_dir, sid, ".parquet"))


def test_score_stage_adds_the_aesthetic_column_and_redoes_it_without_images(local_ray, small_run, tmp_path):
    import shutil

    from pipeline.score import score, shard_fingerprint

    tmp, clip = small_run
    shutil.copytree(tmp / "src", tmp_path / "src")
    first = save(improved_predictor(64), tmp_path / "first.safetensors")
    cfg = _config(tmp_path, clip, first)
    funnel = score(cfg)
    assert not funnel.get("failed_shards") and funnel["shards"] == 2
    for sid in (0, 1):
        t = _shard(cfg, sid)
        emb = np.stack(t["clip_embedding"].to_numpy(zero_copy_only=False))
        assert np.allclose(t["aesthetic_score"].to_numpy(), _expected(improved_predictor(64), emb), atol=1e-5)
        assert shards.read_stats(cfg.scores_dir, sid)["scorers"] == ["basic", "clip", "aesthetic"]
        # sizes are the originals img2dataset recorded (the stored images are half as wide and high)
        raw = storage.read_parquet(shards.shard_file(tmp_path / "src" / "raw", sid, ".parquet")).sort_by("key")
        assert t["width"].to_pylist() == raw["original_width"].to_pylist()
        assert t["min_side"].to_pylist() == [min(w, h) for w, h in zip(raw["original_width"].to_pylist(),
                                                                        raw["original_height"].to_pylist())]
    before = _shard(cfg, 0)
    # other weights: refused, then redone with --redo from the stored embeddings: no image is read again
    second = save(linear_head(64, seed=5), tmp_path / "second.pth")
    other = _config(tmp_path, clip, second)
    with pytest.raises(shards.StageChanged, match=r"score\.aesthetic\.weights was '.*first.safetensors', now"):
        score(other)
    for tar in (tmp_path / "src" / "raw").glob("*.tar"):
        tar.unlink()
    funnel = score(_config(tmp_path, clip, second, "redo=true"))
    assert not funnel.get("failed_shards")
    after = _shard(other, 0)
    assert after.drop_columns(["aesthetic_score"]).equals(before.drop_columns(["aesthetic_score"]))
    emb = np.stack(after["clip_embedding"].to_numpy(zero_copy_only=False))
    assert np.allclose(after["aesthetic_score"].to_numpy(), _expected(linear_head(64, seed=5), emb), atol=1e-5)
    assert shards.read_stats(other.scores_dir, 0)["fingerprint"]["hash"] == shard_fingerprint(other, 0)["hash"]
    score(other)  # now in step: nothing to do, nothing refused
