"""The synthetic world's models (issue 13): trained by Tapir's own tools, loaded like pretrained ones."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from training import attributes, world

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "models" / "world"  # what `tapir world-models` wrote, committed (small)


def test_near_miss_swaps_exactly_one_attribute_and_partial_describes_part():
    from pipeline.synthweb import near_miss, partial, random_scene

    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        miss, what = near_miss(scene, rng)
        diffs = [(i, j) for i, (a, b) in enumerate(zip(scene.objects, miss.objects)) for j in range(5) if a[j] != b[j]]
        assert len(diffs) == 1 and miss.background == scene.background
        assert {0: "count", 2: "colour", 3: "shape", 4: "position"}[diffs[0][1]] == what
        assert miss.caption() != scene.caption()
        part = partial(scene, rng)
        assert set(part.objects) <= set(scene.objects)
        assert len(part.objects) == 1


def test_noisy_world_has_near_misses_and_partial_captions_that_differ_from_the_truth():
    from pipeline.synthweb import build_world

    rows = build_world(400, seed=0).rows
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("alt_near_miss", "alt_partial")}
    assert all(len(v) >= 5 for v in kinds.values()), {k: len(v) for k, v in kinds.items()}
    for r in kinds["alt_near_miss"] + kinds["alt_partial"]:
        assert r["alt"] and r["alt"] != r["true_caption"] and r["fate"] == "success"


def test_world_clip_trains_with_open_clip_train_on_tapirs_shards_and_loads_like_a_pretrained_clip(tmp_path):
    """A tiny run of the real recipe: Tapir downloads a clean world into raw/ shards, open_clip_train
    (a child process, unmodified) trains on them, and the result loads through filters.clip.load_clip."""
    from filters.clip import load_clip

    raw = world.clean_shards(tmp_path / "data", rows=160, per_shard=80, image_size=32)
    assert sorted(p.name for p in raw.glob("*.tar")) == ["00000.tar", "00001.tar"]
    tiny = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 48, "vocab_size": 0, "width": 32, "heads": 2, "layers": 1}}
    ident = world.train_clip(raw, tmp_path / "clip", epochs=2, batch_size=32, model_cfg=tiny)
    assert ident == f"local-dir:{(tmp_path / 'clip' / 'model').resolve()}"
    trained = json.loads((tmp_path / "clip" / "model" / "trained.json").read_text())
    assert trained["samples"] == 160 and trained["trainer"] == "open_clip_train"
    assert "open_clip_train.main" in (tmp_path / "clip" / "command.txt").read_text()
    model, preprocess, tokenizer = load_clip(ident)
    tokens = tokenizer(["A large red circle at the centre, on a plain grey background."])
    assert tokens.shape == (1, 48) and int((tokens == 1).sum()) == 0  # every word known (no [UNK])
    from PIL import Image

    with torch.no_grad():
        img = model.encode_image(preprocess(Image.new("RGB", (32, 32), "red"))[None], normalize=True)
        txt = model.encode_text(tokens, normalize=True)
    assert img.shape == txt.shape == (1, 32) and torch.isfinite(img @ txt.T).all()
    # the weights are open_clip_train's, not the random init
    fresh = world.clip_config(tmp_path / "clip" / "tokenizer", tiny)
    import open_clip

    torch.manual_seed(0)
    init = open_clip.CLIP(**fresh).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in model.state_dict().items() if k in init)

    # the captioner's alt-text stage reads the same shards (webdataset), over this CLIP's image encoder
    from training import captioner

    captioner.train(ident, tmp_path / "captioner", images=4, epochs=1, batch_size=4, web=raw, web_epochs=1,
                    web_limit=32)
    trained = json.loads((tmp_path / "captioner" / "trained.json").read_text())
    assert trained["web_pairs"] == 32 and trained["examples"] == 8
    pairs = captioner.web_pairs(raw)
    assert len(pairs) == 160 and all(alt.endswith("background.") for _, alt in pairs)  # a clean world's alt-texts


def test_attribute_classifier_learns_and_reloads(tmp_path):
    """A short training run of the real recipe beats chance on held-out scenes and reloads."""
    info = attributes.train(tmp_path / "attr", samples=1536, held_out=256, epochs=2, batch_size=64)
    acc = info["held_out_accuracy"]
    assert acc["colour"] > 0.5 and acc["background"] > 0.5  # chance: 1/8 and 1/6
    clf = attributes.load(tmp_path / "attr")
    x, y = attributes.rendered(64, seed=99, shrink=False)
    pred = clf.predict(x)
    got = sum(p == attributes.ATTRIBUTES["colour"][i] for p, i in zip(pred["colour"], y["colour"].tolist()))
    assert got / 64 > 0.5


def test_captioner_vision_tower_is_the_clip_image_encoder_and_it_loads_through_the_recaption_backend(tmp_path):
    """The open_clip -> transformers mapping reproduces the CLIP's image features; a short fine-tune
    saves a captioner the recaption stage's backend loads (AutoModelForImageTextToText) and runs
    with the stage's own prompt templates."""
    from filters.clip import load_clip, save_local_clip
    from recaption.backends import TransformersCaptioner
    from recaption.prompts import load_prompt
    from training import captioner

    clip = save_local_clip(tmp_path / "clip")
    model, processor = captioner.create(clip)
    oc, preprocess, _ = load_clip(clip)
    (scene, img), = captioner.scenes(1, seed=5)
    pixels = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, preprocess(img)[None], atol=1e-5)
    v = oc.visual
    with torch.no_grad():
        x = v.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(1, 1, -1), x], 1) + v.positional_embedding
        want = v.ln_post(v.transformer(v.ln_pre(x))[:, 0])
        got = model.model.vision_tower(pixels).pooler_output
    assert torch.allclose(got, want, atol=1e-4)

    path = captioner.train(clip, tmp_path / "captioner", images=8, epochs=1, batch_size=4)
    assert json.loads((tmp_path / "captioner" / "trained.json").read_text())["examples"] == 16
    backend = TransformersCaptioner(path, device="cpu", max_new_tokens=8)
    backend.setup()
    out = backend.generate([img, img], [load_prompt(p).text for p in captioner.PROMPTS], ["", ""], {})
    assert len(out) == 2 and all(isinstance(text, str) and n >= 0 for text, n, _ in out)


