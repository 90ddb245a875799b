"""A CLIP model that cannot load stops `tapir score` before any work, in one line (issue 11, item 9)."""

import json
import os
import subprocess

import pytest
from conftest import tapir_cmd

from filters.clip import check_clip, save_local_clip
from pipeline.config import ModelLoadError, load_config


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_local_clip(tmp_path_factory.mktemp("clip") / "tiny")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Downloaded-looking shards to score: without the preflight, scoring them would start Ray."""
    from pipeline.synthweb import write_curated_run

    out = tmp_path_factory.mktemp("src")
    write_curated_run(out, 6, per_shard=3, faults=False)
    return out / "raw"


def test_check_clip_resolves_what_load_clip_loads(tiny_clip, tmp_path):
    folder = tiny_clip.split(":", 1)[1]
    assert check_clip(tiny_clip, None).endswith("open_clip_model.safetensors")
    assert check_clip("ViT-B-32", None) is None  # random weights, as configured
    weights = tmp_path / "mine.safetensors"
    weights.write_bytes(b"x")
    assert check_clip("ViT-B-32", str(weights)) == str(weights)  # a checkpoint file instead of a tag
    assert os.path.isdir(folder)


def _bad_local_dirs(tmp_path, tiny_clip):
    import shutil

    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_clip.split(":", 1)[1], folder)
    (folder / "open_clip_model.safetensors").unlink()
    broken = tmp_path / "broken-config"
    broken.mkdir()
    (broken / "open_clip_config.json").write_text("{not json")
    return f"local-dir:{folder}", f"local-dir:{broken}"


def test_models_that_cannot_load_name_their_key(tiny_clip, tmp_path):
    no_weights, broken = _bad_local_dirs(tmp_path, tiny_clip)
    cases = [
        (("ViT-B-31", "openai"), "score.clip.model", "did you mean ViT-B-32"),
        (("ViT-B-32", "laion2b_s34b_b79"), "score.clip.pretrained", "neither a pretrained tag of ViT-B-32"),
        (("ViT-B-32", str(tmp_path / "missing.pt")), "score.clip.pretrained", "nor an existing checkpoint"),
        ((f"local-dir:{tmp_path / 'nowhere'}", None), "score.clip.model", "does not exist"),
        ((no_weights, None), "score.clip.model", "no weights file"),
        ((broken, None), "score.clip.model", "no valid open_clip_config.json"),
        (("hf-hub:tapir-tests/no-such-repo", None), "score.clip.model", "HF_HUB_OFFLINE is set"),  # offline in tests
    ]
    for (model, pretrained), key, reason in cases:
        with pytest.raises(ModelLoadError) as err:
            check_clip(model, pretrained)
        assert err.value.key == key and reason in err.value.reason, (model, pretrained, str(err.value))
        assert "\n" not in str(err.value)


def test_score_stops_before_any_work(tmp_path, raw):
    from pipeline.score import score

    cfg = load_config(None, [f"output={tmp_path / 'run'}", "input.path=nowhere.parquet", f"score.input={raw}",
                             "score.clip.pretrained=no_such_tag"])
    with pytest.raises(ModelLoadError, match=r"cannot load no_such_tag \(score\.clip\.pretrained\)"):
        score(cfg)
    assert not cfg.scores_dir.exists()


@pytest.mark.parametrize("overrides,key,value", [
    ({}, "score.clip.pretrained", "laion2b_s34b_b79k"),  # the default CLIP, weights not cached, offline
    ({"score": {"clip": {"pretrained": "no_such_tag"}}}, "score.clip.pretrained", "no_such_tag"),
    ({"score": {"clip": {"model": "local-dir:/nonexistent/clip", "pretrained": None}}}, "score.clip.model",
     "local-dir:/nonexistent/clip"),
], ids=["default-uncached", "bogus-tag", "missing-dir"])
def test_cli_score_with_a_model_that_cannot_load_is_one_line_and_exit_2(tmp_path, raw, overrides, key, value):
    overrides = json.loads(json.dumps(overrides))
    overrides.setdefault("score", {})["input"] = str(raw)
    config = {"output": str(tmp_path / "run"), "input": {"path": "nowhere.parquet"}} | overrides
    path = tmp_path / "score.yaml"
    path.write_text(json.dumps(config))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}  # nothing cached
    proc = subprocess.run(tapir_cmd("score", path), capture_output=True, text=True, timeout=300, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert key in lines[0] and value in lines[0], lines[0]
    assert not (tmp_path / "run" / "scores").exists()


def test_clip_and_aesthetic_weights_load_from_s3(s3, tiny_clip):
    """A local-dir: CLIP folder and an aesthetic head on the object store: checked, then loaded
    (copied to a temporary local folder for open_clip) like local ones."""
    import torch

    from filters.aesthetic import AestheticScorer, check_aesthetic
    from filters.clip import load_clip
    from pipeline import storage

    folder = tiny_clip.split(":", 1)[1]
    for f in os.listdir(folder):
        storage.upload(os.path.join(folder, f), f"{s3}/models/clip/{f}")
    remote = f"local-dir:{s3}/models/clip"
    assert check_clip(remote, None) == f"{s3}/models/clip/open_clip_model.safetensors"
    model, _, _ = load_clip(remote)
    local, _, _ = load_clip(tiny_clip)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_clip(f"local-dir:{s3}/models/nothing", None)
    head = torch.nn.Linear(64, 1)
    path = storage.path(f"{s3}/models/head.pth")
    with path.open("wb") as f:
        torch.save(head.state_dict(), f)
    check_aesthetic(str(path), remote)  # 64-d head, 64-d tiny CLIP
    scorer = AestheticScorer(str(path))
    scorer.setup()
    x = torch.nn.functional.normalize(torch.ones(1, 64), dim=-1)
    with torch.no_grad():
        want = float(head(x)[0, 0])
    assert scorer.score(torch.ones(1, 64).numpy())[0] == pytest.approx(want, abs=1e-6)
