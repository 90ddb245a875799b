"""`tapir experiment closed-loop`: does curation, and does recaptioning, make a better generator?

DataComp (Gadre et al., 2023) found that filtering by CLIP score improves what is trained
downstream; DALL-E 3 (Betker et al., 2023) that training on descriptive synthetic captions,
blended 95/5 with the alt-text, improves prompt following. This runs both in miniature on
the synthetic world, where every image's content is known and the web's noise is planted:

1. one noisy web served on loopback, downloaded, scored (basic, pHash, world CLIP; exact and
   semantic dedup: pHash is colour-blind, and this world's scenes differ mostly by colour),
   recaptioned by the world captioner, and built twice by Tapir's own stages: ``all`` (every
   downloaded row) and ``filtered`` (not a duplicate, and in the top ``keep``% by CLIP score
   of every scored row);
2. the same generator (``tapir train-diffusion``: model, steps, batch, seed) trained on four
   arms: (a) all, alt-text; (b) filtered, alt-text; (c) filtered, recaptioned, 95% descriptive
   and 5% alt-text; (d) all, recaptioned, the same blend;
3. each run judged on held-out single-object prompts: prompt-following accuracy per
   attribute by the attribute classifier (trained on ground truth, never on these images),
   CLIP score with the world CLIP, and the Fréchet distance to the prompts' true images in
   that CLIP's image space.

Everything lands under ``output``: ``data/`` (the two runs of the pipeline, sharing one
download, its scores and captions), ``runs/ARM-seedS/`` (train-diffusion run folders, each
with ``result.json``), ``results.json``, ``table.md`` and ``report/index.html`` with the
sample grids side by side. A finished piece is not redone: rerunning resumes.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from pathlib import Path

log = logging.getLogger(__name__)

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "closed-loop.yaml"
WORLD_SEED = 2026  # the experiment's web; the world models trained on other seeds' scenes
ATTRS = ("colour", "shape", "count", "size", "position", "background")

# arm: (data set, caption blend, fallback order when the drawn kind is empty, label)
ARMS = {
    "a": ("all", {"alt_text": 1.0}, ["alt_text"], "everything downloaded, alt-text"),
    "b": ("filtered", {"alt_text": 1.0}, ["alt_text"], "CLIP-filtered and deduplicated, alt-text"),
    "c": ("filtered", {"descriptive": 0.95, "alt_text": 0.05}, ["descriptive", "alt_text"],
          "filtered, deduplicated, recaptioned (95% descriptive, 5% alt-text)"),
    "d": ("all", {"descriptive": 0.95, "alt_text": 0.05}, ["descriptive", "alt_text"],
          "everything downloaded, recaptioned (95/5)"),
}


def _base_config(output: Path, models: dict, text_encoder: Path, urls: str, keep: int, data: str,
                 config: Path | None, overrides: list[str]):
    from pipeline.config import load_config

    rules = [] if data == "all" else ["not duplicate", f"top {keep}% by clip_score"]
    values = {"output": str(output / "data" / data), "input.path": urls, "score.clip.model": models["clip"],
              "score.clip.pretrained": None, "recaption.model": models["captioner"],
              "build.vae.model": models["autoencoder"], "build.text.model": str(text_encoder),
              "select.rules": rules}
    return load_config(config or CONFIG, list(overrides), values=values)


def _true_alt_share(cfg, world_rows: dict) -> dict:
    """Of the rows a selection keeps: how many, the share whose alt-text is the scene's true
    caption, and the share that are planted copies of another kept row (beyond the first of
    each group), by the world's own record of each URL."""
    import pyarrow.parquet as pq

    from pipeline import shards

    from collections import Counter

    kept, true_alt, groups = 0, 0, Counter()
    for sid in sorted(shards.done_shards(cfg.selection_dir)):
        sel = pq.read_table(shards.shard_file(cfg.selection_dir, sid, ".parquet"), columns=["key", "keep"])
        keys = {k for k, keep in zip(sel["key"].to_pylist(), sel["keep"].to_pylist()) if keep}
        raw = pq.read_table(shards.shard_file(cfg.raw_dir, sid, ".parquet"), columns=["key", "url"])
        for key, url in zip(raw["key"].to_pylist(), raw["url"].to_pylist()):
            if key in keys:
                row = world_rows[url.split("://", 1)[1].split("/", 1)[1]]
                kept += 1
                true_alt += row["alt"] == row["true_caption"]
                groups[row["duplicate_of"] or row["path"]] += 1  # a planted copy and its original: one group
    dup = sum(n - 1 for n in groups.values())  # kept rows beyond the first of their group
    return {"rows": kept, "true_alt_text": round(true_alt / max(kept, 1), 4),
            "duplicates": round(dup / max(kept, 1), 4)}