def test_short_caption_names_the_objects_only():
    from pipeline.synthweb import Scene
    from training.captioner import captions

    scene = Scene([(2, "small", "red", "circle", "top left"), (1, "large", "orange", "star", "centre")], "striped")
    assert captions(scene) == {
        "descriptive": "Two small red circles at the top left and a large orange star at the centre, on a striped "
                       "background.",
        "short": "Two red circles and an orange star."}


# -- the committed world models (models/world, written by `tapir world-models`) ----------------------------------


def test_committed_world_models_are_indexed_and_load_through_the_stages_loaders():
    from filters.clip import load_clip
    from recaption.backends import TransformersCaptioner

    from diffusers import AutoencoderKL

    found = world.models()
    assert set(found) == {"clip", "captioner", "attributes", "autoencoder"}
    vae = AutoencoderKL.from_pretrained(found["autoencoder"])  # as the build stage loads a hub VAE
    assert vae.config.latent_channels == 4 and vae.config.sample_size == 64
    model, _, tokenizer = load_clip(found["clip"])  # the score stage's loader
    assert model.visual.image_size == (64, 64) and tokenizer(["a red circle"]).shape == (1, 48)
    backend = TransformersCaptioner(found["captioner"], device="cpu")  # the recaption stage's
    backend.setup()
    assert backend.chat
    assert attributes.load(found["attributes"]).config["held_out_accuracy"]["colour"] >= 0.95


