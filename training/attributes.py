"""The attribute classifier: what a generated image of the synthetic world shows.

A small CNN trained on rendered ground truth (scenes of one object group: its colour, shape,
count, size and position, and the background), separate from every model it judges. The
closed-loop experiment asks it whether an image generated for a prompt shows what the
prompt asked for, attribute by attribute (prompt-following accuracy).

Images of any size are resized to ``INPUT`` pixels; training images are rendered at 64 px
and shrunk at random to 16, 24, 32 or 64 px first, so generations at 16x16 are judged as
fairly as sharp ones. Its held-out accuracy is measured on scenes drawn with another seed
and saved with it (``config.json``); :func:`load` reads it back.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.synthweb import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, render

log = logging.getLogger(__name__)

ATTRIBUTES = {
    "colour": list(COLOURS), "shape": list(SHAPES), "count": [1, 2, 3], "size": list(SIZES),
    "position": list(POSITIONS), "background": list(BACKGROUNDS),
}
INPUT = 32


def scene_attributes(scene: Scene) -> dict:
    """The attributes of a scene of one object group (what a held-out prompt asks for)."""
    (count, size, colour, shape, position), = scene.objects
    return {"colour": colour, "shape": shape, "count": count, "size": size, "position": position,
            "background": scene.background}


def random_single_scene(rng: random.Random) -> Scene:
    """A scene of one object group: every attribute drawn uniformly."""
    return Scene([(rng.choice([1, 2, 3]), rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES),
                   rng.choice(list(POSITIONS)))], rng.choice(BACKGROUNDS))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1], any H and W, as the classifier's input."""
    return F.interpolate(images.float(), size=(INPUT, INPUT), mode="bilinear", antialias=True, align_corners=False)


def rendered(n: int, seed: int, shrink: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` single-group scenes rendered at 64 px (shrunk to a random 16-64 px first when
    ``shrink``), as classifier inputs, and their labels (indices into :data:`ATTRIBUTES`)."""
    rng = random.Random(seed)
    images, labels = [], {k: [] for k in ATTRIBUTES}
    for i in range(n):
        scene = random_single_scene(rng)
        img = render(scene, 64, 64, seed * 1_000_003 + i)
        if shrink:
            side = rng.choice([16, 24, 32, 64])
            img = img.resize((side, side), resample=rng.choice([0, 2, 3]))  # nearest, bilinear, bicubic
        images.append(to_input(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None] / 255.0)[0])
        for k, v in scene_attributes(scene).items():
            labels[k].append(ATTRIBUTES[k].index(v))
    return torch.stack(images), {k: torch.tensor(v) for k, v in labels.items()}


class AttributeNet(nn.Module):
    def __init__(self, width: int = 48):
        super().__init__()

        def block(i, o, stride):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8, o), nn.SiLU())

        self.body = nn.Sequential(block(3, width, 1), block(width, width, 1), block(width, 2 * width, 2),
                                  block(2 * width, 2 * width, 1), block(2 * width, 4 * width, 2),
                                  block(4 * width, 4 * width, 2))  # 32 -> 4
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.neck(self.body((x - 0.5) / 0.25))
        return {k: head(h) for k, head in self.heads.items()}


def accuracy(net: AttributeNet, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    net.eval()
    with torch.no_grad():
        out = {k: [] for k in ATTRIBUTES}
        for s in range(0, len(images), 512):
            for k, v in net(images[s:s + 512]).items():
                out[k].append(v.argmax(1))
    return {k: round(float((torch.cat(v) == labels[k]).float().mean()), 4) for k, v in out.items()}


def train(out: Path, samples: int = 12000, held_out: int = 2000, epochs: int = 6, batch_size: int = 128,
          lr: float = 2e-3, seed: int = 0) -> dict:
    """Train on ``samples`` rendered scenes, measure on ``held_out`` others (another seed),
    save to ``out`` (``model.safetensors``, ``config.json`` with the held-out accuracy)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    start = time.monotonic()
    torch.manual_seed(seed)
    x, y = rendered(samples, seed=1000 + seed)
    xt, yt = rendered(held_out, seed=2000 + seed)
    net = AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * (samples // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="attribute classifier", unit="step")
    for _ in range(epochs):
        net.train()
        order = torch.randperm(samples, generator=gen)
        for s in range(0, samples - batch_size + 1, batch_size):
            i = order[s:s + batch_size]
            out_ = net(x[i])
            loss = sum(F.cross_entropy(out_[k], y[k][i]) for k in ATTRIBUTES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    acc = accuracy(net, xt, yt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    info = {"attributes": ATTRIBUTES, "input": INPUT, "held_out_accuracy": acc, "samples": samples,
            "held_out": held_out, "epochs": epochs, "seed": seed, "seconds": round(time.monotonic() - start, 1)}
    (out / "config.json").write_text(json.dumps(info, indent=2))
    log.info("attribute classifier: held-out accuracy %s", acc)
    return info


class AttributeClassifier:
    """A trained classifier loaded from its folder."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        folder = Path(folder)
        self.config = json.loads((folder / "config.json").read_text())
        if self.config["attributes"] != json.loads(json.dumps(ATTRIBUTES)):
            raise ValueError(f"{folder} was trained on other attributes than this Tapir's world: retrain it "
                             "(`tapir world-models`)")
        self.net = AttributeNet()
        self.net.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.net.eval()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list]:
        """Images (N, 3, H, W) in [0, 1]: each attribute's predicted value per image."""
        out = self.net(to_input(images))
        return {k: [ATTRIBUTES[k][i] for i in v.argmax(1).tolist()] for k, v in out.items()}


def load(folder: str | Path) -> AttributeClassifier:
    return AttributeClassifier(folder)


def held_out_prompts(n: int, seed: int = 31337) -> list[Scene]:
    """``n`` scenes of one object group no model trained on (their own seed): their captions
    are the prompts, their attributes what a generated image must show."""
    rng = random.Random(seed)
    return [random_single_scene(rng) for _ in range(n)]


def prompt_following(sample, classifier: "AttributeClassifier | str | Path", n: int = 64, seed: int = 0,
                     prompt_seed: int = 31337, **sample_kwargs) -> dict:
    """Prompt-following accuracy of a generator, per attribute: ``sample(prompts, seed=...,
    **sample_kwargs)`` (uint8 images (N, 3, H, W), e.g. :func:`training.sample.load_sampler`'s)
    draws an image for each of ``n`` held-out prompts, and the attribute classifier says how
    often it shows what its prompt asked for. Chance levels are given beside."""
    clf = classifier if isinstance(classifier, AttributeClassifier) else load(classifier)
    scenes = held_out_prompts(n, prompt_seed)
    images = sample([s.caption() for s in scenes], seed=seed, **sample_kwargs)
    pred = clf.predict(images.float() / 255.0)
    truth = [scene_attributes(s) for s in scenes]
    return {"accuracy": {k: round(sum(p == t[k] for p, t in zip(pred[k], truth)) / n, 4) for k in ATTRIBUTES},
            "chance": {k: round(1 / len(v), 4) for k, v in ATTRIBUTES.items()}, "prompts": n,
            "images": images}
