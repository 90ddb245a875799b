"""Models of the synthetic world, trained by Tapir's own tools, in the formats the stages load.

- :func:`clean_shards`: a clean synthetic web (every caption the scene's true description)
  served on loopback and downloaded by Tapir's download stage into ``raw/`` shards
  (img2dataset's layout: ``jpg`` + ``txt`` + ``json`` per sample).
- :func:`train_clip`: a small CLIP trained with ``open_clip_train`` (open_clip's own
  trainer, unmodified) on those shards, saved as an open_clip ``local-dir:`` folder, which
  :func:`filters.clip.load_clip` (the path of any pretrained CLIP) loads.
- :mod:`training.attributes`: the attribute classifier the closed-loop experiment scores
  generated images with.

``tapir world-models OUTPUT`` builds them all; see :func:`build`.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PARTS = ("clip", "captioner", "attributes", "autoencoder")  # in build order: each may need the ones before
WORLD_MODELS = Path(__file__).resolve().parent.parent / "models" / "world"  # the committed ones
CLIP_NAME = "tapir-world-clip"
# ~1.6M parameters; the text tower reads the world's words through a word-level tokenizer
# saved beside the weights (open_clip loads a local-dir model's HF tokenizer from its folder)
WORLD_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 48, "vocab_size": 0, "width": 128, "heads": 4, "layers": 3,
                 "hf_tokenizer_name": "", "pad_id": 0, "eos_id": 0, "pool_type": "eos"},
}


def clip_tokenizer():
    """The world's word-level tokenizer (``recaption.tiny.world_tokenizer``), lowercasing."""
    from tokenizers import normalizers

    from recaption.tiny import world_tokenizer

    tok = world_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tok


def clip_config(tokenizer_dir: Path, model_cfg: dict | None = None) -> dict:
    """The model config with the tokenizer's folder, vocabulary size and pad/end ids filled in."""
    import copy

    tok = clip_tokenizer()
    cfg = copy.deepcopy(model_cfg or WORLD_CLIP)
    cfg["text_cfg"].update(hf_tokenizer_name=str(Path(tokenizer_dir).resolve()), vocab_size=len(tok),
                           pad_id=tok.pad_token_id, eos_id=tok.sep_token_id, pool_type="eos")
    return cfg


def web_shards(out: Path, rows: int, seed: int = 1, image_size: int = 64, per_shard: int = 1000,
               noisy: bool = False) -> Path:
    """Download a world of ``rows`` scenes into ``out/raw`` with Tapir's download stage (a
    loopback server; nothing leaves the machine); return the raw folder. Clean (every
    alt-text the scene's true description), or ``noisy`` (the web's junk, near-miss and
    partial alt-texts, duplicates and failures). The scene seeds differ from the demo's and
    the experiment's worlds, so their images are held out."""
    from pipeline import ray_backend
    from pipeline.config import load_config
    from pipeline.download import download
    from pipeline.synthweb import WebServer, build_world

    import shutil

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)  # the server's port, so its URL list, is new each time: start afresh
    (out / "web").mkdir(parents=True)
    world = build_world(rows, seed=seed, size=(image_size * 2, image_size * 2), noisy=noisy)
    with WebServer(world) as server:
        urls = world.write_url_list(str(out / "web" / "urls.parquet"), server.base_url)
        cfg = load_config(values={
            "output": str(out), "input.path": urls, "input.preset": "laion",
            "download.image_size": image_size, "download.resize_mode": "center_crop",
            "download.samples_per_shard": per_shard, "download.threads": 16, "download.timeout": 2,
            "download.retry_passes": 1, "download.retry_wait": 0.5, "download.fetch.allow_loopback": True,
            "download.fetch.max_bytes": 2_000_000, "download.fetch.read_deadline": 3, "resources.num_cpus": 2,
        })
        try:
            download(cfg)
        finally:
            ray_backend.shutdown()
    return Path(cfg.raw_dir)


def clean_shards(out: Path, rows: int, seed: int = 1, image_size: int = 64, per_shard: int = 1000) -> Path:
    """:func:`web_shards` of a clean world."""
    return web_shards(out, rows, seed, image_size, per_shard, noisy=False)


