"""Typed run configs: a YAML file is an instance of ``RunConfig``.

Every field has a description (it is the config reference in the README, printed by
``tapir config --help-fields``). Unknown keys and bad values fail at load time, before
any work starts, with the dotted name of the key.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Literal, Optional

import yaml
from upath import UPath
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import storage
from training.config import TrainARConfig, TrainAutoencoderConfig, TrainDiffusionConfig


class ModelLoadError(ValueError):
    """A model named in the config cannot be loaded: raised before a stage starts any work."""

    def __init__(self, key: str, model: str, reason: str):
        self.key, self.model, self.reason = key, model, reason
        super().__init__(f"cannot load {model} ({key}): {reason}")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PRESETS = {
    # name: (url column, caption column)
    "laion": ("URL", "TEXT"),
    "cc3m": ("url", "caption"),
    "datacomp": ("url", "text"),
}


class InputConfig(_Strict):
    path: str | list[str] = Field(
        description="URL list: files, folders of files or glob patterns (parquet, csv, tsv, jsonl, txt; csv, tsv, "
        "jsonl and txt also .gz, .bz2 or .zst), local or URLs (s3://...); one or a list. Read lazily.")
    name: Optional[str] = Field(None, description="The source tag of this input's rows (raw/ column `source`, "
                                "carried to the training sample's json); null: 'input'. Required, and distinct, "
                                "when `input` is a list of inputs.")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt"] = Field(
        "auto", description="Input format; 'auto' takes it from the file extension; 'txt': one URL per line.")
    preset: Optional[Literal["laion", "cc3m", "datacomp"]] = Field(
        None, description="Column names of a known dataset: laion (URL, TEXT), cc3m (url, caption; "
        "header-less tsv accepted), datacomp (uid, url, text).")
    url_col: Optional[str] = Field(None, description="URL column (overrides the preset).")
    caption_col: Optional[str] = Field("auto", description="Alt-text column: 'auto' takes the preset's (else "
                                       "'caption'); null for a URL-only list (captions stay null).")
    extra_cols: list[str] | Literal["all"] = Field(
        "all", description="Other input columns carried into raw/ metadata: 'all' or a list.")

    def columns(self) -> tuple[str, Optional[str]]:
        url, cap = PRESETS.get(self.preset or "", ("url", "caption"))
        return self.url_col or url, cap if self.caption_col == "auto" else self.caption_col


def _named_inputs(inputs: list[InputConfig]) -> list[InputConfig]:
    names = [i.name for i in inputs]
    if not inputs:
        raise ValueError("input: an empty list of inputs")
    if None in names:
        raise ValueError("input: every input of a list needs a name (its rows' source tag)")
    if len(set(names)) != len(names):
        raise ValueError(f"input: names must be distinct, got {names}")
    return inputs


class FetchConfig(_Strict):
    allow_loopback: bool = Field(
        False, description="Allow fetching from loopback addresses (tests and the demo). "
        "Private, link-local, metadata and multicast addresses stay refused.")
    max_bytes: int = Field(20_000_000, gt=0, description="Largest response body read, in bytes.")
    max_pixels: int = Field(89_478_485, gt=0, description="Largest image (width x height) decoded; "
                            "checked on the header, before decoding.")
    max_redirects: int = Field(5, ge=0, description="Redirect hops followed per URL.")
    read_deadline: float = Field(30.0, gt=0, description="Wall-clock cap on one URL, seconds: connect, TLS "
                                 "handshake, status line, headers, body and every redirect hop together.")


class DownloadConfig(_Strict):
    image_size: int = Field(256, gt=0, description="Target side of resized images, pixels.")
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = Field(
        "keep_ratio", description="img2dataset resize mode.")
    resize_only_if_bigger: bool = Field(False, description="Only downscale, never upscale.")
    encode_format: Literal["jpg", "png", "webp"] = Field("jpg", description="Image format stored in raw/.")
    encode_quality: int = Field(95, ge=0, le=100, description="JPEG/WebP quality (PNG: compression 0-9).")
    min_image_size: int = Field(0, ge=0, description="Refuse images whose shorter side is smaller.")
    max_aspect_ratio: Optional[float] = Field(None, gt=1, description="Refuse images more elongated than this.")
    samples_per_shard: int = Field(1000, gt=0, description="Rows per shard (the unit of work and resume).")
    threads: int = Field(32, gt=0, description="Download threads per shard task.")
    timeout: float = Field(10.0, gt=0, description="Socket timeout per connect/read, seconds.")
    retries: int = Field(0, ge=0, description="Immediate per-URL retries inside a shard (img2dataset's).")
    retry_passes: int = Field(2, ge=0, description="Later passes that retry rows failed with a "
                              "retryable error (timeout, connection reset, 429, 5xx).")
    retry_wait: float = Field(2.0, ge=0, description="Seconds to wait before retry pass N (times N).")
    shard_timeout: float = Field(3600.0, gt=0, description="Wall-clock limit on one shard task, seconds: "
                                 "a task still running then is cancelled and its shard recorded as failed "
                                 "(raw/NNNNN_failed.json); a rerun retries it.")
    compute_hash: Optional[Literal["md5", "sha256", "sha512"]] = Field(
        "sha256", description="Hash of the downloaded bytes stored per row.")
    user_agent_token: Optional[str] = Field("tapir", description="Token added to the User-Agent; "
                                            "also matched in X-Robots-Tag directives.")
    disallowed_header_directives: list[str] = Field(
        ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out.")
    fetch: FetchConfig = Field(default_factory=FetchConfig, description="Hardened fetch settings.")
    shard_digits: int = Field(5, ge=1, le=12, description="Digits of raw/ shard names and key prefixes "
                              "(img2dataset's default 5; DataComp's shards have 8).")
    blur_bbox_col: Optional[str] = Field(None, description="Input column of face boxes to blur before the image is "
                                         "stored ([x0, y0, x1, y1] relative; DataComp: face_bboxes); null: none. "
                                         "Inputs without the column are not blurred.")
    verify_hash: bool = Field(True, description="When the input has a column named as compute_hash (DataComp's "
                              "sha256; kept as input_sha256), a row whose downloaded bytes differ fails with "
                              "error_reason hash_mismatch.")
    limit: Optional[int] = Field(None, gt=0, description="Plan at most this many input rows in raw/ (a trial run, "
                                 "`--limit`); a later run with a larger or no limit continues after them.")
    max_shards: Optional[int] = Field(None, gt=0, description="Plan at most this many shards in raw/ "
                                      "(`--max-shards`); a later run continues after them.")
    extend: bool = Field(False, description="Download only rows added to the inputs since the last run (new files, "
                         "rows appended to a file) as new shards after the existing ones (`--extend`); without it "
                         "a changed input is refused unless --redo.")


class ClipConfig(_Strict):
    model: str = Field("ViT-B-32", description="open_clip model name, or 'local-dir:/path' / 'hf-hub:org/repo'.")
    pretrained: Optional[str] = Field(
        "laion2b_s34b_b79k", description="open_clip pretrained tag or a local checkpoint path; "
        "null for none (random weights, or the weights of a local-dir:/hf-hub: model).")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1'...")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="'auto': bf16 on GPU, fp32 on CPU.")


class AestheticConfig(_Strict):
    weights: Optional[str] = Field(
        None, description="Aesthetic head over the stored CLIP image embeddings, a path or URL (.safetensors, or "
        ".pth read without pickle): LAION's improved aesthetic predictor MLP or its linear head, told apart by "
        "the weights' keys; adds aesthetic_score. null: off.")


class DedupConfig(_Strict):
    exact: bool = Field(True, description="Group identical downloads (same sha256).")
    near: bool = Field(True, description="Group near-duplicates by perceptual hash (needs the phash scorer).")
    near_max_distance: int = Field(4, ge=0, le=16, description="Largest phash Hamming distance, bits (4: "
                                   "recompressed and mirrored copies; about 8 also finds crops of 2-3%).")
    semantic: bool = Field(True, description="SemDeDup on CLIP image embeddings (needs the clip scorer).")
    semantic_threshold: float = Field(0.95, gt=0, le=1, description="Cosine above which two images are duplicates.")
    cluster_size: int = Field(2000, gt=1, description="Average k-means cluster size for semantic dedup: "
                              "k = ceil(embedded rows / cluster_size) clusters, pairwise cosine within each.")
    kmeans_points_per_centroid: int = Field(64, gt=0, description="k-means is fitted on a sample of this many "
                                            "embeddings per centroid (so it grows with the data), drawn per shard.")
    kmeans_max_sample: int = Field(4_000_000, gt=1, description="Cap on the k-means sample (it is held by one "
                                   "task): past it, fewer centroids are fitted and clusters grow beyond cluster_size.")
    kmeans_iterations: int = Field(20, gt=0, description="k-means iterations (faiss, on a GPU when faiss sees one).")
    partition_rows: int = Field(500_000, gt=0, description="Hash records per partition of the distributed "
                                "group-by (one task each): bounds a task's memory; changes speed, not results.")


SCORERS = ("basic", "language", "phash", "clip", "nsfw", "ocr")


class ScoreConfig(_Strict):
    input: Optional[str] = Field(None, description="Folder of img2dataset webdataset shards; null: RUN/raw.")
    scorers: list[Literal["basic", "language", "phash", "clip", "nsfw", "ocr"]] = Field(
        list(SCORERS), description="Scorers to run: basic, language, phash, clip, nsfw, ocr.")
    batch_size: int = Field(64, gt=0, description="Images per scorer batch.")
    actors: Optional[int] = Field(None, gt=0, description="Model actors; older name of resources.score.actors "
                                  "(wins over it when set).")
    clip: ClipConfig = Field(default_factory=ClipConfig, description="The CLIP model.")
    ocr_max_side: int = Field(512, gt=0, description="Images are shrunk to this longer side before OCR.")
    ocr_min_confidence: float = Field(0.8, ge=0, le=1, description="OCR boxes count toward text_area and "
                                      "text_boxes only when their recognised text scores at least this "
                                      "(0: every detected box, as detection alone).")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Duplicate groups over the whole dataset.")
    aesthetic: AestheticConfig = Field(default_factory=AestheticConfig, description="The aesthetic score (needs "
                                       "the clip scorer).")

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.scorers)) != len(self.scorers):
            raise ValueError("score.scorers lists a scorer twice")
        if self.dedup.near and "phash" not in self.scorers:
            raise ValueError("score.dedup.near needs the phash scorer in score.scorers")
        if self.dedup.semantic and "clip" not in self.scorers:
            raise ValueError("score.dedup.semantic needs the clip scorer in score.scorers")
        if self.aesthetic.weights and "clip" not in self.scorers:
            raise ValueError("score.aesthetic.weights needs the clip scorer in score.scorers (it reads its embeddings)")
        return self

    @property
    def outputs(self) -> list[str]:
        """The score column groups this config writes (keys of ``pipeline.schemas.SCORER_SCHEMAS``):
        the scorers, then ``aesthetic`` when its weights are set."""
        return list(self.scorers) + (["aesthetic"] if self.aesthetic.weights else [])


class SelectConfig(_Strict):
    rules: list[str] = Field(
        ["not duplicate"], description="Rules applied in order, e.g. 'clip_score >= 0.28', "
        "'top 30% by clip_score', 'language in [en]', 'not duplicate'; a rule may name a score or any column "
        "of the input's metadata in raw/ (LAION's punsafe, pwatermark, similarity).")


class PromptsConfig(_Strict):
    descriptive: str = Field("descriptive-v1", description="Template for descriptive captions "
                             "(a name in configs/prompts/ or a path).")
    short: str = Field("short-v1", description="Template for short captions.")


class RecaptionConfig(_Strict):
    backend: Literal["transformers", "openai"] = Field(
        "transformers", description="'transformers': a local model on actors; 'openai': an "
        "OpenAI-compatible server (vLLM, SGLang).")
    model: str = Field("Qwen/Qwen2-VL-2B-Instruct", description="Hugging Face id or local path "
                       "(transformers), or the served model name (openai). A chat VLM (a chat template: "
                       "Qwen2-VL, SmolVLM, LLaVA...) reads the prompt and the alt-text hint; a prefix-only "
                       "captioner (BLIP) gets the templates' prefix only, and refuses alt_text_hint: true.")
    base_url: Optional[str] = Field(None, description="Server URL ending in /v1 (openai backend).")
    api_key_env: Optional[str] = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Prompt templates.")
    alt_text_hint: bool = Field(True, description="Offer the original alt-text to the model as a hint.")
    batch_size: int = Field(16, gt=0, description="Images per generate call.")
    max_new_tokens: int = Field(120, gt=0, description="Generation length cap, tokens.")
    token_budget_descriptive: int = Field(256, gt=0, description="Descriptive captions are cut at a sentence "
                                          "boundary to this many tokens (T5 reads 256+).")
    token_budget_short: int = Field(77, gt=0, description="Short captions are cut to this many tokens (CLIP: 77).")
    token_counter: Literal["clip", "words"] = Field("clip", description="How tokens are counted for the budgets.")
    min_words: int = Field(3, ge=1, description="Shorter outputs count as degenerate.")
    retry_sampling: list[dict] = Field(
        [{"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.3},
         {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "repetition_penalty": 1.5}],
        description="Sampling settings tried in turn after a degenerate greedy output.")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda'.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="'auto': bf16 on GPU, fp32 on CPU.")
    actors: Optional[int] = Field(None, gt=0, description="Captioning actors (null: one per GPU, else per CPU).")
    concurrency: int = Field(8, gt=0, description="Requests in flight per actor (openai backend).")
    timeout: float = Field(60.0, gt=0, description="Seconds per request (openai backend).")
    http_retries: int = Field(3, ge=0, description="Retries of a failed request, with backoff (openai).")
    backoff: float = Field(1.0, ge=0, description="First backoff in seconds, doubled per retry (openai).")

    @model_validator(mode="after")
    def _check(self):
        if self.backend == "openai" and not self.base_url:
            raise ValueError("recaption.base_url is required with the openai backend")
        return self


class AutoencoderConfig(_Strict):
    model: Optional[str] = Field(None, description="KL autoencoder (diffusers AutoencoderKL): Hugging Face id or "
                                 "local folder, e.g. stabilityai/sd-vae-ft-mse; null: no latents.")
    subfolder: Optional[str] = Field(None, description="Subfolder inside the repo, e.g. 'vae' for a pipeline repo.")
    store: Literal["mean_std", "mean", "sample"] = Field(
        "mean_std", description="'mean_std': the latent distribution's mean and std (sample at train time); "
        "'mean': its mean; 'sample': one sample. Stored unscaled; the manifest gives scaling and shift.")


class VQConfig(_Strict):
    model: Optional[str] = Field(None, description="VQ tokenizer (diffusers VQModel): Hugging Face id or local "
                                 "folder; null: no tokens. Indices are stored in the smallest integer type.")
    subfolder: Optional[str] = Field(None, description="Subfolder inside the repo, e.g. 'vqvae'.")


class TextEncoderConfig(_Strict):
    model: Optional[str] = Field(None, description="Text encoder for pre-computed embeddings (CLIP text, T5, ...): "
                                 "Hugging Face id or local folder; null: none.")
    subfolder: Optional[str] = Field(None, description="Model subfolder, e.g. 'text_encoder'.")
    tokenizer_subfolder: Optional[str] = Field(None, description="Tokenizer subfolder, e.g. 'tokenizer' "
                                               "(null: the model's).")
    captions: list[Literal["descriptive", "short", "alt_text"]] = Field(
        default_factory=lambda: ["descriptive", "alt_text"], min_length=1,
        description="Caption kinds embedded, each on its own (members text_emb_K.npy, text_mask_K.npy, "
        "text_pooled_K.npy); a sample's empty caption is embedded as '' and marked false in its json 'text_emb'.")
    max_length: int = Field(77, gt=0, description="Tokens per caption (padded); the mask is stored beside.")
    hidden_layer: int = Field(-1, description="Hidden state stored: -1 the last (last_hidden_state), -2 the "
                              "penultimate (what SD2 and SDXL take from CLIP), ...")
    pooled: bool = Field(True, description="Also store one vector per caption: the model's pooled output "
                         "(CLIP's end-of-text state), else the mask-weighted mean of the last hidden state.")

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.captions)) != len(self.captions):
            raise ValueError(f"build.text.captions lists a kind twice: {self.captions}")
        return self


class BuildConfig(_Strict):
    resolution: int = Field(256, gt=0, description="Training resolution: the square side (crop 'center') or "
                            "the bucket area's side (crop 'buckets').")
    crop: Literal["center", "buckets"] = Field(
        "center", description="'center': resize the short side and centre crop to a square; 'buckets': "
        "aspect-ratio buckets of about resolution^2 pixels (SDXL, PixArt), the bucket recorded per sample.")
    buckets: Optional[list[tuple[int, int]]] = Field(
        None, description="Bucket sizes as [width, height] pairs; null: generated from resolution, "
        "bucket_step and max_aspect.")
    bucket_step: int = Field(64, gt=0, description="Bucket sides are multiples of this.")
    max_aspect: float = Field(2.0, ge=1, description="Most elongated generated bucket (long / short side).")
    flip: bool = Field(False, description="Also encode the horizontally flipped image (members *_flip.npy).")
    keep_image: bool = Field(True, description="Store the prepared image in each sample.")
    image_format: Literal["jpg", "png", "webp"] = Field("jpg", description="Format of the stored image.")
    image_quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality of the stored image.")
    txt_caption: Literal["short", "descriptive", "alt_text"] = Field(
        "short", description="Caption written as the sample's 'txt' member (what open_clip_train reads); "
        "falls back to the other kinds when missing.")
    samples_per_shard: int = Field(1000, gt=0, description="Most samples per output tar.")
    max_shard_bytes: int = Field(1_000_000_000, gt=0, description="Target largest tar size, bytes (planned "
                                 "from the raw image sizes and the exact latent sizes).")
    batch_size: int = Field(32, gt=0, description="Images per encoder batch.")
    decode_threads: int = Field(2, gt=0, description="Threads per actor decoding and cropping the next batch while "
                                "one encodes. On a GPU, keep it small: decode threads compete with the encoder's "
                                "kernel-launching thread for the GIL.")
    latent_dtype: Literal["float16", "float32"] = Field("float16", description="Stored latents and embeddings.")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda'.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Encoder compute: 'auto' is bf16 on "
                                                       "GPU, fp32 on CPU.")
    actors: Optional[int] = Field(None, gt=0, description="Encoder actors (null: one per GPU, else one per CPU).")
    output: Optional[str] = Field(None, description="Shards folder; null: RUN/shards.")
    vae: AutoencoderConfig = Field(default_factory=AutoencoderConfig, description="KL autoencoder latents.")
    vq: VQConfig = Field(default_factory=VQConfig, description="VQ token indices.")
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig, description="Text embeddings.")

    @model_validator(mode="after")
    def _check(self):
        if not (self.keep_image or self.vae.model or self.vq.model):
            raise ValueError("build stores neither images nor latents nor tokens: set build.keep_image, "
                             "build.vae.model or build.vq.model")
        if self.flip and not (self.vae.model or self.vq.model):
            raise ValueError("build.flip needs an encoder (build.vae.model or build.vq.model)")
        if self.crop == "buckets" and not self.buckets and self.bucket_step > self.resolution:
            raise ValueError("build.bucket_step must not exceed build.resolution")
        for w, h in self.buckets or []:
            if w <= 0 or h <= 0:
                raise ValueError(f"build.buckets: bad bucket {w}x{h}")
        return self


class ActorResources(_Strict):
    actors: Optional[int] = Field(None, gt=0, description="Actors in the stage's pool (null: as many as the "
                                  "cluster's GPUs (or CPUs, without GPUs) hold at the sizes below).")
    gpus_per_actor: Optional[float] = Field(None, ge=0, description="GPUs per actor, fractions share a GPU "
                                            "(null: 1 when the cluster has GPUs, else 0; HTTP-only actors: 0).")
    cpus_per_actor: float = Field(1, gt=0, description="CPUs reserved per actor.")
    max_retries: int = Field(2, ge=0, description="Times a shard is retried on a new actor after its actor "
                             "died (process or node lost); then it is recorded as failed with the reason.")


class TaskResources(_Strict):
    tasks: Optional[int] = Field(None, gt=0, description="Shard tasks in flight (null: one per CPU of the cluster).")
    cpus_per_task: float = Field(1, gt=0, description="CPUs reserved per shard task.")
    max_retries: int = Field(2, ge=0, description="Times a shard task lost with its worker or node is resubmitted; "
                             "then it is recorded as failed with the reason.")


_LEGACY_RESOURCES = {  # older global key: (stages whose unset key it fills, that key)
    "download_tasks": (("download",), "tasks"),
    "gpus_per_actor": (("score", "recaption", "build"), "gpus_per_actor"),
    "cpus_per_actor": (("score", "recaption", "build"), "cpus_per_actor"),
}


class ResourcesConfig(_Strict):
    ray_address: Optional[str] = Field(None, description="Existing Ray cluster ('auto', 'HOST:PORT'); "
                                       "null starts Ray in-process on this machine.")
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs for the embedded local Ray (null: all).")
    download: TaskResources = Field(default_factory=TaskResources, description="Download shard tasks.")
    score: ActorResources = Field(default_factory=ActorResources, description="Score model actors (CPU-only "
                                  "scorers run as tasks of cpus_per_actor CPUs).")
    recaption: ActorResources = Field(default_factory=ActorResources, description="Captioner actors (the "
                                      "openai backend's actors reserve no GPU).")
    build: ActorResources = Field(default_factory=ActorResources, description="Encoder actors.")
    download_tasks: Optional[int] = Field(None, gt=0, description="Older name of resources.download.tasks.")
    gpus_per_actor: Optional[float] = Field(None, ge=0, description="Default gpus_per_actor of every actor stage "
                                            "(older configs; resources.STAGE.gpus_per_actor wins).")
    cpus_per_actor: float = Field(1, gt=0, description="Default cpus_per_actor of every actor stage "
                                  "(older configs; resources.STAGE.cpus_per_actor wins).")

    @model_validator(mode="before")
    @classmethod
    def _legacy_defaults(cls, data):
        """The older global keys fill the per-stage sections' unset keys."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, (stages, key) in _LEGACY_RESOURCES.items():
            if data.get(old) is None:
                continue
            for stage in stages:
                section = data.get(stage)
                section = dict(section) if isinstance(section, dict) else \
                    (section.model_dump(exclude_unset=True) if isinstance(section, BaseModel) else {})
                section.setdefault(key, data[old])
                data[stage] = section
        return data


