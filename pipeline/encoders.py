"""Encoders for the build stage: a KL autoencoder, a VQ tokenizer, a text encoder.

Each is loaded by what a user writes, a Hugging Face id or a local folder (with an
optional subfolder, as in ``stabilityai/stable-diffusion-2-1`` + ``vae``), through
diffusers' ``AutoencoderKL`` / ``VQModel`` and transformers' auto classes. Every
loaded encoder has a fingerprint: a hash of its class, its config (without paths or
library versions) and its weights, so shards record exactly what encoded them and a
trainer can refuse shards that do not match its own autoencoder.

The ``save_tiny_*`` helpers build tiny encoders from configs and save them the way the
hub ships them; the demo and the tests load them back through the same loaders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def config_dict(module: Any) -> dict:
    """The model config as a plain dict, without private keys (paths, library versions)."""
    cfg = module.config
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: v for k, v in sorted(data.items()) if not k.startswith("_") and k not in (
        "transformers_version", "name_or_path", "torch_dtype", "dtype")}


def fingerprint(module: Any) -> dict:
    """{'config_sha256', 'weights_sha256', 'fingerprint'} of a loaded model.

    The weights hash covers every tensor of the state dict in name order, its dtype,
    shape and bytes; the fingerprint hashes the class name and both hashes."""
    import torch

    conf = json.dumps(config_dict(module), sort_keys=True, default=str).encode()
    weights = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        weights.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        weights.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    parts = {"class": type(module).__name__, "config_sha256": hashlib.sha256(conf).hexdigest(),
             "weights_sha256": weights.hexdigest()}
    parts["fingerprint"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return parts


def smallest_uint(n_values: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds 0..n_values-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_values - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _kwargs(subfolder: str | None) -> dict:
    return {"subfolder": subfolder} if subfolder else {}


# files a loader needs, by kind: one name of each group (index files: weights in shards)
MODEL_FILES = {
    "diffusers": {"config": ("config.json",),
                  "weights": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                              "diffusion_pytorch_model.safetensors.index.json",
                              "diffusion_pytorch_model.bin.index.json")},
    "text": {"config": ("config.json",),
             "weights": ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                         "pytorch_model.bin.index.json")},
    "tokenizer": {"tokenizer": ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json",
                                "vocab.txt")},
}


def check_files(model: str, subfolder: str | None, kind: str) -> None:
    """Raise ValueError with the reason unless the files a ``kind`` loader needs (MODEL_FILES) are
    there: in a local folder, in the Hugging Face cache when HF_HUB_OFFLINE is set, else in the
    hub repo's file list. Cheap (no weights read or downloaded): the driver's preflight."""
    groups = MODEL_FILES[kind]
    where = f"{model}/{subfolder}" if subfolder else model
    local = Path(model).expanduser()
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        names = {p.name for p in folder.iterdir()} if folder.is_dir() else None
        if names is None:
            raise ValueError(f"no folder {folder}")
    elif model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ValueError(f"no such folder {model}")  # not a hub id (namespace/name) either
    else:
        from huggingface_hub import constants, list_repo_files, try_to_load_from_cache

        prefix = f"{subfolder}/" if subfolder else ""
        if constants.HF_HUB_OFFLINE:
            names = {n for group in groups.values() for n in group
                     if isinstance(try_to_load_from_cache(model, prefix + n), str)}
            if not names:
                raise ValueError(f"no folder {model} here, and not in the local Hugging Face cache while "
                                 "HF_HUB_OFFLINE is set (download it where there is a network, or point the "
                                 "key at a local folder)")
        else:
            try:
                files = list_repo_files(model)
            except Exception as e:  # noqa: BLE001 - not found, gated, no network: the reason is the message
                raise ValueError(f"not found on the Hugging Face hub ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
            names = {f[len(prefix):] for f in files if f.startswith(prefix)}
    for group, wanted in groups.items():
        if not names & set(wanted):
            raise ValueError(f"no {group} file ({' or '.join(wanted[:2])}) in {where}")


def autoencoder_info(kind: str, model: str, subfolder: str | None = None) -> dict:
    """What the planner needs from an encoder's config alone (no weights loaded):
    channels and downsampling factor (kl), codebook size and factor (vq)."""
    from diffusers import AutoencoderKL, VQModel

    cls = AutoencoderKL if kind == "kl" else VQModel
    cfg = cls.load_config(model, **_kwargs(subfolder))
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    if kind == "kl":
        return {"channels": cfg["latent_channels"], "factor": factor}
    return {"codebook_size": cfg["num_vq_embeddings"], "factor": factor}


def text_encoder_info(model: str, subfolder: str | None = None) -> dict:
    from transformers import AutoConfig

    return {"dim": text_dim(AutoConfig.from_pretrained(model, **_kwargs(subfolder)))}


def text_dim(config) -> int:
    """Hidden size of a text encoder's config (CLIP text, T5's d_model, a composite's text part)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "d_model", "dim", "n_embd"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    raise ValueError(f"cannot tell the hidden size of text encoder config {type(config).__name__}")


