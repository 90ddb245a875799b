"""The world captioner, fine-tuned as DALL-E 3 fine-tuned its captioner (Betker et al., 2023).

DALL-E 3 took an image-conditioned language model, pretrained with CLIP image features, and
fine-tuned it on a small set of images with detailed ("descriptive synthetic") captions and
on one with short captions naming the main subject. In miniature:

- the vision tower is the world CLIP's image encoder (:mod:`training.world`, trained by
  ``open_clip_train`` on Tapir's shards), its weights mapped into transformers'
  ``CLIPVisionModel``; the decoder is a small Llama; together a ``LlavaForConditionalGeneration``
  with the chat template and word-level tokenizer of :mod:`recaption.tiny`;
- it is fine-tuned on ``images`` (a few hundred) rendered scenes, each with its two
  ground-truth captions, asked for with the recaption stage's own prompt templates
  (``descriptive-v1``, ``short-v1``): the descriptive caption names every object group
  (count, size, colour, shape, position) and the background; the short one only the
  objects;
- it is saved with ``save_pretrained`` and loaded by ``tapir recaption`` (backend
  ``transformers``) through ``AutoModelForImageTextToText``, the path of any hub captioner.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import time
from pathlib import Path

import torch

from pipeline.synthweb import NUMBERS, Scene, random_scene, render

log = logging.getLogger(__name__)

IMAGE = 64  # the world CLIP's input
PROMPTS = ("descriptive-v1", "short-v1")


def short_caption(scene: Scene) -> str:
    """The main subject in one sentence: the objects, without sizes, places or background."""
    parts = []
    for count, _size, colour, shape, _pos in scene.objects:
        article = NUMBERS[count] if count > 1 else ("an" if colour[0] in "aeiou" else "a")
        parts.append(f"{article} {colour} {shape}{'s' if count > 1 else ''}")
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body[0].upper()}{body[1:]}."


def captions(scene: Scene) -> dict[str, str]:
    return {"descriptive": scene.caption(), "short": short_caption(scene)}


def as_downloaded(img, size: int = IMAGE):
    """An image as the download stage stores it at ``size`` (center crop, JPEG quality 95)."""
    from PIL import Image

    buf = io.BytesIO()
    img.resize((size, size), Image.BICUBIC).save(buf, "JPEG", quality=95)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def scenes(n: int, seed: int) -> list[tuple[Scene, object]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = random_scene(rng)
        out.append((s, as_downloaded(render(s, 2 * IMAGE, 2 * IMAGE, 70_000 + seed * 1_000_003 + i))))
    return out


def clip_vision_state(clip_state: dict) -> dict:
    """open_clip ``VisionTransformer`` weights (keys ``visual.*``) as transformers
    ``CLIPVisionTransformer`` weights (the mapping of transformers' CLIP conversion script)."""
    v = {k[len("visual."):]: t for k, t in clip_state.items() if k.startswith("visual.")}
    out = {"embeddings.class_embedding": v["class_embedding"],
           "embeddings.patch_embedding.weight": v["conv1.weight"],
           "embeddings.position_embedding.weight": v["positional_embedding"],
           "pre_layrnorm.weight": v["ln_pre.weight"], "pre_layrnorm.bias": v["ln_pre.bias"],
           "post_layernorm.weight": v["ln_post.weight"],
           "post_layernorm.bias": v["ln_post.bias"]}
    layers = sorted({int(k.split(".")[2]) for k in v if k.startswith("transformer.resblocks.")})
    for i in layers:
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for name in ("weight", "bias"):
            q, k, w = v[src + f"attn.in_proj_{name}"].chunk(3)
            out |= {dst + f"self_attn.q_proj.{name}": q, dst + f"self_attn.k_proj.{name}": k,
                    dst + f"self_attn.v_proj.{name}": w,
                    dst + f"self_attn.out_proj.{name}": v[src + f"attn.out_proj.{name}"],
                    dst + f"layer_norm1.{name}": v[src + f"ln_1.{name}"],
                    dst + f"layer_norm2.{name}": v[src + f"ln_2.{name}"],
                    dst + f"mlp.fc1.{name}": v[src + f"mlp.c_fc.{name}"],
                    dst + f"mlp.fc2.{name}": v[src + f"mlp.c_proj.{name}"]}
    return out


def create(clip: str, seed: int = 0, layers: int = 3, width: int = 128):
    """(model, processor): a LLaVA whose vision tower is the world CLIP's image encoder
    (``clip``: a ``local-dir:`` identifier) and whose decoder is a fresh Llama."""
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from recaption.tiny import CHAT_TEMPLATE, chat_tokenizer

    folder = Path(clip.removeprefix("local-dir:"))
    vision = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    from tokenizers import decoders

    tokenizer = chat_tokenizer()
    # words joined by spaces, none before punctuation ("at the top, on"); saved in tokenizer.json
    tokenizer.backend_tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    vocab = tokenizer.get_vocab()
    size, patch, vw = vision["image_size"], vision["patch_size"], vision["width"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="full",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": vw, "intermediate_size": 4 * vw,
                       "num_hidden_layers": vision["layers"], "num_attention_heads": vw // vision.get("head_width", 64),
                       "image_size": size, "patch_size": patch, "hidden_act": "gelu", "layer_norm_eps": 1e-5},
        text_config={"model_type": "llama", "vocab_size": len(vocab), "hidden_size": width,
                     "intermediate_size": 3 * width, "num_hidden_layers": layers, "num_attention_heads": 4,
                     "num_key_value_heads": 4, "max_position_embeddings": 512, "bos_token_id": vocab["<|user|>"],
                     "eos_token_id": vocab["<|end|>"], "pad_token_id": vocab["<pad>"]},
        image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="full",
        projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    tower = model.model.vision_tower
    prefix = "" if any(k.startswith("embeddings.") for k in tower.state_dict()) else ""
    mapped = clip_vision_state(load_file(str(folder / "open_clip_model.safetensors")))
    missing, unexpected = tower.load_state_dict({prefix + k: v for k, v in mapped.items()}, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise ValueError(f"the world CLIP's image encoder does not fit the captioner: missing {missing}, "
                         f"unexpected {unexpected}")
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["<|end|>"]
    return model, processor


def _batch(processor, items: list[tuple[object, str, str]]):
    """Teacher-forcing inputs for (image, prompt, caption) triples: the chat turn the recaption
    stage sends, then the caption and the end marker; the loss only on the caption and end."""
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True)
        for _, p, _ in items]
    full = [f"{p} {c} <|end|>" for p, (_, _, c) in zip(prompts, items)]
    images = [im for im, _, _ in items]
    tok = processor.tokenizer
    tok.padding_side = "right"
    batch = processor(images=images, text=full, return_tensors="pt", padding=True)
    lens = processor(images=images, text=prompts, return_tensors="pt", padding=True)["attention_mask"].sum(1)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for i, n in enumerate(lens.tolist()):
        labels[i, :n] = -100
    batch["labels"] = labels
    return batch


