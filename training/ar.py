"""`tapir train-ar`: a text-conditioned autoregressive transformer over VQ image tokens.

P(t | c) = prod_i P(t_i | t_<i, c): the caption's frozen text-encoder states, projected in, are
the prefix; the image's VQ indices follow in raster order (``training.ar_model``, LlamaGen's
recipe on transformers' Llama). Per optimizer step, on every rank: a batch of token grids and
captions from the shards (``training.data``, payload 'vq'), captions embedded or read
pre-computed (``training.text``; caption dropout trains the unconditional stream of guidance),
next-token cross-entropy through DDP/FSDP (bf16 on GPUs), AdamW, EMA. The loop, checkpoints,
resume and metrics are the shared ``training.trainer``. Samples are drawn with the KV cache,
guidance, temperature, top-k and top-p, and decoded through the shards' VQ model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipeline.config import RunConfig
from training import distributed as D
from training.ar_model import ARTransformer, loss as next_token_loss, sample
from training.data import ShardStream
from training.loop import peak_flops
from training.sample import grid
from training.text import TextConditioner
from training.trainer import BaseTrainer, held_out_split, train, train_on_ray

log = logging.getLogger(__name__)


def token_geometry(manifest: dict, folder: Path) -> tuple[dict, tuple[int, int]]:
    """(the manifest's VQ record, the token grid (rows, columns)) of single-size shards."""
    vq = manifest["encoders"].get("vq")
    if vq is None:
        raise ValueError(f"shards in {folder} hold no VQ tokens: build them with build.vq.model set")
    sizes = manifest["image"]["buckets"]
    if len(sizes) != 1:
        raise ValueError(f"shards in {folder} hold sizes {sizes}: train-ar trains on one size (build.crop: center)")
    w, h = sizes[0]
    return vq, (h // vq["factor"], w // vq["factor"])


def load_vq(model: str, subfolder: str | None, device: str):
    from diffusers import VQModel

    kwargs = {"subfolder": subfolder} if subfolder else {}
    return VQModel.from_pretrained(model, **kwargs).to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_tokens(vq, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 images (N, 3, H, W) of token grids (N, rows*columns) through a VQModel's codebook
    and decoder."""
    h, w = grid_hw
    z = vq.quantize.get_codebook_entry(tokens.reshape(-1).to(vq.device), (len(tokens), h, w, -1))
    x = vq.decode(z.float(), force_not_quantize=True).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


class ARTrainer(BaseTrainer):
    """The state of one autoregressive run; ``fit`` trains to ``max_steps``."""

    kind = "ar"

    def __init__(self, cfg: RunConfig, resume: bool = False):
        from pipeline import manifest as shard_manifest

        super().__init__(cfg, cfg.train_ar, cfg.ar_dir)
        t = self.t
        self.shards = cfg.ar_shards
        manifest = shard_manifest.load(self.shards)
        self.vq_info, self.grid_hw = token_geometry(manifest, self.shards)
        vq_model = t.vq or self.vq_info["model"]
        vq_sub = t.vq_subfolder if t.vq else self.vq_info.get("subfolder")
        vq = load_vq(vq_model, vq_sub, "cpu")
        shard_manifest.check_encoder(self.shards, "vq", vq, vq_model)  # refuses, naming the shard
        self.vq, self.vq_source = vq.to(self.d.device), {"model": vq_model, "subfolder": vq_sub}
        evaluating = bool(t.eval.every and t.eval.clip_model)
        self.text = TextConditioner(t.text, manifest, list(t.data.caption_probs), self.d.device, t.sample.prompts,
                                    self.autocast, keep_encoder=evaluating)
        torch.manual_seed(t.seed)  # the weights depend on the seed alone, not on what loading drew before
        model = ARTransformer(t.model, vq.config.num_vq_embeddings, self.grid_hw, self.text.dim,
                              t.text.max_length).to(self.d.device)
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.tokens_per_sample = self.grid_hw[0] * self.grid_hw[1]
        self.flops = self._flops(model) if peak_flops(self.d.device) else None
        self._setup(model, blocks=model.blocks())
        self.held_out, manifest = held_out_split(manifest, self.shards, t.eval.holdout_shards, evaluating)
        self.stream = ShardStream(self.shards, manifest, t.data, t.seed, self.d.world, self.d.rank, self.text.kinds,
                                  payload="vq")
        self._start(resume)
        self.evaluator, self.eval_prompts = None, None

    def _flops(self, model) -> int:
        from training.models import count_train_flops

        b = self.t.data.batch_size
        tokens = torch.zeros(b, self.tokens_per_sample, dtype=torch.long, device=self.d.device)
        emb, mask = self.text.prompts[0][:1].expand(b, -1, -1), self.text.prompts[1][:1].expand(b, -1)
        with self.autocast:
            return count_train_flops(lambda: next_token_loss(model(tokens, emb, mask), tokens), model)

    def run_facts(self) -> dict:
        return {"model": D.unwrap(self.model).config(), "vq": self.vq_source, "grid": list(self.grid_hw),
                "text": self.text.source, "shards": str(self.shards)}

    def _micro(self, batch: dict, micro: int, last: bool) -> dict:
        d = self.d
        tokens = batch["tokens"].flatten(1).to(d.device)
        emb, mask = self.text.batch(batch, d.device)
        with D.no_sync(self.model, not last), self.autocast:
            loss = next_token_loss(self.fwd(tokens, emb, mask), tokens)
            (loss / self.t.optim.grad_accum).backward()
        return {"loss": loss.item()}

    def _perf(self, steps_per_s: float) -> dict:
        values = super()._perf(steps_per_s)
        values["perf/tokens_per_s"] = values["perf/samples_per_s"] * self.tokens_per_sample
        return values

    # -- samples, evaluation, export --------------------------------------------------------
    def _sample(self, emb, mask, seed: int) -> torch.Tensor:
        s = self.t.sample
        gen = torch.Generator(device=self.d.device).manual_seed(seed)
        fsdp = self.t.distributed == "fsdp" and self.d.world > 1
        with self.ema.swapped(), self.autocast:
            if fsdp:  # the sampler runs the decoder layers (sharded each) below the root: gather the root's own
                self.model.unshard()
            try:
                tokens = sample(self._module(), emb, mask, *self.text.null, cfg_scale=s.cfg,
                                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, generator=gen)
            finally:
                if fsdp:
                    self.model.reshard()
        return decode_tokens(self.vq, tokens, self.grid_hw)

    def sample_grid(self) -> Path | None:
        if not self._samples_here():
            return None
        images = self._sample(*self.text.prompts, self.t.sample.seed)
        return self._save_grid(grid(images)) if self.d.main else None

    def evaluate(self) -> dict:
        """CLIP score and Fréchet distance of samples of held-out captions (scored on rank 0)."""
        from training.data import read_samples
        from training.evaluate import Evaluator

        e = self.t.eval
        if e.clip_model is None or not self._samples_here():
            return {}
        if self.eval_prompts is None:
            samples = read_samples(self.shards, self.held_out, e.samples, "tokens")
            self.real = decode_tokens(self.vq, torch.stack([s["tokens"].flatten() for s in samples]), self.grid_hw)
            self.eval_prompts = [s["caption"] for s in samples]
            if self.d.main:
                self.evaluator = Evaluator(e.clip_model, e.clip_pretrained, self.d.device, e.fid)
        emb, mask = self.text.encode(self.eval_prompts)
        fake = self._sample(emb.to(self.d.device), mask.to(self.d.device), self.t.sample.seed + 1)
        if not self.d.main:
            return {}
        result = {"eval/clip_score": self.evaluator.clip_score(fake, self.eval_prompts),
                  "eval/frechet": self.evaluator.frechet(self.real, fake)}
        self._record_eval(result, features=self.evaluator.feature_name)
        return result

    def _export(self, ema_state: dict) -> dict:
        """RUN/model/: the EMA weights (safetensors), the model's arguments, and what decodes and
        conditions it; ``tapir sample`` and ``load_ar_model`` read it."""
        from safetensors.torch import save_file

        folder = self.out / "model"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in ema_state.items()}, folder / "model.safetensors")
        facts = {**self.run_facts(), "max_length": self.t.text.max_length, "hidden_layer": self.t.text.hidden_layer,
                 "sample": self.t.sample.model_dump(exclude={"prompts", "every"})}
        (folder / "tapir_ar.json").write_text(json.dumps(facts, indent=1))
        return {"model": str(folder)}


def load_ar_model(folder: Path, device: str = "cpu") -> tuple[ARTransformer, dict]:
    """The exported model of an AR run (RUN/model) and its facts."""
    from safetensors.torch import load_file

    folder = Path(folder)
    facts = json.loads((folder / "tapir_ar.json").read_text())
    model = ARTransformer(**facts["model"])
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.to(device).eval(), facts


def sample_run(run_dir: Path, prompts: list[str], *, cfg: float | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0, out: Path | None = None,
               device: str = "auto", use_cache: bool = True) -> Path:
    """Sample a grid PNG from an AR run: its exported model, else its newest checkpoint's EMA."""
    from filters.clip import pick_device
    from training import checkpoint as ckpt
    from training.text import TextEncoder

    run_dir, device = Path(run_dir), pick_device(device)
    if (run_dir / "model" / "tapir_ar.json").exists():
        model, facts = load_ar_model(run_dir / "model", device)
        source = "model"
    else:
        facts = json.loads((run_dir / "run.json").read_text())
        path = ckpt.latest(run_dir / "checkpoints")
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'} and no exported model")
        model = ARTransformer(**facts["model"])
        model.load_state_dict(ckpt.load_weights(path, "ema"))
        model, source = model.to(device).eval(), path.name
        t = RunConfig.model_validate(facts["config"]).train_ar
        facts = {**facts, "max_length": t.text.max_length, "hidden_layer": t.text.hidden_layer,
                 "sample": t.sample.model_dump()}
    s = facts["sample"]
    text = TextEncoder(facts["text"]["model"], facts["text"]["subfolder"], facts["text"]["tokenizer_subfolder"],
                       facts["max_length"], facts["hidden_layer"], device)
    emb, mask = text.encode(prompts)
    null = text.encode([""])
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = sample(model, emb, mask, *null, cfg_scale=s["cfg"] if cfg is None else cfg,
                    temperature=s["temperature"] if temperature is None else temperature,
                    top_k=s["top_k"] if top_k is None else top_k, top_p=s["top_p"] if top_p is None else top_p,
                    generator=gen, use_cache=use_cache)
    vq = load_vq(facts["vq"]["model"], facts["vq"]["subfolder"], device)
    images = decode_tokens(vq, tokens, tuple(facts["grid"]))
    out = Path(out) if out else run_dir / "samples" / f"sample-{source}-seed{seed}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(images).save(out)
    return out


def train_ar(cfg: RunConfig, resume: bool = False) -> dict:
    """Train (or resume) the AR run of ``cfg``; return the run's summary."""
    return train(ARTrainer, cfg, resume)


def ray_train_ar(cfg: RunConfig, resume: bool, workers: int, use_gpu: bool) -> dict:
    """The same loop on a Ray cluster, one TorchTrainer worker per process."""
    return train_on_ray(ARTrainer, cfg, resume, workers, use_gpu, cfg.ar_dir)
