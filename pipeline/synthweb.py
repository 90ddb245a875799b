"""A synthetic image-text web for tests, the demo and the benchmarks.

``build_world(n, seed)`` draws procedural scenes (objects with shape, colour, size,
position and count on varied backgrounds), each with a ground-truth descriptive
caption, and mixes in the noise of the real web: junk alt-texts (filenames, SEO lists,
other images' captions), near misses (one attribute of one object swapped: colour, shape,
count or position), captions of only part of the scene, tiny images, extreme aspect
ratios, exact and near duplicates, and failing URLs of every kind. Every row
carries its intended ``fate`` (the ``error_reason`` the download stage must record)
so tests can assert it. ``WebServer`` serves a world on loopback.
"""

from __future__ import annotations

import io
import random
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.12, "large": 0.28}
POSITIONS = {
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75), "centre": (0.5, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
}
BACKGROUNDS = ("plain grey", "plain beige", "blue gradient", "striped", "checkered", "noisy")
NUMBERS = {1: "one", 2: "two", 3: "three"}

# Row kinds: (kind, fate) with a weight. Fate "success" means it must download.
KINDS = [
    ("clean", "success", 40), ("alt_filename", "success", 4), ("alt_seo", "success", 4),
    ("alt_truncated", "success", 3), ("alt_other_image", "success", 3), ("alt_empty", "success", 2),
    ("tiny", "success", 2), ("extreme_aspect", "success", 2), ("exact_dup", "success", 3),
    ("near_dup", "success", 3), ("slow", "success", 2), ("redirect_chain", "success", 2),
    ("flaky_503", "success", 2), ("png", "success", 2),
    ("http_404", "http_404", 3), ("http_500", "http_5xx", 2), ("timeout", "timeout", 1),
    ("trickle", "timeout", 1), ("html", "not_an_image", 2), ("truncated_jpeg", "truncated_image", 2),
    ("corrupt_jpeg", "decode_error", 2), ("bomb", "too_many_pixels", 2), ("redirect_loop", "redirect_loop", 1),
    ("redirect_private", "refused_address", 1), ("noai", "opt_out", 2), ("oversized", "too_many_bytes", 1),
    ("drop_connection", "connection_error", 1),
    ("alt_near_miss", "success", 6), ("alt_partial", "success", 4),
]


@dataclass
class Scene:
    objects: list  # (count, size, colour, shape, position)
    background: str

    def caption(self, background: bool = True) -> str:
        parts = []
        for count, size, colour, shape, pos in self.objects:
            noun = shape + ("s" if count > 1 else "")
            article = NUMBERS[count] if count > 1 else ("an" if size[0] in "aeiou" else "a")
            parts.append(f"{article} {size} {colour} {noun} at the {pos}")
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{body[0].upper()}{body[1:]}" + (f", on a {self.background} background." if background else ".")


def near_miss(scene: Scene, rng: random.Random) -> tuple[Scene, str]:
    """The scene with one attribute of one object group swapped (colour, shape, count or
    position): the caption a near-miss alt-text describes, and what was swapped."""
    objects = [list(o) for o in scene.objects]
    o = rng.randrange(len(objects))
    what = rng.choice(["colour", "shape", "count", "position"])
    slot = {"count": 0, "colour": 2, "shape": 3, "position": 4}[what]
    pool = {"count": [1, 2, 3], "colour": list(COLOURS), "shape": list(SHAPES),
            "position": [p for p in POSITIONS if p not in {x[4] for x in objects}]}[what]
    objects[o][slot] = rng.choice([v for v in pool if v != objects[o][slot]])
    return Scene([tuple(x) for x in objects], scene.background), what


def partial(scene: Scene, rng: random.Random) -> Scene:
    """Part of the scene: one object group of several, or (for one group) no background."""
    if len(scene.objects) > 1:
        return Scene([rng.choice(scene.objects)], scene.background)
    return scene


def random_scene(rng: random.Random) -> Scene:
    positions = rng.sample(list(POSITIONS), rng.randint(1, 3))
    objects = [
        (rng.choice([1, 1, 2, 3]), rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES), p)
        for p in positions
    ]
    return Scene(objects, rng.choice(BACKGROUNDS))