def web_pairs(raw: Path, limit: int | None = None) -> list[tuple[object, str]]:
    """(image, alt-text) of every downloaded sample of Tapir's ``raw/`` shards with a
    non-empty alt-text, read with webdataset as any trainer reads them."""
    import webdataset as wds
    from PIL import Image

    tars = sorted(str(p) for p in Path(raw).glob("[0-9]*.tar"))
    if not tars:
        raise FileNotFoundError(f"no shards in {raw}: download them first")
    pairs = []
    for sample in wds.WebDataset(tars, shardshuffle=False):
        alt = sample.get("txt", b"").decode().strip()
        if alt and "jpg" in sample:
            pairs.append((Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), alt))
            if limit and len(pairs) >= limit:
                break
    return pairs


def _fit(model, processor, data: list, epochs: int, batch_size: int, lr: float, seed: int, desc: str) -> None:
    """Teacher-forced training of everything but the vision tower (frozen: the CLIP's image
    encoder, as in LLaVA's and DALL-E 3's captioners) with AdamW and a one-cycle schedule."""
    from tqdm import tqdm

    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * (len(data) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    rng = random.Random(seed)
    data = list(data)
    model.train()
    bar = tqdm(total=steps, desc=desc, unit="step")
    for _ in range(epochs):
        rng.shuffle(data)
        for s in range(0, len(data) - batch_size + 1, batch_size):
            loss = model(**_batch(processor, data[s:s + batch_size])).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def train(clip: str, out: Path, images: int = 400, epochs: int = 20, batch_size: int = 16, lr: float = 1e-3,
          seed: int = 0, web: Path | None = None, web_epochs: int = 3, web_limit: int | None = None) -> str:
    """The captioner, DALL-E 3's recipe in miniature: first, when ``web`` (Tapir's ``raw/``
    shards of a noisy web) is given, trained to write a web image's alt-text, whatever its
    quality, with an empty prompt (``web_epochs``); then fine-tuned on ``images`` rendered
    scenes with their two ground-truth captions, each asked for with the recaption stage's
    template. Saved to ``out``; returns its path."""
    from recaption.prompts import load_prompt

    start = time.monotonic()
    model, processor = create(clip, seed=seed)
    pretrained = 0
    if web is not None:
        pairs = web_pairs(web, web_limit)
        pretrained = len(pairs)
        log.info("captioner: alt-text stage on %d web pairs of %s", pretrained, web)
        _fit(model, processor, [(img, "", alt) for img, alt in pairs], web_epochs, batch_size, lr, seed,
             "captioner: alt-text")
        del pairs
    templates = {load_prompt(p).kind: load_prompt(p).text for p in PROMPTS}
    data = [(img, templates[kind], text) for scene, img in scenes(images, seed=300 + seed)
            for kind, text in captions(scene).items()]
    _fit(model, processor, data, epochs, batch_size, lr, seed, "captioner: detailed captions")
    out = Path(out)
    processor.tokenizer.padding_side = "left"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "trained.json").write_text(json.dumps({
        "vision_tower": clip, "web": str(web) if web else None, "web_pairs": pretrained, "web_epochs": web_epochs,
        "images": images, "examples": len(data), "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "seed": seed, "prompts": list(PROMPTS), "seconds": round(time.monotonic() - start, 1)}, indent=2))
    log.info("captioner trained in %.0f s: %s", time.monotonic() - start, out)
    return str(out.resolve())


def held_out_rate(model: str, n: int = 100, seed: int = 7) -> dict:
    """Caption ``n`` held-out images through the recaption stage's own backend and prompts;
    how often the descriptive caption names the right colour and shape of every object group
    (and the count, position and background), and the short one the colours and shapes; also
    per object group, and over the images of one object group."""
    from recaption.backends import TransformersCaptioner
    from recaption.prompts import load_prompt

    backend = TransformersCaptioner(model, device="cpu", max_new_tokens=60)
    backend.setup()
    held = scenes(n, seed=900 + seed)
    result = {}
    for name in PROMPTS:
        t = load_prompt(name)
        got = []
        for s in range(0, n, 16):
            part = held[s:s + 16]
            got += [text for text, _, _ in backend.generate([im for _, im in part], [t.text] * len(part),
                                                            [""] * len(part), {})]
        checks = {"colour and shape": [], "colour and shape, per object group": [], "colour, per object group": [],
                  "single object": [],
                  "count": [], "position": [], "background": []}
        for (scene, _), text in zip(held, got):
            text = " " + " ".join(text.lower().replace(",", " ").replace(".", " ").split()) + " "
            named = [f" {c} {sh}" in text for _, _, c, sh, _ in scene.objects]
            coloured = [re.search(rf" {c} (?:circle|square|triangle|star)", text) is not None
                        for _, _, c, _, _ in scene.objects]
            checks["colour, per object group"] += coloured
            checks["colour and shape"].append(all(named))
            checks["colour and shape, per object group"] += named
            if len(named) == 1:
                checks["single object"].append(named[0])
            if t.kind == "descriptive":
                noun = [(k, f"{sh}s" if k > 1 else sh, sz, c, p) for k, sz, c, sh, p in scene.objects]
                checks["count"].append(all(f" {NUMBERS[k] if k > 1 else ''} {sz} {c} {n} ".replace("  ", " ")
                                           in text for k, n, sz, c, _ in noun))
                checks["position"].append(all(f" {c} {n} at the {p} " in text for _, n, _, c, p in noun))
                checks["background"].append(f" {scene.background} background " in text)
        result[t.kind] = {k: round(sum(v) / len(v), 4) for k, v in checks.items() if v}
        result[t.kind]["example"] = {"truth": captions(held[0][0])[t.kind], "caption": got[0]}
    return result
