"""CPU scorers: image and caption statistics, junk alt-text, language, perceptual hash.

A scorer is a plain class: ``setup()`` once per worker, then ``__call__(batch)`` returns
new columns for the batch. A batch is a dict of equal-length lists: ``key``,
``image`` (decoded RGB PIL images), ``image_bytes`` (the stored file), ``caption`` and,
optionally, ``original_size`` ((width, height) of the image as it was downloaded, before
img2dataset resized it; None where unknown). Column names and types: :mod:`pipeline.schemas`.
"""

from __future__ import annotations

import re

from pipeline.schemas import SCORER_SCHEMAS

IMAGE_FILENAME = re.compile(
    r"^\s*[\w\-. ()\[\]]*\.(jpe?g|png|gif|webp|bmp|tiff?|heic)\s*$|^\s*(img|dsc|dscn|pxl|screenshot|image|photo)"
    r"[_\- ]?\d+", re.I)
URL = re.compile(r"https?://|www\.|\.(com|net|org|html?)\b", re.I)
SPAM_WORDS = {"buy", "cheap", "best", "price", "prices", "free", "shipping", "sale", "discount", "deal", "deals",
              "online", "order", "wholesale", "offer", "shop", "store", "coupon", "promo", "2024", "2025", "2026"}


def junk_alt_score(caption: str | None) -> float:
    """0 for a plausible description, 1 for obvious junk (empty, a filename, a URL),
    in between for repeated tokens and SEO keyword lists."""
    text = (caption or "").strip()
    if not text or IMAGE_FILENAME.search(text) or URL.search(text):
        return 1.0
    words = re.findall(r"\w+", text.lower())
    if not words:
        return 1.0
    repeated = 1 - len(set(words)) / len(words) if len(words) >= 4 else 0.0
    repeated = repeated if repeated >= 0.4 else 0.0  # ordinary prose repeats a few words
    spam = sum(w in SPAM_WORDS for w in words) / len(words)
    return round(min(1.0, max(repeated, 2.5 * spam)), 4)


class BasicScorer:
    """Width, height, shorter side, aspect ratio, file size, caption length, junk alt-text.

    The sizes are the image's original ones (img2dataset's ``original_width`` and
    ``original_height``, passed as ``original_size``) where known, so a ``min_side`` rule
    judges the photo that was published, not the copy resized for the shard; else the
    decoded image's. ``file_size`` is the stored file's."""

    name = "basic"
    schema = SCORER_SCHEMAS["basic"]

    def setup(self) -> None:
        pass

    def __call__(self, batch: dict) -> dict:
        original = batch.get("original_size") or [None] * len(batch["image"])
        sizes = [o if o and o[0] and o[1] else im.size for im, o in zip(batch["image"], original)]
        captions = [c or "" for c in batch["caption"]]
        return {
            "width": [w for w, _ in sizes], "height": [h for _, h in sizes],
            "min_side": [min(s) for s in sizes], "aspect_ratio": [max(s) / max(1, min(s)) for s in sizes],
            "file_size": [len(b) for b in batch["image_bytes"]],
            "caption_chars": [len(c) for c in captions], "caption_words": [len(c.split()) for c in captions],
            "junk_alt": [junk_alt_score(c) for c in captions],
        }


class LanguageScorer:
    """Caption language with py3langid (its model ships inside the wheel)."""

    name = "language"
    schema = SCORER_SCHEMAS["language"]

    def setup(self) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier  # npz model inside the wheel

        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def __call__(self, batch: dict) -> dict:
        langs, scores = [], []
        for caption in batch["caption"]:
            if not caption or not caption.strip():
                langs.append(None)
                scores.append(None)
                continue
            lang, prob = self.identifier.classify(caption)
            langs.append(lang)
            scores.append(float(prob))
        return {"language": langs, "language_score": scores}


class PhashScorer:
    """64-bit perceptual hash (imagehash.phash) of the image and of its mirror image, so a
    horizontally flipped copy is found as a near-duplicate too."""

    name = "phash"
    schema = SCORER_SCHEMAS["phash"]

    def setup(self) -> None:
        pass

    @staticmethod
    def hash(im) -> int:
        import imagehash

        return int("".join("1" if b else "0" for b in imagehash.phash(im).hash.flatten()), 2)

    def __call__(self, batch: dict) -> dict:
        from PIL import ImageOps

        return {"phash": [self.hash(im) for im in batch["image"]],
                "phash_mirror": [self.hash(ImageOps.mirror(im)) for im in batch["image"]]}