def render(scene: Scene, width: int, height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    bg = scene.background
    if bg == "plain beige":
        draw.rectangle([0, 0, width, height], fill=(225, 210, 180))
    elif bg == "blue gradient":
        for y in range(height):
            t = y / max(1, height - 1)
            draw.line([(0, y), (width, y)], fill=(int(90 + 100 * t), int(140 + 80 * t), 235))
    elif bg == "striped":
        step = max(4, width // 12)
        for x in range(0, width, 2 * step):
            draw.rectangle([x, 0, x + step, height], fill=(170, 170, 170))
    elif bg == "checkered":
        step = max(4, min(width, height) // 8)
        for y in range(0, height, step):
            for x in range(0, width, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step, y + step], fill=(90, 90, 90))
    elif bg == "noisy":
        noise = Image.frombytes("L", (width, height), rng.randbytes(width * height)).convert("RGB")
        img = Image.blend(img, noise, 0.5)
        draw = ImageDraw.Draw(img)
    side = min(width, height)
    for count, size, colour, shape, pos in scene.objects:
        cx, cy = POSITIONS[pos]
        r = SIZES[size] * side / 2
        for i in range(count):
            dx = (i - (count - 1) / 2) * r * 2.2 * (0.9 if size == "small" else 0.55)
            x, y = cx * width + dx + rng.uniform(-2, 2), cy * height + rng.uniform(-2, 2)
            _draw_shape(draw, shape, x, y, r, COLOURS[colour])
    return img


def _draw_shape(draw, shape, x, y, r, fill):
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:
        draw.regular_polygon((x, y, r), 5, fill=fill)  # a pentagon reads as a star at this size


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose header declares a huge image (a decompression bomb)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"\x00" * 4096, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@dataclass
class Resource:
    """What the server does for one path."""
    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: dict = field(default_factory=dict)
    delay: float = 0.0          # seconds before answering
    trickle: float = 0.0        # seconds between 64-byte pieces of the body
    fail_first: int = 0         # answer 503 to the first N requests
    drop: bool = False          # close the connection without an answer
    redirect: str | None = None  # Location, sent as is (a relative path or an absolute URL)


@dataclass
class World:
    rows: list[dict]
    resources: dict[str, Resource]

    def table(self, base_url: str) -> pa.Table:
        """The URL list with absolute URLs, LAION-style column names plus ground truth."""
        cols = {k: [r[k] for r in self.rows] for k in self.rows[0]}
        cols["URL"] = [p if "://" in p else base_url + p for p in cols.pop("path")]
        cols["TEXT"] = cols.pop("alt")
        return pa.table(cols)

    def write_url_list(self, path: str, base_url: str) -> str:
        write_table(self.table(base_url), path)
        return path


def write_table(table: pa.Table, path: str) -> None:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        pq.write_table(table, path)
    elif path.endswith((".csv", ".tsv")):
        pcsv.write_csv(table, path, pcsv.WriteOptions(delimiter="\t" if path.endswith(".tsv") else ","))
    elif path.endswith(".jsonl"):
        import json

        with open(path, "w") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row) + "\n")
    else:
        raise ValueError(f"unknown URL list extension: {path}")


