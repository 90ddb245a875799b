"""Captioner backends: a local transformers model, or an OpenAI-compatible server.

Both take a batch of RGB images and one prompt per image and return
``(text, tokens, error)`` per image (``text`` None and ``error`` set when the backend
failed for that image). ``TransformersCaptioner`` loads any image-text-to-text model the auto classes
know (BLIP, BLIP-2, Florence-2, LLaVA, Qwen2-VL, SmolVLM, PaliGemma, a
VisionEncoderDecoder...) by hub id or local path and runs batched ``generate`` (bf16 on
GPU). ``OpenAICaptioner`` posts chat completions with the image inline, as vLLM and
SGLang serve vision-language models, with bounded concurrency, timeouts and retries
with exponential backoff.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class TransformersCaptioner:
    name = "transformers"

    def __init__(self, model: str, device: str = "auto", precision: str = "auto", max_new_tokens: int = 77):
        self.model_id, self.device, self.precision = model, device, precision
        self.max_new_tokens = max_new_tokens

    def setup(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.precision == "auto":
            self.precision = "bf16" if self.device.startswith("cuda") else "fp32"
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.processor = AutoProcessor.from_pretrained(self.model_id)
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_id, dtype=dtype).to(self.device).eval()
        tok = getattr(self.processor, "tokenizer", self.processor)
        tok.padding_side = "left"  # decoder-only models continue from the right end
        self.chat = bool(getattr(self.processor, "chat_template", None))

    def inputs(self, images, prompts: list[str], prefixes: list[str]):
        """Processor inputs: a chat turn per image for chat models, else a text prefix (BLIP)."""
        if self.chat:
            texts = [self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                add_generation_prompt=True) for p in prompts]
            return self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        if any(prefixes):
            return self.processor(images=images, text=prefixes, return_tensors="pt", padding=True)
        return self.processor(images=images, return_tensors="pt")

    def generate(self, images, prompts: list[str], prefixes: list[str], sampling: dict) -> list[tuple]:
        import torch

        batch = self.inputs(images, prompts, prefixes).to(self.device)
        if "pixel_values" in batch and self.precision == "bf16":
            batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        params = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **sampling}
        with torch.no_grad():
            out = self.model.generate(**batch, **params)
        prompt_len = batch["input_ids"].shape[1] if ("input_ids" in batch and self.chat) else 0
        tok = getattr(self.processor, "tokenizer", self.processor)
        texts = tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        results = []
        for text, prefix in zip(texts, prefixes):
            if not self.chat and prefix and text.lower().startswith(prefix.lower()):
                text = text[len(prefix):]  # BLIP-style captioners repeat their prefix
            text = text.strip()
            results.append((text, len(tok(text, add_special_tokens=False)["input_ids"]), None))
        return results


def image_data_url(image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, quality=90)
    return f"data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}"


class OpenAIError(RuntimeError):
    pass


class OpenAICaptioner:
    """Chat completions against ``base_url`` (``.../v1``), one request per image."""

    name = "openai"
    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 max_new_tokens: int = 77):
        self.base_url, self.model_id = base_url.rstrip("/"), model
        self.api_key_env, self.concurrency, self.timeout = api_key_env, concurrency, timeout
        self.retries, self.backoff, self.max_new_tokens = retries, backoff, max_new_tokens

    def setup(self) -> None:
        # a plain opener: the download stage's hardened opener may be installed in this process
        self.opener = urllib.request.build_opener()
        self.api_key = os.environ.get(self.api_key_env or "", "")

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        err: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{self.base_url}/chat/completions", data=data, headers=headers)
            try:
                with self.opener.open(request, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                err = OpenAIError(f"HTTP {e.code}: {e.read()[:200]!r}")
                if e.code not in self.RETRY_STATUS:
                    raise err from e
            except (OSError, json.JSONDecodeError) as e:  # timeouts, resets, dropped connections
                err = OpenAIError(f"{type(e).__name__}: {e}")
        raise OpenAIError(f"gave up after {self.retries + 1} attempts: {err}")

    def _one(self, image, prompt: str, sampling: dict) -> tuple[str, int]:
        body = {"model": self.model_id, "max_tokens": self.max_new_tokens,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                    {"type": "text", "text": prompt}]}]}
        if sampling.get("do_sample"):
            body.update({k: sampling[k] for k in ("temperature", "top_p") if k in sampling})
            if "repetition_penalty" in sampling:
                body["frequency_penalty"] = min(2.0, sampling["repetition_penalty"] - 1.0)
        else:
            body["temperature"] = 0.0
        reply = self._post(body)
        text = reply["choices"][0]["message"]["content"] or ""
        return text, int(reply.get("usage", {}).get("completion_tokens", len(text.split())))

    def generate(self, images, prompts: list[str], prefixes: list[str], sampling: dict) -> list[tuple]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._one, im, p, sampling) for im, p in zip(images, prompts)]
            out = []
            for f in futures:
                try:
                    out.append((*f.result(), None))
                except OpenAIError as e:
                    out.append((None, 0, f"server: {e}"))  # the row records the failure as its reason
            return out
