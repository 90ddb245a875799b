"""`tapir demo`: the whole pipeline on a synthetic web served on loopback, no network needed."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.config import load_config

log = logging.getLogger(__name__)


MARK = ".tapir-demo"  # written into a folder the demo created: only such a folder is ever emptied


def _fresh(output: Path) -> None:
    """Start from an empty folder: create it, or empty one an earlier demo made; refuse any
    other non-empty folder (``--output ~`` must never delete a home directory)."""
    if output.exists() and any(p.name != ".tapir.lock" for p in output.iterdir()):
        if not (output / MARK).is_file():
            raise FileExistsError(f"{output} is not empty and was not made by `tapir demo`; give --output a new or "
                                  "empty folder")
        for child in output.iterdir():
            if child.name not in (MARK, ".tapir.lock"):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    output.mkdir(parents=True, exist_ok=True)
    (output / MARK).write_text("made by `tapir demo`; a later demo may empty this folder\n")


def demo(output: Path, rows: int = 300, config: Path | None = None, overrides: list[str] = (),
         values: dict | None = None) -> int:
    """Run the demo into ``output`` (a new or empty folder, or one an earlier demo made)."""
    from pipeline.shards import RunLock

    output = Path(output).resolve()
    if output.exists() and any(output.iterdir()) and not (output / MARK).is_file():
        _fresh(output)  # refuses before the lock file is written into someone else's folder
    with RunLock(output, "tapir demo"):
        _fresh(output)
        return _demo(output, rows, config, overrides, values or {})


def _demo(output: Path, rows: int, config: Path | None, overrides: list[str], values: dict) -> int:
    from filters.clip import save_local_clip
    from pipeline import ray_backend
    from pipeline.build import build
    from pipeline.download import download
    from pipeline.encoders import save_tiny_text_encoder
    from pipeline.report import format_stage, report
    from pipeline.recaption import recaption
    from pipeline.score import score
    from recaption.tiny import save_tiny_chat_vlm
    from pipeline.select import check_rules, select
    from pipeline.synthweb import WebServer, build_world
    from training.ar import train_ar
    from training.autoencoder import train_autoencoder
    from training.diffusion import train_diffusion
    from training.world import models as world_models

    web = output / "web"
    web.mkdir(parents=True)
    log.info("building a synthetic web of %d rows", rows)
    world = build_world(rows, seed=0)
    with WebServer(world) as server:
        urls = world.write_url_list(str(web / "urls.parquet"), server.base_url)
        log.info("serving it on %s", server.base_url)
        # the world's CLIP and captioner, trained by Tapir's own tools (`tapir world-models`) and
        # committed under models/world, load through the same loaders as pretrained ones; where
        # they are missing (a checkout without them), tiny random ones built from configs stand in
        found = {}
        try:
            found = world_models()
            clip, captioner = found["clip"], found["captioner"]
            log.info("world models: CLIP %s, captioner %s", clip, captioner)
        except (FileNotFoundError, KeyError) as e:
            log.warning("%s; the demo uses a tiny CLIP and captioner with random weights", e)
            clip = save_local_clip(output / "models" / "tiny-clip")
            captioner = save_tiny_chat_vlm(output / "models" / "tiny-chat")
            values = {"score.dedup.semantic": False, **values}  # random embeddings all look alike
        text = save_tiny_text_encoder(output / "models" / "tiny-t5")  # a tiny T5 text encoder
        # the demo trains a VQ autoencoder (the AR model's tokens); the KL one is the world's
        # (`tapir world-models --only autoencoder`), else trained here too
        vq_dir, kl_dir = output / "runs" / "autoencoder-vq", output / "runs" / "autoencoder-kl"
        kl_model = found.get("autoencoder") or str(kl_dir / "model")
        paths = {"output": str(output), "input.path": str(urls), "score.clip.model": str(clip),
                 "score.clip.pretrained": None, "recaption.model": str(captioner),
                 "build.vae.model": kl_model, "build.vq.model": str(vq_dir / "model"),
                 "build.text.model": str(text), "train_autoencoder.output": str(vq_dir)}
        cfg = load_config(config, list(overrides), values={**paths, **values})
        check_rules(cfg)
        try:
            download(cfg)
            score(cfg)
            select(cfg)
            recaption(cfg)
            log.info("training a tiny VQ autoencoder on the selected images of %s", cfg.raw_dir)
            train_autoencoder(cfg)
            if "autoencoder" in found:
                log.info("KL latents from the world autoencoder %s", kl_model)
            else:
                kl = cfg.model_copy(deep=True)
                kl.train_autoencoder.kind, kl.train_autoencoder.output = "kl", str(kl_dir)
                kl.train_autoencoder.data.shards = str(cfg.autoencoder_shards)  # the images prepared for the VQ run
                kl.train_autoencoder.data.source = "shards"
                log.info("training a tiny KL autoencoder on them")
                train_autoencoder(kl)
            build(cfg)
            log.info("training a tiny DiT on %s", cfg.shards_dir)
            trained = train_diffusion(cfg)
            log.info("training a tiny autoregressive model on %s", cfg.shards_dir)
            trained_ar = train_ar(cfg)
        finally:
            ray_backend.shutdown()
    funnel, path = report(output)
    print()
    for stage in funnel.values():
        print(format_stage(stage))
    print()
    print(f"run folder:   {output}")
    print(f"  URL list:   {urls}  (with each row's intended fate in column 'fate')")
    print(f"  raw shards: {cfg.raw_dir}  (NNNNN.tar + NNNNN.parquet + NNNNN_stats.json)")
    print(f"  scores:     {cfg.scores_dir}  (NNNNN.parquet, _dedup/)")
    print(f"  selection:  {cfg.selection_dir}  (key, keep, reason)")
    print(f"  captions:   {cfg.captions_dir}  (descriptive, short, provenance)")
    print(f"  shards:     {cfg.shards_dir}  (NNNNN.tar with latents and tokens, manifest.json; "
          f"check with `tapir verify {cfg.shards_dir}`)")
    print(f"  autoencoders: {vq_dir}, {Path(kl_model).parent if 'autoencoder' in found else kl_dir}  (model/ "
          "loads with diffusers; samples/: originals over reconstructions)")
    print(f"  diffusion:  {cfg.diffusion_dir}  ({trained['steps']} steps; samples/, tb/ for TensorBoard, "
          f"pipeline/ loads with diffusers)")
    print(f"  AR:         {cfg.ar_dir}  ({trained_ar['steps']} steps; samples/, model/; "
          f"`tapir sample {cfg.ar_dir} --prompt ...`)")
    print(f"  funnel:     {path}")
    print(f"  report:     {path.parent / 'index.html'}  (histograms, kept/dropped grid, loss curve, samples)")
    return 0 if funnel["lineage"]["ok"] else 1