def _complete(funnel: dict, what: str) -> None:
    """A stage that failed a shard stops the experiment (its rerun resumes the stage): no arm
    trains on a data set with holes."""
    failed = funnel.get("failed_shards") or {}
    if failed:
        raise RuntimeError(f"{what} failed {len(failed)} shard(s): "
                           + "; ".join(f"{k}: {str(v).splitlines()[0][:200]}" for k, v in list(failed.items())[:3]))


def _data_settings(output: Path, models: dict, rows: int, keep: int, config: Path | None, overrides) -> str:
    """A digest of what makes the data sets: rows, rules, the world models and every stage's
    settings up to build (a training setting changes nothing here)."""
    import hashlib

    cfg = _base_config(output, models, Path("text"), "urls", keep, "filtered", config, overrides).model_dump(mode="json")
    made = {k: cfg[k] for k in ("download", "score", "select", "recaption", "build")}
    made.update(rows=rows, keep=keep, world_seed=WORLD_SEED, models=models)
    return hashlib.sha256(json.dumps(made, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_data(output: Path, rows: int, models: dict, keep: int, config: Path | None = None,
                 overrides: list[str] = ()) -> dict:
    """Step 1: the noisy web, downloaded, scored, recaptioned and built as ``all`` and
    ``filtered`` under ``output/data``; returns (and records in ``data/data.json``) what each holds."""
    from pipeline import ray_backend
    from pipeline.build import build
    from pipeline.download import download
    from pipeline.encoders import save_tiny_text_encoder
    from pipeline.recaption import recaption
    from pipeline.score import score
    from pipeline.select import select
    from pipeline.synthweb import WebServer, build_world

    root = output / "data"
    record = root / "data.json"
    made_by = _data_settings(output, models, rows, keep, config, overrides)
    if record.is_file():
        facts = json.loads(record.read_text())
        if facts.get("made_by") == made_by:
            log.info("data: built already (%s)", record)
            return facts
        log.info("data: rebuilding (%s changed)", record)
    shutil.rmtree(root, ignore_errors=True)  # the server's port, so its URL list, is new each run: start afresh
    (root / "web").mkdir(parents=True)
    text = save_tiny_text_encoder(root / "tiny-t5")
    world = build_world(rows, seed=WORLD_SEED, size=(128, 128), noisy=True)
    world_rows = {r["path"].lstrip("/"): r for r in world.rows}
    start, facts = time.time(), {"rows": rows, "keep": keep, "world_seed": WORLD_SEED, "seconds": {},
                                 "made_by": made_by}
    with WebServer(world) as server:
        urls = world.write_url_list(str(root / "web" / "urls.parquet"), server.base_url)
        full = _base_config(output, models, text, urls, keep, "all", config, overrides)
        try:
            for name, stage in (("download", download), ("score", score), ("select", select),
                                ("recaption", recaption), ("build", build)):
                log.info("data/all: %s", name)
                t0 = time.time()
                _complete(stage(full), f"data/all: {name}")
                facts["seconds"][f"all/{name}"] = round(time.time() - t0, 1)
            # the filtered set shares the download, its scores and the captions (of every row)
            filtered = _base_config(output, models, text, urls, keep, "filtered", config, overrides)
            Path(filtered.output).mkdir(parents=True)
            for folder in ("raw", "scores", "captions"):
                (Path(filtered.output) / folder).symlink_to(Path(full.output) / folder, target_is_directory=True)
            for name, stage in (("select", select), ("build", build)):
                log.info("data/filtered: %s", name)
                t0 = time.time()
                _complete(stage(filtered), f"data/filtered: {name}")
                facts["seconds"][f"filtered/{name}"] = round(time.time() - t0, 1)
        finally:
            ray_backend.shutdown()
    facts["sets"] = {"all": _true_alt_share(full, world_rows), "filtered": _true_alt_share(filtered, world_rows)}
    facts["sets"]["all"]["shards"] = str(full.shards_dir)
    facts["sets"]["filtered"]["shards"] = str(filtered.shards_dir)
    facts["rules"] = {"all": list(full.select.rules), "filtered": list(filtered.select.rules)}
    facts["text_encoder"], facts["seconds"]["total"] = str(text), round(time.time() - start, 1)
    record.write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def train_arm(output: Path, arm: str, seed: int, data: dict, models: dict, steps: int, keep: int,
              config: Path | None = None, overrides: list[str] = ()) -> Path:
    """Step 2: ``tapir train-diffusion`` on one arm; returns its run folder (a finished one is kept)."""
    from training.attributes import held_out_prompts
    from training.diffusion import train_diffusion

    data_set, probs, fallback, _ = ARMS[arm]
    import hashlib

    run = output / "runs" / f"{arm}-seed{seed}"
    cfg = _base_config(output, models, Path(data["text_encoder"]), str(output / "data" / "web" / "urls.parquet"),
                       keep, data_set, config, overrides)
    t = cfg.train_diffusion
    t.output, t.seed, t.max_steps = str(run), seed, steps
    t.checkpoint_every = steps
    t.data.shards = data["sets"][data_set]["shards"]
    t.data.caption_probs, t.data.caption_fallback = probs, fallback
    t.sample.prompts = [s.caption() for s in held_out_prompts(8)]
    training = json.dumps(t.model_dump(mode="json"), sort_keys=True).encode()
    made_by = {"data": data["made_by"], "train_diffusion": hashlib.sha256(training).hexdigest()[:16]}
    if (run / "arm.json").is_file() and json.loads((run / "arm.json").read_text()) == made_by \
            and (run / "rank-0.json").is_file():
        return run
    log.info("arm %s, seed %d: train-diffusion on %s (%s), %d steps", arm, seed, data_set, probs, steps)
    shutil.rmtree(run, ignore_errors=True)
    train_diffusion(cfg)
    (run / "arm.json").write_text(json.dumps(made_by) + "\n")  # written last: the run is complete
    return run


def evaluate(run: Path, models: dict, prompts: int = 256, seed: int = 0, steps: int | None = None,
             cfg: float | None = None) -> dict:
    """Step 3: prompt following per attribute, CLIP score and Fréchet distance of one run's
    samples of ``prompts`` held-out prompts; the first 8 images are saved as ``samples.pt``."""
    import torch

    from training.attributes import prompt_following
    from training.evaluate import Evaluator
    from training.sample import load_sampler

    sample, ckpt = load_sampler(run, device="cpu")  # steps and cfg None: the run's train_diffusion.sample
    sampling = json.loads((run / "run.json").read_text())["config"]["train_diffusion"]["sample"]
    pf = prompt_following(sample, models["attributes"], n=prompts, seed=seed, steps=steps, cfg=cfg)
    evaluator = Evaluator(models["clip"], None, "cpu", fid="clip")
    images, captions = pf["images"], reference_prompts(prompts)
    result = {"accuracy": pf["accuracy"], "chance": pf["chance"], "prompts": prompts,
              "mean_accuracy": round(statistics.mean(pf["accuracy"].values()), 4),
              "clip_score": round(evaluator.clip_score(images, captions), 3),
              "frechet_clip": round(evaluator.frechet(reference_images(prompts), images), 4),
              "checkpoint": str(ckpt), "sampling": {"steps": steps or sampling["steps"],
                                                    "cfg": sampling["cfg"] if cfg is None else cfg, "seed": seed}}
    torch.save(images[:8].clone(), run / "samples.pt")
    (run / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def reference_prompts(n: int) -> list[str]:
    from training.attributes import held_out_prompts

    return [s.caption() for s in held_out_prompts(n)]


def reference_images(n: int, size: int = 64):
    """The held-out prompts' true images (rendered at 2x and shrunk, as the web's), uint8 (N, 3, H, W)."""
    import numpy as np
    import torch

    from pipeline.synthweb import render
    from training.attributes import held_out_prompts

    arrays = [np.asarray(render(s, size * 2, size * 2, 70_000 + i).resize((size, size)))
              for i, s in enumerate(held_out_prompts(n))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def reference_row(models: dict, prompts: int) -> dict:
    """The same measures on the true images: the ceiling the arms are read against."""
    from training.attributes import load, scene_attributes, held_out_prompts
    from training.evaluate import Evaluator

    images = reference_images(prompts)
    pred = load(models["attributes"]).predict(images.float() / 255)
    truth = [scene_attributes(s) for s in held_out_prompts(prompts)]
    acc = {k: round(sum(p == t[k] for p, t in zip(pred[k], truth)) / prompts, 4) for k in ATTRS}
    evaluator = Evaluator(models["clip"], None, "cpu", fid="clip")
    return {"accuracy": acc, "mean_accuracy": round(statistics.mean(acc.values()), 4),
            "clip_score": round(evaluator.clip_score(images, reference_prompts(prompts)), 3)}


def _cell(values: list[float], digits: int = 3) -> str:
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summarise(results: dict, data: dict, reference: dict, seeds: list[int]) -> dict:
    """Per arm: the mean and range over seeds of every measure."""
    out = {}
    for arm, by_seed in results.items():
        rows = list(by_seed.values())
        measures = {k: [r["accuracy"][k] for r in rows] for k in ATTRS}
        measures["mean_accuracy"] = [r["mean_accuracy"] for r in rows]
        measures["clip_score"] = [r["clip_score"] for r in rows]
        measures["frechet_clip"] = [r["frechet_clip"] for r in rows]
        out[arm] = {"label": ARMS[arm][3], "data": ARMS[arm][0], "captions": ARMS[arm][1],
                    "train_rows": data["sets"][ARMS[arm][0]]["rows"],
                    "true_alt_text": data["sets"][ARMS[arm][0]]["true_alt_text"],
                    "seeds": seeds, "values": measures,
                    "mean": {k: round(statistics.mean(v), 4) for k, v in measures.items()},
                    "range": {k: [min(v), max(v)] for k, v in measures.items()}}
    return out


def table(summary: dict, reference: dict, chance: dict) -> str:
    """The markdown table: a row per arm, each cell the mean over seeds (min-max)."""
    head = ["arm", "training rows", "true alt-text", *ATTRS, "mean", "CLIP score", "Fréchet (CLIP)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, s in summary.items():
        v = s["values"]
        lines.append("| " + " | ".join([f"({arm}) {s['label']}", str(s["train_rows"]), f"{s['true_alt_text']:.2f}",
                                        *[_cell(v[k]) for k in ATTRS], _cell(v["mean_accuracy"]),
                                        _cell(v["clip_score"], 2), _cell(v["frechet_clip"], 4)]) + " |")
    lines.append("| true images (ceiling) | | | " + " | ".join(f"{reference['accuracy'][k]:.3f}" for k in ATTRS)
                 + f" | {reference['mean_accuracy']:.3f} | {reference['clip_score']:.2f} | - |")
    lines.append("| chance | | | " + " | ".join(f"{chance[k]:.3f}" for k in ATTRS)
                 + f" | {statistics.mean(chance[k] for k in ATTRS):.3f} | | |")
    return "\n".join(lines)


def sample_grid(output: Path, arms: list[str], seed: int, n: int = 8) -> Path:
    """One PNG: a row per held-out prompt, the true image first, then each arm's sample (seed
    ``seed``), every cell enlarged to 96 px, columns labelled."""
    import torch
    from PIL import Image, ImageDraw

    cell, top = 96, 18
    columns = [("truth", reference_images(n))] + [
        (f"({a})", torch.load(output / "runs" / f"{a}-seed{seed}" / "samples.pt")) for a in arms]
    sheet = Image.new("RGB", (cell * len(columns), top + cell * n), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (name, images) in enumerate(columns):
        draw.text((c * cell + 4, 3), name, fill="black")
        for r in range(n):
            im = Image.fromarray(images[r].permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            sheet.paste(im, (c * cell, top + r * cell))
    path = output / "report" / f"grid-seed{seed}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_report(output: Path, text: str, grids: list[Path], data: dict, prompts: list[str]) -> Path:
    import html

    out = output / "report" / "index.html"
    rows = "".join(f"<li>{html.escape(p)}</li>" for p in prompts)
    images = "".join(f'<figure><img src="{g.name}"><figcaption>{g.stem}: the true image, then arms '
                     f'(a)-(d), a row per prompt below</figcaption></figure>' for g in grids)
    out.write_text(f"""<!doctype html><meta charset="utf-8"><title>Tapir closed-loop experiment</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}pre{{background:#f6f6f6;padding:1em;
overflow-x:auto}}figure{{display:inline-block;margin:1em}}</style>
<h1>Closed loop: curation and recaptioning on the synthetic world</h1>
<p>Prompt-following accuracy per attribute (the attribute classifier on each sample), CLIP score with the
world CLIP and Fréchet distance in its image space, on held-out single-object prompts.
Each cell: mean over seeds (min-max).</p>
<pre>{html.escape(text)}</pre>
<p>Data: {html.escape(json.dumps(data["sets"]))}; filtering rules {html.escape(json.dumps(data["rules"]))}.</p>
{images}
<h2>Prompts of the grids</h2><ol>{rows}</ol>
""")
    return out


def closed_loop(output: Path, rows: int = 6000, seeds: tuple[int, ...] = (0, 1), steps: int = 2400,
                keep: int = 60, prompts: int = 256, arms: str = "abcd", models_folder: Path | None = None,
                config: Path | None = None, overrides: list[str] = ()) -> dict:
    """Run the experiment into ``output`` (resuming what is done); print and return the table."""
    from training.world import models as world_models

    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    models = world_models(models_folder)
    missing = {"clip", "captioner", "attributes", "autoencoder"} - set(models)
    if missing:
        raise FileNotFoundError(f"the experiment needs the world's {', '.join(sorted(missing))}: build them with "
                                f"`tapir world-models --only {','.join(sorted(missing))}`")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}: choose from {''.join(ARMS)}")
    start = time.time()
    data = prepare_data(output, rows, models, keep, config, overrides)
    results: dict[str, dict] = {}
    for seed in seeds:  # seed-major: a stopped run has every arm of the first seeds
        for arm in arms:
            run = train_arm(output, arm, seed, data, models, steps, keep, config, overrides)
            done = run / "result.json"  # removed with the run folder when it is retrained
            result = json.loads(done.read_text()) if done.is_file() else None
            if result is None or result["prompts"] != prompts:
                result = evaluate(run, models, prompts, seed)
            results.setdefault(arm, {})[seed] = result
            log.info("arm %s seed %d: %s, CLIP score %.2f, Fréchet %.4f", arm, seed, result["accuracy"],
                     result["clip_score"], result["frechet_clip"])
    reference = reference_row(models, prompts)
    chance = next(iter(next(iter(results.values())).values()))["chance"]
    summary = summarise(results, data, reference, list(seeds))
    text = table(summary, reference, chance)
    grids = [sample_grid(output, list(arms), s) for s in seeds]
    report = write_report(output, text, grids, data, reference_prompts(8))
    out = {"summary": summary, "reference": reference, "chance": chance, "data": data, "steps": steps,
           "prompts": prompts, "seconds": round(time.time() - start, 1), "table": text}
    (output / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    (output / "table.md").write_text(text + "\n")
    print(text)
    print(f"\nreport: {report}\nresults: {output / 'results.json'}")
    return out
