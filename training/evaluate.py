"""In-loop evaluation: CLIP score and a Fréchet distance for generated images.

``clip_score`` is the CLIPScore of Hessel et al. (2021) as torchmetrics computes it:
the mean over images of ``100 * max(cos(image, caption), 0)``. The Fréchet distance
uses torchmetrics' FID Inception features when their weights are already on disk,
otherwise the L2-normalised image embeddings of the same CLIP model (as clean-fid's
CLIP features do); ``feature_name`` says which, and values of the two are not comparable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.transforms import Normalize

from filters.clip import load_clip

log = logging.getLogger(__name__)

# torch-fidelity's FeatureExtractorInceptionV3 (behind torchmetrics' FID) fetches this with
# torch.hub.load_state_dict_from_url, which keeps it under <torch hub dir>/checkpoints/.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


def inception_weights_path() -> Path:
    """Where torch.hub caches the FID Inception weights (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(INCEPTION_URL).path)


def inception_available() -> bool:
    """torch-fidelity is installed and its weights are cached: loading them needs no network."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    return bool(_TORCH_FIDELITY_AVAILABLE) and inception_weights_path().is_file()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets, in float64.

    tr sqrt(S1 S2) is taken as tr sqrt(R S2 R) with R = sqrt(S1): both are symmetric PSD,
    so eigh gives real eigenvalues (clamped at 0) and singular covariances (N <= D) stay
    finite, where scipy's sqrtm needs the eps * I retry of pytorch-fid.
    """
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


class Evaluator:
    """Loaded once per run on rank 0."""

    def __init__(self, clip_model: str, clip_pretrained: str | None, device: str = "cpu",
                 fid: str = "auto", batch_size: int = 64):
        if fid not in ("auto", "inception", "clip"):
            raise ValueError(f"fid must be 'auto', 'inception' or 'clip', not {fid!r}")
        self.device, self.batch_size, self.clip_model = device, batch_size, clip_model
        self.model, preprocess, self.tokenizer = load_clip(clip_model, clip_pretrained, device)
        # open_clip's eval transform minus its final Normalize runs on uint8 tensors (resize,
        # crop; MaybeToTensor passes tensors through), as it would on a PIL image.
        *geometry, self.normalize = preprocess.transforms
        if not isinstance(self.normalize, Normalize):
            raise TypeError(f"unexpected open_clip preprocess: {preprocess}")
        self.geometry = type(preprocess)(geometry)
        self.inception = None
        if fid == "inception" or (fid == "auto" and inception_available()):
            self.inception = self._load_inception()
        log.info("evaluation features: %s", self.feature_name)

    def _load_inception(self):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        path = inception_weights_path()
        if not (_TORCH_FIDELITY_AVAILABLE and path.is_file()):
            raise FileNotFoundError(
                f"fid='inception' needs torch-fidelity installed and the Inception weights at {path} "
                f"(the torch.hub cache, set by $TORCH_HOME; file from {INCEPTION_URL}); "
                f"nothing is downloaded here. Use fid='clip' or 'auto' to fall back to CLIP features.")
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
        return metric.inception.to(self.device)

    @property
    def feature_name(self) -> str:
        if self.inception is not None:
            return "inception-v3 (torchmetrics FID)"
        return f"open_clip image tower {self.clip_model}"

    def _batches(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        for i in range(0, len(images), self.batch_size):
            yield images[i:i + self.batch_size].to(self.device)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised float32 CLIP image embeddings of uint8 (N, 3, H, W) images."""
        out = []
        for batch in self._batches(images):
            pixels = self.normalize(self.geometry(batch).float() / 255)
            out.append(torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def clip_score(self, images: torch.Tensor, prompts: list[str]) -> float:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        img = self.image_embeddings(images)
        txt = torch.cat([self.model.encode_text(self.tokenizer(prompts[i:i + self.batch_size]).to(self.device))
                         for i in range(0, len(prompts), self.batch_size)]).float()
        cos = (img * torch.nn.functional.normalize(txt, dim=-1)).sum(-1)
        return float(100 * cos.clamp(min=0).mean())

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) float64 features of the Fréchet network, on the CPU."""
        if self.inception is None:
            return self.image_embeddings(images).double().cpu()
        return torch.cat([self.inception(b).double().cpu() for b in self._batches(images)])

    def frechet(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        return frechet_distance(self.features(real), self.features(fake))
