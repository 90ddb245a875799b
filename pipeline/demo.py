"""`tapir demo`: the whole pipeline on a synthetic web served on loopback, no network needed."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.config import load_config

log = logging.getLogger(__name__)


def demo(output: Path, rows: int = 300, config: Path | None = None, overrides: list[str] = ()) -> int:
    from filters.clip import save_local_clip
    from pipeline import ray_backend
    from pipeline.build import build
    from pipeline.download import download
    from pipeline.encoders import save_tiny_text_encoder
    from pipeline.report import format_stage, report
    from pipeline.recaption import recaption
    from pipeline.score import score
    from recaption.tiny import save_tiny_blip
    from pipeline.select import check_rules, select
    from pipeline.synthweb import WebServer, build_world
    from training.ar import train_ar
    from training.autoencoder import train_autoencoder
    from training.diffusion import train_diffusion

    output = Path(output).resolve()
    if output.exists():
        shutil.rmtree(output)  # a demo always starts from nothing
    web = output / "web"
    web.mkdir(parents=True)
    log.info("building a synthetic web of %d rows", rows)
    world = build_world(rows, seed=0)
    with WebServer(world) as server:
        urls = world.write_url_list(str(web / "urls.parquet"), server.base_url)
        log.info("serving it on %s", server.base_url)
        # no CLIP trained for the synthetic world yet: a tiny one built from a config, saved
        # locally and loaded through the same loader as a pretrained model
        clip = save_local_clip(output / "models" / "tiny-clip")
        captioner = save_tiny_blip(output / "models" / "tiny-blip")  # likewise a tiny captioner
        text = save_tiny_text_encoder(output / "models" / "tiny-t5")  # and a tiny T5 text encoder
        # no autoencoder exists for this world either: the demo trains its own (VQ and KL), and the
        # build stage encodes with them
        vq_dir, kl_dir = output / "runs" / "autoencoder-vq", output / "runs" / "autoencoder-kl"
        cfg = load_config(config, [f"output={output}", f"input.path={urls}", f"score.clip.model={clip}",
                                   "score.clip.pretrained=null", f"recaption.model={captioner}",
                                   f"build.vae.model={kl_dir / 'model'}", f"build.vq.model={vq_dir / 'model'}",
                                   f"build.text.model={text}", f"train_autoencoder.output={vq_dir}", *overrides])
        check_rules(cfg)
        try:
            download(cfg)
            score(cfg)
            select(cfg)
            recaption(cfg)
            log.info("training a tiny VQ autoencoder on the selected images of %s", cfg.raw_dir)
            train_autoencoder(cfg)
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
    print(f"  scores:     {cfg.scores_dir}  (NNNNN.parquet, _dedup.parquet)")
    print(f"  selection:  {cfg.selection_dir}  (key, keep, reason)")
    print(f"  captions:   {cfg.captions_dir}  (descriptive, short, provenance)")
    print(f"  shards:     {cfg.shards_dir}  (NNNNN.tar with latents and tokens, manifest.json; "
          f"check with `tapir verify {cfg.shards_dir}`)")
    print(f"  autoencoders: {vq_dir}, {kl_dir}  (model/ loads with diffusers; samples/: originals over "
          "reconstructions)")
    print(f"  diffusion:  {cfg.diffusion_dir}  ({trained['steps']} steps; samples/, tb/ for TensorBoard, "
          f"pipeline/ loads with diffusers)")
    print(f"  AR:         {cfg.ar_dir}  ({trained_ar['steps']} steps; samples/, model/; "
          f"`tapir sample {cfg.ar_dir} --prompt ...`)")
    print(f"  funnel:     {path}")
    print(f"  report:     {path.parent / 'index.html'}  (histograms, kept/dropped grid, loss curve, samples)")
    return 0 if funnel["download"]["lineage_ok"] else 1
