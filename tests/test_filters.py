"""Scorers and selection rules as plain classes and functions (no Ray); the safety scorers are in
test_filters_safety.py, dedup in test_dedup.py."""

import io

import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFont, ImageOps
from skimage import data

from filters.basic import BasicScorer, LanguageScorer, PhashScorer, junk_alt_score
from filters.rules import RuleError, apply, parse, resolve_fractions


def _jpeg(im, quality=90):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def text_image():
    im = Image.new("RGB", (320, 240), (250, 250, 245))
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=30)
    d.text((12, 60), "BIG SALE 50% OFF", fill="black", font=font)
    d.text((12, 130), "www.shapes-shop.com", fill=(200, 0, 0), font=font)
    return im


@pytest.mark.parametrize("caption,expect", [
    ("IMG_9793.jpg", 1.0), ("DSC01234", 1.0), ("https://cdn.example.com/p/123.png", 1.0), ("", 1.0), (None, 1.0),
    ("buy cheap shapes best price free shipping sale discount", 1.0),
    ("Two large red circles at the top, on a striped background.", 0.0),
])
def test_junk_alt(caption, expect):
    assert junk_alt_score(caption) == expect


def test_junk_alt_repeated_tokens_in_between():
    assert 0.5 < junk_alt_score("cat cat cat cat cat dog") < 1.0


def test_basic_scorer_known_sizes():
    ims = [Image.new("RGB", (300, 100)), Image.new("RGB", (64, 64))]
    out = BasicScorer()({"image": ims, "image_bytes": [b"x" * 10, b"y" * 3], "caption": ["a b c", None]})
    assert out["width"] == [300, 64] and out["height"] == [100, 64] and out["min_side"] == [100, 64]
    assert out["aspect_ratio"] == [3.0, 1.0] and out["file_size"] == [10, 3]
    assert out["caption_chars"] == [5, 0] and out["caption_words"] == [3, 0]


def test_basic_scorer_sizes_are_the_originals_when_known():
    """img2dataset resized the stored images; sizes come from its original_width/height, and
    from the decoded image where those are unknown (None, or an input without them)."""
    ims = [Image.new("RGB", (128, 96)), Image.new("RGB", (64, 64)), Image.new("RGB", (50, 20))]
    batch = {"image": ims, "image_bytes": [b"x"] * 3, "caption": ["a"] * 3,
             "original_size": [(1024, 768), (None, None), None]}
    out = BasicScorer()(batch)
    assert out["width"] == [1024, 64, 50] and out["height"] == [768, 64, 20] and out["min_side"] == [768, 64, 20]
    assert out["aspect_ratio"] == [pytest.approx(4 / 3), 1.0, 2.5]


def test_language():
    s = LanguageScorer()
    s.setup()
    out = s({"caption": ["A small red triangle on a plain beige background.",
                         "Ein kleines rotes Dreieck auf einem beigen Hintergrund.",
                         "Un petit triangle rouge sur un fond beige.", "  "]})
    assert out["language"] == ["en", "de", "fr", None]
    assert all(0.5 < p <= 1 for p in out["language_score"][:3])


def test_phash_finds_flipped_recompressed_photo():
    photo = Image.fromarray(data.astronaut())
    copy = Image.open(io.BytesIO(_jpeg(ImageOps.mirror(photo), quality=60))).convert("RGB")
    other = Image.fromarray(data.chelsea())
    out = PhashScorer()({"image": [photo, copy, other]})
    h, m = out["phash"], out["phash_mirror"]
    assert bin(h[0] ^ h[1]).count("1") > 10  # a plain phash does not see the flip ...
    assert bin(m[0] ^ h[1]).count("1") <= 4  # ... the mirrored hash does (dedup: tests/test_dedup.py)


SCHEMA = pa.schema([("key", pa.string()), ("clip_score", pa.float32()), ("language", pa.string()),
                    ("duplicate_of", pa.string()), ("duplicate_kind", pa.string())])


def test_rule_naming_unknown_score_fails_with_its_name():
    with pytest.raises(RuleError, match=r"rule 'clip_scor >= 0.3' names unknown score 'clip_scor'"):
        parse(["clip_scor >= 0.3"], SCHEMA)
    with pytest.raises(RuleError, match="not understood"):
        parse(["clip_score is big"], SCHEMA)
    with pytest.raises(RuleError, match=r"percentage must be in \(0, 100\]"):
        parse(["top 130% by clip_score"], SCHEMA)


def test_rules_first_failure_and_nulls():
    table = pa.table({"key": list("abcdef"), "clip_score": [0.1, 0.5, None, 0.9, 0.3, 0.7],
                      "language": ["en", "de", "en", "en", None, "en"],
                      "duplicate_of": [None, None, None, "b", None, None],
                      "duplicate_kind": [None, None, None, "near", None, None]}, schema=SCHEMA)
    rules = parse(["not duplicate", "language in [en]", "clip_score >= 0.2"], SCHEMA)
    keep, reason = apply(rules, table)
    assert keep.tolist() == [False, False, False, False, False, True]
    assert reason == ["clip_score >= 0.2", "language in [en]", "clip_score >= 0.2", "not duplicate",
                      "language in [en]", None]
    keep, _ = apply(parse(["not duplicate(exact)"], SCHEMA), table)
    assert keep.all()  # the one duplicate is near, not exact


def test_top_fraction_is_a_threshold_over_the_whole_table():
    table = pa.table({"key": [str(i) for i in range(10)], "clip_score": [i / 10 for i in range(10)],
                      "language": ["en"] * 10, "duplicate_of": [None] * 10, "duplicate_kind": [None] * 10},
                     schema=SCHEMA)
    rules = resolve_fractions(parse(["top 30% by clip_score"], SCHEMA), table)
    keep, reason = apply(rules, table)
    assert keep.tolist() == [False] * 7 + [True] * 3
    assert abs(rules[0].value - 0.7) < 1e-6
    rules = resolve_fractions(parse(["bottom 20% by clip_score"], SCHEMA), table)
    assert apply(rules, table)[0].tolist() == [True, True] + [False] * 8