@dataclass
class Encoders:
    """The encoders of one build, loaded on one device. ``encode_images`` turns a batch of
    prepared images (uint8, N x H x W x 3) into numpy arrays per member name,
    ``encode_texts`` a batch of captions (one embedding per kind in ``text_captions``)."""

    vae: str | None = None
    vae_subfolder: str | None = None
    vae_store: str = "mean_std"
    vq: str | None = None
    vq_subfolder: str | None = None
    text: str | None = None
    text_subfolder: str | None = None
    tokenizer_subfolder: str | None = None
    text_max_length: int = 77
    text_captions: tuple[str, ...] = ("descriptive", "alt_text")
    text_hidden_layer: int = -1
    text_pooled: bool = True
    latent_dtype: str = "float16"
    device: str = "auto"
    precision: str = "auto"
    models: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def setup(self) -> None:
        import torch
        from diffusers import AutoencoderKL, VQModel

        from filters.clip import pick_device

        self.device = pick_device(self.device)
        if self.precision == "auto":
            self.precision = "bf16" if self.device.startswith("cuda") else "fp32"
        self.autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                                       enabled=self.precision == "bf16")
        if self.vae:
            m = AutoencoderKL.from_pretrained(self.vae, **_kwargs(self.vae_subfolder)).eval()
            cfg = m.config
            self.info["kl"] = {"model": self.vae, "subfolder": self.vae_subfolder, **fingerprint(m),
                               "precision": self.precision,
                               "scaling_factor": cfg.scaling_factor,
                               "shift_factor": getattr(cfg, "shift_factor", None),
                               "channels": cfg.latent_channels, "factor": 2 ** (len(cfg.block_out_channels) - 1),
                               "store": self.vae_store, "dtype": self.latent_dtype}
            self.models["kl"] = m.to(self.device)
        if self.vq:
            m = VQModel.from_pretrained(self.vq, **_kwargs(self.vq_subfolder)).eval()
            n = m.config.num_vq_embeddings
            self.info["vq"] = {"model": self.vq, "subfolder": self.vq_subfolder, **fingerprint(m),
                               "precision": self.precision,
                               "codebook_size": n, "factor": 2 ** (len(m.config.block_out_channels) - 1),
                               "dtype": smallest_uint(n).name}
            self.models["vq"] = m.to(self.device)
        if self.text:
            tok, m = load_text_encoder(self.text, self.text_subfolder, self.tokenizer_subfolder)
            vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
            self.info["text"] = {"model": self.text, "subfolder": self.text_subfolder, **fingerprint(m),
                                 "tokenizer_sha256": hashlib.sha256(vocab).hexdigest(), "precision": self.precision,
                                 "max_length": self.text_max_length, "dim": text_dim(m.config),
                                 "dtype": self.latent_dtype, "captions": list(self.text_captions),
                                 "hidden_layer": self.text_hidden_layer, "pooled": self.text_pooled}
            self.tokenizer, self.models["text"] = tok, m.to(self.device)
            self.info["text"].update(self._probe_text())

    def _pixels(self, images: np.ndarray):
        import torch

        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1], as the SD autoencoders expect

    def encode_images(self, images: np.ndarray, suffix: str = "", generator=None) -> dict[str, np.ndarray]:
        """{member: (N, ...) array} for a batch of same-sized uint8 images (N, H, W, 3)."""
        import torch

        out: dict[str, np.ndarray] = {}
        if not self.models.keys() & {"kl", "vq"}:
            return out
        x = self._pixels(images)
        dtype = np.dtype(self.latent_dtype)
        with torch.no_grad(), self.autocast:
            if "kl" in self.models:
                dist = self.models["kl"].encode(x).latent_dist
                mean, std = dist.mean.float(), dist.std.float()
                if self.vae_store == "mean_std":
                    out[f"latent_mean{suffix}.npy"] = mean.cpu().numpy().astype(dtype)
                    out[f"latent_std{suffix}.npy"] = std.cpu().numpy().astype(dtype)
                elif self.vae_store == "mean":
                    out[f"latent{suffix}.npy"] = mean.cpu().numpy().astype(dtype)
                else:
                    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
                    out[f"latent{suffix}.npy"] = (mean + std * noise).cpu().numpy().astype(dtype)
            if "vq" in self.models:
                vq = self.models["vq"]
                h = vq.encode(x).latents
                _, _, (_, _, idx) = vq.quantize(h.float())
                idx = idx.reshape(h.shape[0], h.shape[2], h.shape[3])
                out[f"tokens{suffix}.npy"] = idx.cpu().numpy().astype(np.dtype(self.info["vq"]["dtype"]))
        return out

    def _run_text(self, texts: list[str], all_states: bool):
        """(model output, attention mask (N, L)) for captions padded to ``text_max_length``."""
        import torch

        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_max_length,
                               return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        with torch.no_grad(), self.autocast:
            return self.models["text"](input_ids=ids, attention_mask=mask, output_hidden_states=all_states), mask

    def _probe_text(self) -> dict:
        """Check ``text_hidden_layer`` against the model and tell its pooling: 'pooler_output' when
        the model pools (CLIP: the end-of-text state), 'mean' when it does not (T5) or when its
        pooler is BERT's, a next-sentence head on [CLS] rather than a sentence embedding."""
        out, mask = self._run_text([""], all_states=True)
        n = len(out.hidden_states)
        if not -n <= self.text_hidden_layer < n:
            raise ValueError(f"build.text.hidden_layer={self.text_hidden_layer}, but {self.text} has {n} hidden "
                             f"states (the embeddings and {n - 1} layers)")
        bert_pooler = getattr(self.models["text"], "pooler", None) is not None
        pooling = "pooler_output" if getattr(out, "pooler_output", None) is not None and not bert_pooler else "mean"
        return {"pooling": pooling, "pooled_dim": self._pool(out, mask, pooling).shape[-1]}

    @staticmethod
    def _pool(out, mask, pooling: str):
        """(N, D) pooled vectors: the model's own, or the attention-mask-weighted mean of the last states."""
        if pooling == "pooler_output":
            return out.pooler_output.float()
        weights = mask.unsqueeze(-1).float()  # (N, L, 1)
        return (out.last_hidden_state.float() * weights).sum(1) / weights.sum(1).clamp(min=1)

    def encode_texts(self, captions: list[dict[str, str]]) -> dict[str, np.ndarray]:
        """{member: (N, ...) array} for N samples' captions by kind: per kind K in ``text_captions``,
        ``text_emb_K`` (N, L, D) hidden states, ``text_mask_K`` (N, L) and ``text_pooled_K`` (N, D)."""
        if "text" not in self.models:
            return {}
        dtype, out = np.dtype(self.latent_dtype), {}
        for kind in self.text_captions:
            result, mask = self._run_text([c[kind] for c in captions], all_states=self.text_hidden_layer != -1)
            layer = self.text_hidden_layer
            hidden = result.last_hidden_state if layer == -1 else result.hidden_states[layer]  # (N, L, D)
            out[f"text_emb_{kind}.npy"] = hidden.float().cpu().numpy().astype(dtype)
            out[f"text_mask_{kind}.npy"] = mask.cpu().numpy().astype(np.uint8)
            if self.text_pooled:
                pooled = self._pool(result, mask, self.info["text"]["pooling"])
                out[f"text_pooled_{kind}.npy"] = pooled.cpu().numpy().astype(dtype)
        return out