class RunConfig(_Strict):
    output: str = Field(description="Run folder; each stage writes a subfolder (raw/, ...).")
    input: Optional[InputConfig | typing.Annotated[list[InputConfig], AfterValidator(_named_inputs)]] = Field(
        None, description="The URL list and its columns (required by download); a list of such sections, each "
        "with a name, mixes several inputs in one run.")
    download: DownloadConfig = Field(default_factory=DownloadConfig, description="The download stage.")
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="The score stage.")
    select: SelectConfig = Field(default_factory=SelectConfig, description="The select stage.")
    recaption: RecaptionConfig = Field(default_factory=RecaptionConfig, description="The recaption stage.")
    build: BuildConfig = Field(default_factory=BuildConfig, description="The build stage (training shards).")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray and concurrency.")
    train_diffusion: TrainDiffusionConfig = Field(default_factory=TrainDiffusionConfig,
                                                  description="The latent diffusion trainer.")
    train_ar: TrainARConfig = Field(default_factory=TrainARConfig, description="The autoregressive trainer.")
    train_autoencoder: TrainAutoencoderConfig = Field(default_factory=TrainAutoencoderConfig,
                                                      description="The autoencoder (VQ or KL) trainer.")
    redo: bool = Field(False, description="Redo the shards whose settings or inputs changed since they were "
                       "made, instead of refusing (`--redo`); never part of a stage's fingerprint.")

    @model_validator(mode="after")
    def _check(self):
        if self.download.encode_format == "png" and self.download.encode_quality > 9:
            raise ValueError("download.encode_quality must be 0-9 (compression) when encode_format is png")
        return self

    @property
    def raw_dir(self) -> UPath:
        return storage.path(self.output) / "raw"

    @property
    def score_input(self) -> UPath:
        return storage.path(self.score.input) if self.score.input else self.raw_dir

    @property
    def scores_dir(self) -> UPath:
        return storage.path(self.output) / "scores"

    @property
    def selection_dir(self) -> UPath:
        return storage.path(self.output) / "selection"

    @property
    def captions_dir(self) -> UPath:
        return storage.path(self.output) / "captions"

    @property
    def shards_dir(self) -> UPath:
        return storage.path(self.build.output) if self.build.output else storage.path(self.output) / "shards"

    @property
    def train_shards(self) -> UPath:
        return storage.path(self.train_diffusion.data.shards) if self.train_diffusion.data.shards else self.shards_dir

    @property
    def diffusion_dir(self) -> UPath:
        return storage.path(self.train_diffusion.output or storage.path(self.output) / "runs" / "diffusion")

    @property
    def ar_dir(self) -> UPath:
        return storage.path(self.train_ar.output or storage.path(self.output) / "runs" / "ar")

    @property
    def ar_shards(self) -> UPath:
        return storage.path(self.train_ar.data.shards) if self.train_ar.data.shards else self.shards_dir

    @property
    def autoencoder_dir(self) -> UPath:
        return storage.path(self.train_autoencoder.output or storage.path(self.output) / "runs" / "autoencoder")

    @property
    def autoencoder_shards(self) -> UPath:
        """The image shards the autoencoder trains on: data.shards, RUN/shards, or (source 'raw')
        the image-only shards built from raw/ into the run folder."""
        d = self.train_autoencoder.data
        if d.source == "raw":
            return self.autoencoder_dir / "images"
        return storage.path(d.shards) if d.shards else self.shards_dir


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _set_dotted(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings; values parse as YAML (numbers, bools, lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw else "")
    return data


def load_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None,
                values: dict | None = None) -> RunConfig:
    """Load a YAML config (or a dict), apply overrides, validate; raise ConfigError naming the key.

    ``values`` ({dotted key: value}) are set as they are, after the file and before
    ``overrides`` (``section.key=value`` strings whose values parse as YAML): command-line
    flags such as ``--output "/data/my runs #1"`` stay literal strings."""
    data = dict(base or {})
    source = "(flags)"
    if path is not None:
        source = str(path)
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: top level must be a mapping")
        data.update(loaded)
    for key, value in (values or {}).items():
        _set_dotted(data, key, value)
    apply_overrides(data, list(overrides))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def reference(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field: the config reference."""
    rows = []
    for name, f in model.model_fields.items():
        ann = next((a for a in typing.get_args(f.annotation) if isinstance(a, type) and issubclass(a, BaseModel)),
                   f.annotation)  # Optional[Section] documents the section's keys too
        key = prefix + name
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append((key, "", f.description or ""))
            rows.extend(reference(ann, key + "."))
        else:
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            rows.append((key, default, f.description or ""))
    return rows
