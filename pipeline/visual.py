"""Report visuals: score histograms, a grid of kept and dropped examples, one HTML page."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards, storage
from pipeline.schemas import EMBEDDING, IMAGE_MEMBERS

log = logging.getLogger(__name__)

HISTOGRAMS = [("clip_score", "CLIP score"), ("min_side", "shorter side (px)"),
              ("caption_chars", "caption length (chars)"), ("nsfw_score", "NSFW score"),
              ("text_area", "text area fraction"), ("junk_alt", "junk alt-text score")]


def sample_ids(ids, n: int) -> list[int]:
    """``n`` shard ids spread evenly over ``ids`` (all of them when there are fewer)."""
    ids = sorted(ids)
    if len(ids) <= n:
        return ids
    return sorted({ids[round(i * (len(ids) - 1) / max(1, n - 1))] for i in range(n)})


def _joined(run_dir, ids: list[int]) -> pa.Table:
    """Scores (no embeddings) of the score shards ``ids``, with the selection's keep and reason
    and the shard each row came from (``_shard``)."""
    run = storage.path(run_dir)
    tables = []
    for sid in ids:
        path = shards.shard_file(run / "scores", sid, ".parquet")
        names = [c for c in storage.read_schema(path).names if c != EMBEDDING]
        t = storage.read_parquet(path, columns=names)
        sel = run / "selection"
        if shards.stats_path(sel, sid).exists():
            s = storage.read_parquet(shards.shard_file(sel, sid, ".parquet"), columns=["key", "keep", "reason"])
            take = pc.index_in(t["key"], value_set=s["key"])
            t = t.append_column("keep", s["keep"].take(take)).append_column("reason", s["reason"].take(take))
        tables.append(t.append_column("_shard", pa.array([sid] * t.num_rows, pa.int64())))
    return pa.concat_tables(tables, promote_options="default")


def histograms(table: pa.Table, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    keep = np.asarray(table["keep"].fill_null(False).to_numpy(zero_copy_only=False), bool) \
        if "keep" in table.column_names else None
    for col, label in HISTOGRAMS:
        if col not in table.column_names:
            continue
        values = np.asarray(table[col].to_numpy(zero_copy_only=False), dtype=float)
        ok = ~np.isnan(values)
        if not ok.any():
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        bins = np.histogram_bin_edges(values[ok], bins=30)
        if keep is not None:
            ax.hist(values[ok & keep], bins=bins, alpha=0.75, label="kept", color="#2a9d8f")
            ax.hist(values[ok & ~keep], bins=bins, alpha=0.6, label="dropped", color="#e76f51")
            ax.legend()
        else:
            ax.hist(values[ok], bins=bins, color="#264653")
        ax.set_xlabel(label)
        ax.set_ylabel("images")
        fig.tight_layout()
        path = out / f"hist_{col}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _image(raw, sid: int, key: str, cache: dict):
    """The stored image of ``key`` in raw shard ``sid`` (one tar at a time in the cache)."""
    if sid not in cache:
        cache.clear()
        tar = shards.shard_file(raw, sid, ".tar")
        try:
            cache[sid] = shards.read_tar(tar) if tar.exists() else {}
        except shards.UnsafeTar as e:  # a tampered raw tar: the grid shows blanks
            log.warning("%s", e)
            cache[sid] = {}
    member = cache[sid].get(key, {})
    data = next((member[e] for e in IMAGE_MEMBERS if e in member), None)
    if data is None:
        return None
    try:
        with shards.open_image(data) as im:  # only the formats downloads hold
            return im.convert("RGB")
    except Exception:  # a corrupt image has its reason in the table; the grid shows a blank
        return None


def sample_grid(table: pa.Table, raw: Path, out: Path, per_side: int = 12, thumb: int = 128) -> Path:
    """Kept examples (top) and dropped examples (bottom) with key, CLIP score and reason."""
    from PIL import Image, ImageDraw

    rows = table.to_pylist()
    kept = [r for r in rows if r.get("keep")][:per_side]
    dropped = [r for r in rows if r.get("keep") is False][:per_side]
    cols, label_h = 6, 46
    cell_w, cell_h = thumb + 8, thumb + label_h
    n_rows = -(-len(kept) // cols) + -(-len(dropped) // cols)
    grid = Image.new("RGB", (cols * cell_w, max(1, n_rows) * cell_h + 40), "white")
    draw = ImageDraw.Draw(grid)
    cache: dict = {}
    y = 0
    for title, group, colour in (("kept", kept, (42, 157, 143)), ("dropped", dropped, (231, 111, 81))):
        draw.text((4, y + 2), title.upper(), fill=colour)
        y += 18
        for i, r in enumerate(group):
            x, yy = (i % cols) * cell_w, y + (i // cols) * cell_h
            im = _image(raw, r["_shard"], r["key"], cache)
            if im is not None:
                im.thumbnail((thumb, thumb))
                grid.paste(im, (x + 4, yy))
            clip = r.get("clip_score")
            draw.text((x + 4, yy + thumb + 2), f"{r['key']}" + (f" clip {clip:.3f}" if clip is not None else ""),
                      fill="black")
            reason = r.get("reason") or "kept"
            draw.text((x + 4, yy + thumb + 16), reason[:22], fill=colour)
            draw.text((x + 4, yy + thumb + 30), (r.get("caption_chars") and f"{r['caption_chars']} chars") or "",
                      fill="gray")
        y += -(-len(group) // cols) * cell_h + 4
    path = out / "samples.png"
    grid.save(path)
    return path


def caption_visuals(run_dir, out: Path, ids: list[int], n: int = 8) -> list[Path]:
    """Caption lengths before (alt-text) and after (short, descriptive), and a grid of images
    with their three captions side by side."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image, ImageDraw

    folder = storage.path(run_dir) / "captions"
    rows = []
    for sid in ids:
        table = storage.read_parquet(shards.shard_file(folder, sid, ".parquet"),
                                     columns=["key", "alt_text", "short", "descriptive", "reason"])
        rows += [{**r, "_shard": sid} for r in table.to_pylist()]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for col, label in (("alt_text", "alt-text (before)"), ("short", "short"), ("descriptive", "descriptive")):
        words = [len(r[col].split()) for r in rows if r[col]]
        if words:
            ax.hist(words, bins=20, alpha=0.6, label=label)
    ax.set_xlabel("caption length (words)")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    hist = out / "hist_caption_lengths.png"
    fig.savefig(hist)
    plt.close(fig)
    shown = rows[:n]
    thumb, width, line = 128, 760, 13
    grid = Image.new("RGB", (width, max(1, len(shown)) * (thumb + 12)), "white")
    draw, cache = ImageDraw.Draw(grid), {}
    for i, r in enumerate(shown):
        y = i * (thumb + 12)
        im = _image(storage.path(run_dir) / "raw", r["_shard"], r["key"], cache)
        if im is not None:
            im.thumbnail((thumb, thumb))
            grid.paste(im, (4, y + 4))
        texts = [("alt", r["alt_text"] or "", "gray"), ("short", r["short"] or f"[failed] {r['reason'] or ''}",
                                                          "black"),
                 ("descriptive", r["descriptive"] or "[failed]", "black")]
        yy = y + 4
        for label, text, colour in texts:
            for k, part in enumerate(textwrap.wrap(f"{label}: {text}", 95)[:3]):
                draw.text((thumb + 12, yy), part, fill=colour)
                yy += line
    grid_path = out / "captions.png"
    grid.save(grid_path)
    return [hist, grid_path]


