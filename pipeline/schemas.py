"""Every stage's output schema (column names and Arrow types), below the stages.

The stages, the report, ``tapir verify``, the synthetic world and the trainers read their
column names and types here, so none of them imports another stage for a schema::

    raw/NNNNN.parquet        RAW (img2dataset's columns) + input extras, ``source``, ``input_*``
    scores/NNNNN.parquet     SCORES_BASE + the scorers' columns (SCORER_SCHEMAS) + DEDUP's
    scores/_dedup/NNNNN.parquet  DEDUP
    selection/NNNNN.parquet  SELECTION
    captions/NNNNN.parquet   CAPTIONS
    shards/NNNNN.tar         members (SAMPLE_MEMBERS, CAPTION_MEMBERS) and a json record; the plan
                             PLAN_SCHEMA; the sizes a build writes (:func:`target_sizes`)

Plain data and small pure helpers only: this module imports nothing from the pipeline but the
config.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

# ---- raw/ (download) --------------------------------------------------------------------------
# img2dataset's columns plus tapir's ``error_reason`` and ``attempts``; the input's other columns
# follow, ``source`` (the input a row came from) and ``input_<name>`` for the input's own values of
# columns img2dataset overwrites (DataComp's sha256, sizes).
RAW = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("status", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("sha256", pa.string()), ("error_reason", pa.string()), ("attempts", pa.int32()),
])
SOURCE = "source"  # raw column: the name of the input a row came from
INPUT_PREFIX = "input_"  # raw columns: input values img2dataset would overwrite

# ---- scores/ (score) --------------------------------------------------------------------------
SCORES_BASE = pa.schema([("key", pa.string()), ("score_error", pa.string()), ("sha256", pa.string())])
SCORER_SCHEMAS = {
    "basic": pa.schema([
        ("width", pa.int32()), ("height", pa.int32()), ("min_side", pa.int32()), ("aspect_ratio", pa.float32()),
        ("file_size", pa.int64()), ("caption_chars", pa.int32()), ("caption_words", pa.int32()),
        ("junk_alt", pa.float32()),
    ]),
    "language": pa.schema([("language", pa.string()), ("language_score", pa.float32())]),
    "phash": pa.schema([("phash", pa.uint64()), ("phash_mirror", pa.uint64())]),
    "clip": pa.schema([("clip_score", pa.float32()), ("clip_embedding", pa.list_(pa.float16()))]),
    "nsfw": pa.schema([("nsfw_score", pa.float32())]),
    "ocr": pa.schema([("text_area", pa.float32()), ("text_boxes", pa.int32())]),
    "aesthetic": pa.schema([("aesthetic_score", pa.float32())]),
}
EMBEDDING = "clip_embedding"  # the list column readers of scores drop unless they need it

# ---- scores/_dedup/ (dedup) -------------------------------------------------------------------
DEDUP = pa.schema([("key", pa.string()), ("duplicate_of", pa.string()), ("duplicate_kind", pa.string())])


def scores_schema(scorers) -> pa.Schema:
    """The columns ``tapir score`` writes for these scorer names, with dedup's, known without
    loading a model (rules are checked against it before any work)."""
    fields = list(SCORES_BASE) + [f for name in scorers for f in SCORER_SCHEMAS[name]] + list(DEDUP)[1:]
    return pa.schema(fields)


# ---- selection/ (select) ----------------------------------------------------------------------
SELECTION = pa.schema([("key", pa.string()), ("keep", pa.bool_()), ("reason", pa.string())])
SELECTION_SUMMARY = "_summary.json"  # the whole selection's record, written last
# per-shard selection record fields the build plans from: rows, rows kept, digest of the kept keys
RECORD_ROWS, RECORD_KEPT, RECORD_KEPT_DIGEST = "rows", "kept", "kept_digest"


def kept_digest(keys) -> str:
    """The selection record's ``kept_digest``: sha256 of the kept keys, sorted, one per line."""
    h = hashlib.sha256()
    for key in sorted(keys):
        h.update(key.encode() + b"\n")
    return h.hexdigest()

# ---- captions/ (recaption) --------------------------------------------------------------------
CAPTION_KINDS_SYNTHETIC = ("descriptive", "short")
CAPTIONS = pa.schema([
    ("key", pa.string()), ("alt_text", pa.string()),
    ("descriptive", pa.string()), ("short", pa.string()),
    ("status", pa.string()), ("reason", pa.string()),
    ("descriptive_status", pa.string()), ("short_status", pa.string()),
    ("descriptive_raw", pa.string()), ("short_raw", pa.string()),
    ("descriptive_attempts", pa.int32()), ("short_attempts", pa.int32()),
    ("descriptive_tokens", pa.int32()), ("short_tokens", pa.int32()),
    ("model", pa.string()), ("backend", pa.string()),
    ("prompt_descriptive", pa.string()), ("prompt_short", pa.string()),
    ("generation", pa.string()), ("created_at", pa.string()),
])

# ---- shards/ (build) --------------------------------------------------------------------------
CAPTION_KINDS = ("alt_text", "short", "descriptive")
CAPTION_MEMBERS = {"alt_text": "alt.txt", "short": "short.txt", "descriptive": "descriptive.txt"}
TEXT_MEMBERS = ("txt", "json", "alt.txt", "short.txt", "descriptive.txt")
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
PLAN = "_plan.parquet"
PLAN_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.int32()), ("shard", pa.int32()),
                         ("width", pa.int32()), ("height", pa.int32()), ("est_bytes", pa.int64())])
# raw columns the sample json records by name (the rest of the raw row's scalars go under "meta")
RAW_RECORD = ("url", "caption", "width", "height", "original_width", "original_height")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "tapir-shards/1"
# how the json member stores unsigned 64-bit values (scores.phash, scores.phash_mirror): as JSON
# numbers half of them pass 2**63, and readers that type them int64 (Hugging Face datasets) overflow
JSON_UINT64 = "16-digit lowercase hex string: int(value, 16)"


def make_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """Aspect-ratio buckets of at most resolution^2 pixels, sides multiples of ``step``
    (the SDXL / NovelAI recipe): for each width, the tallest height that fits the area."""
    area, found = resolution * resolution, {(resolution // step * step,) * 2}
    for w in range(step, int(resolution * max_aspect) + 1, step):
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            found.add((w, h))
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def target_sizes(b) -> list[tuple[int, int]]:
    """The (width, height) sizes a build with BuildConfig ``b`` writes."""
    if b.crop == "center":
        return [(b.resolution, b.resolution)]
    return [tuple(x) for x in b.buckets] if b.buckets else make_buckets(b.resolution, b.bucket_step, b.max_aspect)