def _junk_alt(kind: str, rng: random.Random, caption: str, other: str, scene: Scene | None = None) -> str:
    if kind == "alt_near_miss":
        return near_miss(scene, rng)[0].caption()
    if kind == "alt_partial":
        part = partial(scene, rng)
        return part.caption(background=len(scene.objects) > 1 and rng.random() < 0.5)
    if kind == "alt_filename":
        return f"IMG_{rng.randint(1000, 9999)}.jpg"
    if kind == "alt_seo":
        return "buy cheap shapes best price free shipping circle square triangle star sale 2026 discount"
    if kind == "alt_truncated":
        return caption[: max(5, len(caption) // 3)]
    if kind == "alt_other_image":
        return other
    if kind == "alt_empty":
        return ""
    return caption


def build_world(n: int, seed: int = 0, size: tuple[int, int] = (256, 256), noisy: bool = True) -> World:
    """A world of n rows; the same arguments give the same rows and bytes.

    ``noisy=False`` gives clean rows only (every URL serves its image): for throughput.
    """
    rng = random.Random(seed)
    kinds = [k for k, _, w in KINDS for _ in range(w)] if noisy else ["clean"]
    fates = {k: f for k, f, _ in KINDS}
    scenes = [random_scene(rng) for _ in range(n)]
    rows, resources, originals = [], {}, []
    for i in range(n):
        # four clean rows first (originals for duplicates), then every kind once, then a weighted mix
        kind = "clean" if i < 4 or not noisy else KINDS[i - 4][0] if i - 4 < len(KINDS) else rng.choice(kinds)
        if kind in ("exact_dup", "near_dup") and not originals:
            kind = "clean"
        scene, w, h = scenes[i], *size
        if kind == "tiny":
            w, h = 24, 24
        elif kind == "extreme_aspect":
            w, h = size[0] * 4, max(16, size[1] // 4)
        caption = scene.caption()
        path = f"/img/{i:06d}.jpg"
        res = Resource()
        dup_of = ""
        if kind in ("exact_dup", "near_dup"):
            j = rng.choice(originals)
            dup_of, scene, caption = rows[j]["path"], scenes[j], rows[j]["true_caption"]
            src = resources[rows[j]["path"]].body
            if kind == "exact_dup":
                res.body = src
            else:
                res.body = jpeg(Image.open(io.BytesIO(src)).filter(ImageFilter.GaussianBlur(0.6)), quality=70)
        elif kind == "png":
            res.body, res.content_type = png(render(scene, w, h, seed * 1_000_003 + i)), "image/png"
        else:
            res.body = jpeg(render(scene, w, h, seed * 1_000_003 + i))
        if kind == "clean":
            originals.append(i)
        other = scenes[(i + 7) % n].caption()
        alt = _junk_alt(kind, rng, caption, other, scene)
        _apply_failure(kind, res, path, resources)
        resources[path] = res
        if kind == "redirect_private":
            path = f"/redirect/{i:06d}"
        rows.append({"path": path, "alt": alt, "true_caption": caption, "kind": kind,
                     "fate": fates[kind], "duplicate_of": dup_of, "row_id": i})
    return World(rows, resources)


def _apply_failure(kind: str, res: Resource, path: str, resources: dict) -> None:
    if kind == "slow":
        res.delay = 0.3
    elif kind == "redirect_chain":
        hop2, hop1 = path + "/hop2", path + "/hop1"
        resources[hop2] = Resource(body=res.body)
        resources[hop1] = Resource(status=302, redirect=hop2)
        res.status, res.redirect, res.body = 301, hop1, b""
    elif kind == "flaky_503":
        res.fail_first = 1
    elif kind == "http_404":
        res.status, res.body, res.content_type = 404, b"not found", "text/plain"
    elif kind == "http_500":
        res.status, res.body, res.content_type = 500, b"oops", "text/plain"
    elif kind == "timeout":
        res.delay = 1e9  # never answers; the server gives up when it stops
    elif kind == "trickle":
        res.trickle = 0.5
    elif kind == "html":
        res.body, res.content_type = b"<html><body><h1>Cute shapes!</h1></body></html>" * 20, "image/jpeg"
    elif kind == "truncated_jpeg":
        res.body = res.body[: len(res.body) // 2]
    elif kind == "corrupt_jpeg":
        rnd = random.Random(len(res.body))
        res.body = res.body[:20] + bytes(rnd.randrange(256) for _ in range(2000))
    elif kind == "bomb":
        res.body, res.content_type = png_bomb(), "image/png"
    elif kind == "redirect_loop":
        resources[path + "/b"] = Resource(status=302, redirect=path)
        res.status, res.redirect = 302, path + "/b"
    elif kind == "redirect_private":
        # /redirect/N on this (allowed) server sends the client to a private address
        resources[path.replace("/img/", "/redirect/").removesuffix(".jpg")] = Resource(
            status=302, redirect="http://10.255.255.1/secret.jpg")
    elif kind == "noai":
        res.headers = {"X-Robots-Tag": "noai"}
    elif kind == "oversized":
        res.body = res.body + b"\x00" * 3_000_000
    elif kind == "drop_connection":
        res.drop = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        server: WebServer = self.server.owner  # type: ignore[attr-defined]
        res = server.world.resources.get(self.path)
        if res is None:
            return self._send(404, b"no such resource", "text/plain")
        with server.lock:
            server.hits[self.path] = hits = server.hits.get(self.path, 0) + 1
        if res.drop:
            self.close_connection = True
            return
        if hits <= res.fail_first:
            return self._send(503, b"try later", "text/plain")
        if res.delay and server.stopped.wait(res.delay):
            return
        if res.redirect:
            return self._send(res.status, b"", "text/plain", {"Location": res.redirect})
        if res.trickle:
            self.send_response(res.status)
            self.send_header("Content-Type", res.content_type)
            self.send_header("Content-Length", str(len(res.body)))
            self.end_headers()
            for k in range(0, len(res.body), 64):
                if server.stopped.wait(res.trickle):
                    return
                try:
                    self.wfile.write(res.body[k:k + 64])
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client hit its deadline
            return
        self._send(res.status, res.body, res.content_type, res.headers)

    def _send(self, status, body, ctype, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout or a byte cap): nothing to answer


class WebServer:
    """Serve a World on 127.0.0.1; a context manager that starts and stops it."""

    def __init__(self, world: World, port: int = 0):
        self.world, self.hits, self.lock = world, {}, threading.Lock()
        self.stopped = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "WebServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve_forever(self) -> None:
        with self:
            while not self.stopped.wait(3600):
                time.sleep(0)


CURATED_SIZES = ((96, 96), (128, 72), (72, 128), (120, 90), (80, 160))


def write_curated_run(output: str | Path, n: int, per_shard: int = 10, seed: int = 0,
                      sizes=CURATED_SIZES, faults: bool = True, drop_every: int | None = 3) -> dict[str, str]:
    """A run folder as download, score, select and recaption leave it (``raw/``, ``scores/``,
    ``selection/``, ``captions/``), from rendered scenes of varied aspect ratios: the input of
    the build stage without the cost of the stages before it. Every ``drop_every``-th row is
    dropped by selection. With ``faults``, three kept rows are bad: a corrupt image, a missing image and
    a row with no caption at all. Returns each kept key's intended fate."""
    import json

    from pipeline import shards
    from pipeline.schemas import CAPTIONS, SELECTION, kept_digest

    out, rng = Path(output), random.Random(seed)
    fates: dict[str, str] = {}
    for sub in ("raw", "scores", "selection", "captions"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    bad = {1: "corrupt", 4: "missing", 7: "no_caption"} if faults else {}
    for sid in range(-(-n // per_shard)):
        samples, raw, scores, sel, caps = [], [], [], [], []
        for i in range(sid * per_shard, min(n, (sid + 1) * per_shard)):
            key = f"{sid:05d}{i % per_shard:04d}"
            scene = random_scene(rng)
            w, h = sizes[i % len(sizes)]
            body = jpeg(render(scene, w, h, seed=i))
            keep = not drop_every or i % drop_every != drop_every - 1
            fate = bad.get(i, "ok") if keep else "dropped"
            if fate == "corrupt":
                body = body[: len(body) // 3]
            alt = "" if fate == "no_caption" else f"photo {i}: {scene.caption().lower()}"
            if fate != "missing":
                samples.append((key, {"jpg": body, "txt": alt.encode()}))
            raw.append({"key": key, "caption": alt, "url": f"http://synthetic.test/{key}.jpg", "status": "success",
                        "width": w, "height": h, "original_width": w * 2, "original_height": h * 2,
                        "source": "synthetic", "punsafe": round(0.01 * (i % 7), 2)})  # input name, an input column
            scores.append({"key": key, "clip_score": 0.2 + 0.01 * (i % 10), "min_side": min(w, h)})
            sel.append({"key": key, "keep": keep, "reason": None if keep else "clip_score >= 0.25"})
            if keep:
                fates[key] = fate
                ok = fate != "no_caption"
                caps.append({"key": key, "alt_text": alt, "status": "ok" if ok else "failed",
                             "reason": None if ok else "descriptive: empty after 3 attempts",
                             "descriptive": f"A detailed picture: {scene.caption()}" if ok else None,
                             "short": scene.caption() if ok else None, "model": "synthetic-truth",
                             "backend": "synthetic", "prompt_descriptive": "descriptive-v1@1",
                             "prompt_short": "short-v1@1", "generation": "{}", "created_at": "2026-01-01T00:00:00"})
        name = shards.shard_name(sid)
        shards.write_tar(out / "raw" / f"{name}.tar", samples)
        for sub, rows, schema in (("raw", raw, None), ("scores", scores, None), ("selection", sel, SELECTION),
                                  ("captions", caps, CAPTIONS)):
            table = pa.Table.from_pylist(rows, schema=schema) if schema is not None else pa.Table.from_pylist(rows)
            shards.write_parquet(out / sub / f"{name}.parquet", table)
            stats = {"count": len(rows), "successes": len(rows), "kept": sum(r.get("keep", True) for r in rows)}
            if sub == "scores":  # the records the stages write, as the funnels read them
                stats.update(scored=len(rows), errors=0)
            if sub == "captions":
                status = [r["status"] for r in rows]
                stats.update(ok=status.count("ok"), partial=status.count("partial"), failed=status.count("failed"))
            if sub == "selection":  # what `tapir select` records: the build plans from it
                stats.update(rows=len(rows), kept_digest=kept_digest(r["key"] for r in rows if r["keep"]))
            (out / sub / f"{name}_stats.json").write_text(json.dumps(stats))
    write_selection_summary(out, n, len(fates))
    return fates


def write_selection_summary(out: Path, rows: int, kept: int) -> None:
    """The selection's ``_summary.json`` as ``tapir select`` writes it last (the default
    rules), so later stages accept the hand-written selection as complete."""
    import json

    from pipeline import shards
    from pipeline.config import RunConfig
    from pipeline.schemas import SELECTION_SUMMARY as SUMMARY
    from pipeline.select import selection_fingerprint

    cfg = RunConfig(output=str(out))
    sel = out / "selection"
    ids = sorted(shards.done_shards(sel))
    shards.atomic_write(sel / SUMMARY, json.dumps({
        "rules": [{"rule": r} for r in cfg.select.rules], "rows": rows, "kept": kept, "dropped_by": {},
        "unscored_shards": {}, "fingerprint": selection_fingerprint(cfg),
        "shards": {shards.shard_name(i): shards.record_digest(sel, i) for i in ids}}))