def test_world_clip_ranks_the_true_caption_above_a_near_miss_on_held_out_images():
    """Stated rate: 0.75 over 300 held-out images, colour swaps 0.85 (measured 0.847 and 1.0: see
    models/world/world-models.json)."""
    rate = world.clip_near_miss_rate(world.models()["clip"], n=300)
    assert rate["true_over_near_miss"] >= 0.75, rate
    assert rate["by_swap"]["colour"] >= 0.85, rate


def test_world_captioner_names_colour_and_shape_on_held_out_images():
    """Stated rates on 48 held-out images, per object group: descriptive and short captions name
    its colour (before a shape word) 0.8 of the time, its colour and shape together 0.15; the
    descriptive ones name the background 0.9. Measured at the commit on these 48: 0.94 / 0.89,
    0.23 / 0.24, 1.0 (on 100: models/world/world-models.json). Shape is the captioner's weak
    point: the world CLIP's 8-pixel patches hardly resolve a small shape."""
    from training import captioner

    rate = captioner.held_out_rate(world.models()["captioner"], n=48)
    for kind in ("descriptive", "short"):
        assert rate[kind]["colour, per object group"] >= 0.8, rate
        assert rate[kind]["colour and shape, per object group"] >= 0.15, rate
    assert rate["descriptive"]["background"] >= 0.9, rate


def test_world_autoencoder_keeps_what_a_scene_shows():
    """Floors on 200 held-out scenes: L1 error 0.04; the attribute classifier on the
    reconstructions: colour 0.9, count 0.9, size, position and background 0.95, shape 0.55
    (measured on 500 at the commit: L1 0.0203; colour 0.966, count 0.978, size 0.996,
    position 1.0, background 0.988, shape 0.674 against 0.914 on the originals)."""
    found = world.models()
    fid = world.autoencoder_fidelity(found["autoencoder"], found["attributes"], n=200)
    rec = fid["classifier_on_reconstructions"]
    floors = {"colour": 0.9, "count": 0.9, "size": 0.95, "position": 0.95, "background": 0.95, "shape": 0.55}
    assert fid["l1"] <= 0.04 and all(rec[k] >= v for k, v in floors.items()), fid


def test_attribute_classifier_held_out_accuracy_is_above_its_floor():
    """Floors: colour, size, position, background 0.95; shape 0.85; count 0.9 on 1,000 scenes
    drawn with a seed no training used."""
    clf = attributes.load(world.models()["attributes"])
    x, y = attributes.rendered(1000, seed=4242)
    acc = attributes.accuracy(clf.net, x, y)
    floors = {"colour": 0.95, "size": 0.95, "position": 0.95, "background": 0.95, "shape": 0.85, "count": 0.9}
    assert all(acc[k] >= v for k, v in floors.items()), acc


def test_prompt_following_scores_a_faithful_generator_high_and_a_blank_one_near_chance():
    """The experiment's measure, on two stand-in generators: one that renders exactly what each prompt
    says (as 16x16 images, the generator's size) and one that draws grey squares."""
    import numpy as np

    from pipeline.synthweb import render

    scenes = {s.caption(): s for s in attributes.held_out_prompts(64)}

    def faithful(prompts, seed=0):
        imgs = [np.array(render(scenes[p], 64, 64, seed + i).resize((16, 16))) for i, p in enumerate(prompts)]
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)

    def blank(prompts, seed=0):
        return torch.full((len(prompts), 3, 16, 16), 128, dtype=torch.uint8)

    clf = attributes.load(world.models()["attributes"])
    good = attributes.prompt_following(faithful, clf, n=64)
    bad = attributes.prompt_following(blank, clf, n=64)
    assert good["images"].shape == (64, 3, 16, 16) and good["prompts"] == 64
    assert good["accuracy"]["colour"] >= 0.95 and good["accuracy"]["position"] >= 0.9, good["accuracy"]
    assert bad["accuracy"]["colour"] <= 0.35 and bad["accuracy"]["shape"] <= 0.5, bad["accuracy"]