def _downloaded(raw: Path) -> tuple[list[Path], int]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tars, n = [], 0
    for tar in sorted(raw.glob("[0-9]*.tar")):
        status = pq.read_table(tar.with_suffix(".parquet"), columns=["status"])["status"]
        k = pc.sum(pc.equal(status, "success")).as_py() or 0
        if k:
            tars.append(tar)
            n += k
    if not n:
        raise FileNotFoundError(f"no downloaded sample in {raw}: run the download stage first")
    return tars, n


def train_clip(raw: Path, out: Path, epochs: int = 12, batch_size: int = 128, lr: float = 2e-3,
               seed: int = 0, workers: int = 1, model_cfg: dict | None = None) -> str:
    """Train a CLIP on the samples of ``raw`` (Tapir's raw/ shards) with ``open_clip_train``,
    in a child process as a user would run it; write ``out/model`` as an open_clip
    ``local-dir:`` folder and return ``"local-dir:OUT/model"``. The command is kept in
    ``out/command.txt`` and open_clip's log under ``out/logs``."""
    from filters.clip import write_local_clip

    raw, out = Path(raw), Path(out)
    tars, n = _downloaded(raw)
    out.mkdir(parents=True, exist_ok=True)
    clip_tokenizer().save_pretrained(out / "tokenizer")
    cfg = clip_config(out / "tokenizer", model_cfg)
    model_json = out / f"{CLIP_NAME}.json"
    model_json.write_text(json.dumps(cfg, indent=2))
    names = ",".join(t.stem for t in tars)
    train_data = str(raw / (f"{{{names}}}.tar" if len(tars) > 1 else f"{tars[0].stem}.tar"))
    steps = epochs * (n // batch_size)
    args = ["--train-data", train_data, "--dataset-type", "webdataset", "--train-num-samples", str(n),
            "--model", CLIP_NAME, "--batch-size", str(batch_size), "--epochs", str(epochs), "--lr", str(lr),
            "--wd", "0.1", "--warmup", str(max(1, steps // 20)), "--workers", str(workers), "--device", "cpu",
            "--precision", "fp32", "--seed", str(seed), "--logs", str(out / "logs"), "--name", "world-clip",
            "--save-frequency", str(epochs), "--log-every-n-steps", "20", "--report-to", ""]
    # open_clip_train knows the models in its registry: the world CLIP's config is added to it first
    code = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
            "from open_clip_train.main import main; main(sys.argv[2:])")
    cmd = [sys.executable, "-c", code, str(model_json), *args]
    (out / "command.txt").write_text(shlex.join(cmd) + "\n")
    if (out / "logs" / "world-clip").exists():
        import shutil

        shutil.rmtree(out / "logs" / "world-clip")  # open_clip_train refuses an existing run name
    log.info("training the world CLIP with open_clip_train on %d samples of %s (%d epochs, ~%d steps)",
             n, raw, epochs, steps)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip_train failed ({out / 'command.txt'}):\n{proc.stderr[-3000:]}")
    ckpt = out / "logs" / "world-clip" / "checkpoints" / f"epoch_{epochs}.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"open_clip_train wrote no {ckpt}")
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    saved = json.loads(json.dumps(cfg))
    saved["text_cfg"]["hf_tokenizer_name"] = "."  # a local-dir model's tokenizer: the files beside it
    ident = write_local_clip(out / "model", saved, state)
    clip_tokenizer().save_pretrained(out / "model")  # a local-dir model's tokenizer lives in its folder
    (out / "model" / "trained.json").write_text(json.dumps({
        "samples": n, "shards": [str(t) for t in tars], "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "seed": seed, "seconds": round(time.monotonic() - start, 1), "trainer": "open_clip_train"}, indent=2))
    log.info("world CLIP trained in %.0f s: %s", time.monotonic() - start, ident)
    return ident


def held_out_scenes(n: int, seed: int = 7, image_size: int = 64):
    """``n`` scenes the world models never trained on (their own seed), rendered as a
    download would store them: (scenes, PIL images)."""
    import random

    from pipeline.synthweb import random_scene, render

    rng = random.Random(10_000 + seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = [render(s, image_size * 2, image_size * 2, 50_000 + seed * 1_000_003 + i).resize(
        (image_size, image_size)) for i, s in enumerate(scenes)]
    return scenes, images


def clip_near_miss_rate(clip: str, n: int = 300, seed: int = 7) -> dict:
    """How often the CLIP ``clip`` (any :func:`filters.clip.load_clip` identifier) scores a
    held-out image's true caption above a near miss (one attribute of one object swapped),
    overall and by the attribute swapped; and top-1 retrieval of the true caption among the
    ``n`` held-out captions."""
    import random

    import torch

    from filters.clip import load_clip
    from pipeline.synthweb import near_miss

    model, preprocess, tokenizer = load_clip(clip)
    scenes, images = held_out_scenes(n, seed)
    rng = random.Random(seed)
    misses = [near_miss(s, rng) for s in scenes]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        true = model.encode_text(tokenizer([s.caption() for s in scenes]), normalize=True)
        wrong = model.encode_text(tokenizer([m.caption() for m, _ in misses]), normalize=True)
    wins = ((img * true).sum(1) > (img * wrong).sum(1)).tolist()
    by: dict[str, list[bool]] = {}
    for (_, what), won in zip(misses, wins):
        by.setdefault(what, []).append(won)
    top1 = float((img @ true.T).argmax(1).eq(torch.arange(n)).float().mean())
    return {"true_over_near_miss": round(sum(wins) / n, 4),
            "by_swap": {k: round(sum(v) / len(v), 4) for k, v in sorted(by.items())},
            "retrieval_top1": round(top1, 4), "images": n}


def train_autoencoder(out: Path, rows: int = 4000, steps: int = 600, batch_size: int = 32, lr: float = 1e-3,
                      seed: int = 0) -> Path:
    """A KL autoencoder (64 px to 16x16x4 latents) trained by ``tapir train-autoencoder`` on
    ``rows`` clean scenes Tapir downloads (scored by the basic scorer, all kept); the diffusers
    model folder is copied to ``out/model``, the run's samples to ``out/samples``. Return the
    model folder."""
    import shutil

    from pipeline import ray_backend
    from pipeline.config import load_config
    from pipeline.score import score
    from pipeline.select import select
    from training.autoencoder import train_autoencoder as train_ae

    out = Path(out)
    data = out / "data"
    clean_shards(data, rows, seed=seed + 3)
    cfg = load_config(values={
        "output": str(data), "input.path": str(data / "web" / "urls.parquet"), "input.preset": "laion",
        "resources.num_cpus": 2, "score.scorers": ["basic"], "score.dedup.near": False,
        "score.dedup.semantic": False, "select.rules": [], "build.resolution": 64,
        "build.samples_per_shard": 500, "train_autoencoder.kind": "kl", "train_autoencoder.model": "tiny",
        "train_autoencoder.output": str(data / "run"), "train_autoencoder.max_steps": steps,
        "train_autoencoder.seed": seed, "train_autoencoder.data.source": "raw",
        "train_autoencoder.data.batch_size": batch_size, "train_autoencoder.data.workers": 1,
        "train_autoencoder.data.shuffle_buffer": 256, "train_autoencoder.optim.lr": lr,
        "train_autoencoder.optim.warmup_steps": 20, "train_autoencoder.sample.every": steps,
        "train_autoencoder.checkpoint_every": steps, "train_autoencoder.scaling_images": 256,
    })
    try:
        score(cfg)
        select(cfg)
    finally:
        ray_backend.shutdown()
    train_ae(cfg)
    for name in ("model", "samples"):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(data / "run" / name, out / name)
    shutil.rmtree(data)
    return out / "model"


def autoencoder_fidelity(model: str | Path, classifier: str | Path, n: int = 500, seed: int = 11) -> dict:
    """How much of a scene survives the autoencoder: L1 error of reconstructions of ``n``
    held-out 64 px scenes of one object group, and the attribute classifier's accuracy on the
    reconstructions beside its accuracy on the originals."""
    import random

    import numpy as np
    import torch

    from pipeline.synthweb import render
    from training import attributes
    from training.sample import load_vae

    rng = random.Random(seed)
    scenes = [attributes.random_single_scene(rng) for _ in range(n)]
    x = torch.from_numpy(np.stack([np.asarray(render(s, 128, 128, 90_000 + i).resize((64, 64)))
                                   for i, s in enumerate(scenes)])).permute(0, 3, 1, 2).float() / 255
    vae = load_vae(str(model), None, "cpu")
    with torch.no_grad():
        rec = torch.cat([vae(x[i:i + 100] * 2 - 1).sample for i in range(0, n, 100)]).add(1).div(2).clamp(0, 1)
    clf = attributes.load(classifier)
    truth = [attributes.scene_attributes(s) for s in scenes]

    def acc(images):
        pred = clf.predict(images)
        return {k: round(sum(p == t[k] for p, t in zip(pred[k], truth)) / n, 4) for k in attributes.ATTRIBUTES}

    return {"l1": round(float((rec - x).abs().mean()), 4), "classifier_on_reconstructions": acc(rec),
            "classifier_on_originals": acc(x), "images": n}


def build(output: Path, rows: int = 20000, clip_epochs: int = 12, only: list[str] | None = None,
          seed: int = 0, captioner_images: int = 400, captioner_epochs: int = 20) -> dict:
    """Build the world models under ``output`` (each part skipped if ``only`` leaves it out):
    ``clip/`` (clean shards downloaded by Tapir, then open_clip_train; the shards are removed
    after), ``captioner/`` (over the CLIP's image encoder: trained on the alt-texts of a noisy
    web of ``rows`` rows Tapir downloads, then fine-tuned on ``captioner_images`` scenes with
    detailed captions) and ``attributes/`` (the attribute classifier); ``world-models.json`` names them
    with their held-out figures."""
    import shutil

    from training import attributes, captioner

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    index_path = output / "world-models.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    parts = only or list(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown world models {sorted(unknown)}: choose from {', '.join(PARTS)}")

    def save():
        index_path.write_text(json.dumps(index, indent=2) + "\n")

    if "clip" in parts:
        raw = clean_shards(output / "clip" / "data", rows, seed=seed + 1)
        train_clip(raw, output / "clip", epochs=clip_epochs, seed=seed)
        shutil.rmtree(output / "clip" / "data")  # the shards and the run folder: rebuilt by the next run
        shutil.rmtree(output / "clip" / "logs" / "world-clip" / "checkpoints")
        index["clip"] = {"model": "clip/model", "held_out": clip_near_miss_rate(_ident(output, "clip/model"))}
        save()
        log.info("world CLIP on held-out images: %s", index["clip"]["held_out"])
    if "captioner" in parts:
        if "clip" not in index:
            raise FileNotFoundError(f"no world CLIP in {output}: build it first (--only clip)")
        web = web_shards(output / "captioner-web", rows, seed=seed + 2, noisy=True)
        captioner.train(_ident(output, index["clip"]["model"]), output / "captioner", images=captioner_images,
                        epochs=captioner_epochs, seed=seed, web=web)
        shutil.rmtree(output / "captioner-web")
        index["captioner"] = {"model": "captioner", "images": captioner_images, "web_rows": rows,
                              "held_out": captioner.held_out_rate(str(output / "captioner"))}
        save()
        log.info("world captioner on held-out images: %s", index["captioner"]["held_out"])
    if "attributes" in parts:
        info = attributes.train(output / "attributes", seed=seed)
        index["attributes"] = {"model": "attributes", "held_out_accuracy": info["held_out_accuracy"]}
        save()
    if "autoencoder" in parts:
        if "attributes" not in index:
            raise FileNotFoundError(f"no attribute classifier in {output}: build it first (--only attributes)")
        model = train_autoencoder(output / "autoencoder", seed=seed)
        index["autoencoder"] = {"model": "autoencoder/model", "kind": "kl",
                                "held_out": autoencoder_fidelity(model, output / index["attributes"]["model"])}
        save()
        log.info("world autoencoder on held-out images: %s", index["autoencoder"]["held_out"])
    return index


def _ident(output: Path, rel: str) -> str:
    return f"local-dir:{(Path(output) / rel).resolve()}"


def models(folder: Path | None = None) -> dict:
    """The world models' locations: {'clip': 'local-dir:...', 'captioner': path,
    'attributes': path, 'autoencoder': path} from ``folder`` (default: the committed ``models/world``)."""
    folder = Path(folder) if folder else WORLD_MODELS
    index_path = folder / "world-models.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"no world models in {folder}: build them with `tapir world-models --output {folder}`")
    index = json.loads(index_path.read_text())
    out = {}
    if "clip" in index:
        out["clip"] = _ident(folder, index["clip"]["model"])
    for name in ("captioner", "attributes", "autoencoder"):
        if name in index:
            out[name] = str((folder / index[name]["model"]).resolve())
    return out