def training_visuals(run: Path, out: Path) -> tuple[Path, Path] | None:
    """The loss curve of a training run folder and its newest sample grid, copied beside the report."""
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = sorted((run / "samples").glob("step-*.png"))
    if not (run / "metrics.jsonl").exists() or not grids:
        return None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8)
    kind = json.loads((run / "run.json").read_text()).get("kind", "diffusion") if (run / "run.json").exists() \
        else "diffusion"
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"{kind} loss ({run.name})")
    fig.tight_layout()
    curve = out / f"{run.name}_loss.png"
    fig.savefig(curve, dpi=100)
    plt.close(fig)
    samples = out / f"{run.name}_{grids[-1].name}"
    shutil.copyfile(grids[-1], samples)
    return curve, samples


def write_visuals(run_dir, funnel: dict, out, sample_shards: int = 8) -> object:
    """report/index.html with histograms, a grid of kept and dropped examples and the captions,
    drawn from ``sample_shards`` shards spread over the run (never from every row); on an
    object store the files are drawn locally, then uploaded."""
    import tempfile

    if storage.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="tapir-report-") as tmp:
            page = _write_visuals(run_dir, funnel, Path(tmp), sample_shards)
            for p in Path(tmp).iterdir():
                storage.upload(p, storage.path(out) / p.name)
        return storage.path(out) / page.name
    return _write_visuals(run_dir, funnel, storage.local(out), sample_shards)


def _write_visuals(run_dir, funnel: dict, out: Path, sample_shards: int) -> Path:
    from pipeline.report import format_stage

    run = storage.path(run_dir)
    parts = ["<!doctype html><meta charset=utf-8><title>Tapir report</title>",
             "<style>body{font-family:sans-serif;margin:2em}pre{background:#f4f4f4;padding:1em}"
             "img{margin:4px;border:1px solid #ddd}</style>",
             f"<h1>Tapir report: {html.escape(storage.url(run))}</h1><h2>Funnel</h2>"]
    for stage in funnel.values():
        parts.append(f"<pre>{html.escape(format_stage(stage))}</pre>")
    if "score" in funnel:
        ids = sample_ids(shards.done_shards(run / "scores"), sample_shards)
        table = _joined(run, ids)
        parts.append(f"<h2>Score distributions</h2><p>{table.num_rows} rows of {len(ids)} sampled score shard(s): "
                     f"{', '.join(shards.shard_name(i) for i in ids)}</p>")
        parts += [f'<img src="{p.name}" alt="{p.stem}">' for p in histograms(table, out)]
        if "keep" in table.column_names:
            grid = sample_grid(table, run / "raw", out)
            parts.append(f'<h2>Kept and dropped examples</h2><img src="{grid.name}" alt="samples">')
    if "recaption" in funnel:
        ids = sample_ids(shards.done_shards(run / "captions"), sample_shards)
        hist, captions = caption_visuals(run, out, ids)
        parts.append(f'<h2>Captions</h2><img src="{hist.name}" alt="caption lengths">'
                     f'<br><img src="{captions.name}" alt="captions">')
    local = storage.local(run)
    for train in sorted(p for p in (local / "runs").glob("*") if p.is_dir()) if local else []:
        training = training_visuals(train, out)
        if training:
            curve, samples = training
            parts.append(f'<h2>Training: runs/{html.escape(train.name)}</h2><img src="{curve.name}" alt="loss">'
                         f'<br><img src="{samples.name}" alt="samples of the fixed prompts (EMA)">')
    parts.append(f"<h2>funnel.json</h2><pre>{html.escape(json.dumps(funnel, indent=2))}</pre>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return page