def load_text_encoder(model: str, subfolder: str | None = None, tokenizer_subfolder: str | None = None):
    """(tokenizer, encoder) for a CLIP text model, a T5 encoder or another text-only encoder
    (BERT-like, a decoder's hidden states) that transformers' AutoModel loads."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

    cfg = AutoConfig.from_pretrained(model, **_kwargs(subfolder))
    if cfg.model_type in ("t5", "mt5", "umt5"):
        cls = T5EncoderModel
    elif cfg.model_type in ("clip", "clip_text_model"):
        cls = CLIPTextModel
    else:
        cls = AutoModel
    encoder = cls.from_pretrained(model, **_kwargs(subfolder)).eval()
    if hasattr(encoder, "get_encoder") and getattr(encoder.config, "is_encoder_decoder", False):
        encoder = encoder.get_encoder()
    tokenizer = AutoTokenizer.from_pretrained(model, **_kwargs(tokenizer_subfolder or subfolder))
    return tokenizer, encoder


def save_tiny_kl(folder: str | Path, seed: int = 0) -> str:
    """A tiny AutoencoderKL (3 levels: 4x downsampling, 4 latent channels) saved like a hub repo."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
                          down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                          layers_per_block=1, norm_num_groups=16, sample_size=64, scaling_factor=0.5,
                          shift_factor=0.1)
    model.save_pretrained(folder)
    return str(Path(folder).resolve())


def save_tiny_vq(folder: str | Path, seed: int = 0, codebook_size: int = 256) -> str:
    """A tiny VQModel (4x downsampling, ``codebook_size`` codes) saved like a hub repo."""
    import torch
    from diffusers import VQModel

    torch.manual_seed(seed)
    model = VQModel(in_channels=3, out_channels=3, latent_channels=4, vq_embed_dim=4,
                    num_vq_embeddings=codebook_size, block_out_channels=(32, 32, 64),
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    layers_per_block=1, norm_num_groups=16, sample_size=64)
    model.save_pretrained(folder)
    return str(Path(folder).resolve())


def save_tiny_clip_text_encoder(folder: str | Path, seed: int = 0) -> str:
    """A tiny CLIP text model (2 layers, width 32) with the synthetic world's word-level tokenizer,
    whose [SEP] closes every caption as CLIP's end-of-text token does."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from recaption.tiny import world_tokenizer

    tokenizer = world_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, projection_dim=32,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"])
    CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(Path(folder).resolve())


def save_tiny_text_encoder(folder: str | Path, seed: int = 0) -> str:
    """A tiny T5 encoder with a word-level tokenizer over the synthetic world's words."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from recaption.tiny import world_tokenizer

    tokenizer = world_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(Path(folder).resolve())
