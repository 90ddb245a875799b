"""Captioner backends: a local transformers model, or an OpenAI-compatible server.

Both take a batch of RGB images, one prompt, one prefix and one seed per image, and return
``(text, tokens, error)`` per image (``text`` None and ``error`` set when the backend
failed for that image: a failure is the row's recorded reason, never the shard's).

``TransformersCaptioner`` loads any image-text-to-text model the auto classes know by hub
id or local path and runs batched ``generate`` (bf16 on GPU). A model with a chat template
(SmolVLM, Qwen2-VL, LLaVA, ...) gets the prompt, alt-text hint included, as a user turn
beside the image; a prefix-only captioner (BLIP) gets only the template's text prefix, so
``check_loadable`` refuses settings it cannot honour (the alt-text hint).

``OpenAICaptioner`` posts chat completions with the image inline, as vLLM and SGLang serve
vision-language models. The API key only ever goes to ``base_url``: https is required
unless the host is loopback, redirects are refused, every attempt has one wall-clock
deadline (connect, TLS, headers and body), replies are capped in size and checked in
shape, and bounded retries back off exponentially.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def sampling_seed(*parts) -> int:
    """A deterministic 31-bit seed from ``parts`` (shard, key, kind, attempt): the same row
    redone samples the same way, other rows and shards differently."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "big") >> 1


def has_chat_template(processor) -> bool:
    tok = getattr(processor, "tokenizer", None)
    return bool(getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None))


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
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # decoder-only models continue from the right end
        self.chat = has_chat_template(self.processor)

    def inputs(self, images, prompts: list[str], prefixes: list[str]):
        """Processor inputs: a chat turn per image (image, then the prompt) for chat models,
        else a text prefix (BLIP)."""
        if self.chat:
            texts = [self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                add_generation_prompt=True) for p in prompts]
            return self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        if any(prefixes):
            return self.processor(images=images, text=prefixes, return_tensors="pt", padding=True)
        return self.processor(images=images, return_tensors="pt")

    def generate(self, images, prompts: list[str], prefixes: list[str], sampling: dict,
                 seeds: list[int] | None = None) -> list[tuple]:
        import torch

        batch = self.inputs(images, prompts, prefixes).to(self.device)
        if "pixel_values" in batch and self.precision == "bf16":
            batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        params = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **sampling}
        if params["do_sample"] and seeds:
            torch.manual_seed(sampling_seed(*seeds))  # one generator per batched call, from its rows' seeds
        with torch.no_grad():
            out = self.model.generate(**batch, **params)
        prompt_len = batch["input_ids"].shape[1] if ("input_ids" in batch and self.chat) else 0
        texts = self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        results = []
        for text, prefix in zip(texts, prefixes):
            if not self.chat and prefix and text.lower().startswith(prefix.lower()):
                text = text[len(prefix):]  # BLIP-style captioners repeat their prefix
            text = text.strip()
            results.append((text, len(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None))
        return results


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}"


def _weights_resolve(model: str) -> bool:
    """Whether the model's weights are there, without downloading them: a local folder's
    files, the hub cache when offline, else a metadata request to the hub."""
    from huggingface_hub import constants, file_exists, try_to_load_from_cache

    if Path(model).is_dir():
        return any((Path(model) / f).is_file() for f in WEIGHT_FILES)
    if constants.is_offline_mode():
        return any(isinstance(try_to_load_from_cache(model, f), str) for f in WEIGHT_FILES)
    return any(file_exists(model, f) for f in WEIGHT_FILES)


def refuse_unhonoured(chat: bool, r, model: str) -> None:
    """A prefix-only captioner (no chat template: BLIP, GIT) reads no prompt: it gets the
    templates' ``prefix`` only. The alt-text hint cannot reach it, so that setting is
    refused rather than silently dropped; the prompt texts being unused is logged."""
    from pipeline.config import ConfigError

    if chat:
        return
    if r.alt_text_hint:
        raise ConfigError(f"recaption.alt_text_hint: {model} has no chat template (a prefix-only captioner such as "
                          "BLIP) and cannot read the alt-text hint; set recaption.alt_text_hint: false, or use a "
                          "chat VLM (e.g. HuggingFaceTB/SmolVLM-256M-Instruct)")
    log.warning("%s has no chat template: it reads only the prompt templates' prefix, not their text "
                "(descriptive and short captions differ by prefix and token budget alone)", model)


def check_loadable(r) -> bool:
    """Preflight of ``cfg.recaption`` before any work: the captioner can be loaded (its config
    and processor load, its weights resolve; no weights are downloaded) or, with the openai
    backend, ``base_url`` is acceptable (no request is sent). Raises
    ``pipeline.config.ModelLoadError`` naming the key, the model and the reason, or
    ``ConfigError`` for a setting the model cannot honour. Returns whether the model chats."""
    from pipeline.config import ModelLoadError

    if r.backend == "openai":
        problem = base_url_problem(r.base_url or "")
        if problem:
            raise ModelLoadError("recaption.base_url", str(r.base_url), problem)
        return True
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(r.model)
        if type(config) not in AutoModelForImageTextToText._model_mapping:
            raise ModelLoadError("recaption.model", r.model, f"a {config.model_type!r} model is not an "
                                 "image-text-to-text model (AutoModelForImageTextToText cannot load it)")
        if not _weights_resolve(r.model):
            raise ModelLoadError("recaption.model", r.model, f"no weights found (looked for {', '.join(WEIGHT_FILES)})")
        processor = AutoProcessor.from_pretrained(r.model)
    except ModelLoadError:
        raise
    except Exception as e:  # OSError (not found, offline), ValueError (unknown model type), ...: one line
        from huggingface_hub import constants

        reason = _first_line(e)
        if isinstance(e, OSError) and constants.is_offline_mode() and not Path(r.model).exists():
            reason += " (HF_HUB_OFFLINE is set: only the local cache is searched)"
        raise ModelLoadError("recaption.model", r.model, reason) from e
    chat = has_chat_template(processor)
    refuse_unhonoured(chat, r, r.model)
    return chat


# -- the OpenAI-compatible client -------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback  # 127.0.0.0/8, ::1


def base_url_problem(url: str) -> str | None:
    """Why ``url`` may not carry the API key, or None: https anywhere, http only to loopback."""
    try:
        u = urlsplit(url)
        u.port  # noqa: B018 (raises on a bad port)
    except ValueError as e:
        return f"not a URL: {e}"
    if u.scheme not in ("http", "https") or not u.hostname:
        return "base_url must be an https:// URL (http:// only to a loopback host)"
    if u.username or u.password:
        return "base_url must not hold credentials (the key comes from recaption.api_key_env)"
    if u.scheme == "http" and not is_loopback_host(u.hostname):
        return (f"http:// would send the API key and images unencrypted to {u.hostname}; use https:// "
                "(http is allowed only for 127.0.0.0/8, ::1 and localhost)")
    return None


def image_data_url(image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, quality=90)
    return f"data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}"


class OpenAIError(RuntimeError):
    pass


class _Retry(OpenAIError):
    """A failure worth another attempt (transport errors, deadline, 429/5xx)."""


def parse_reply(data: bytes) -> tuple[str, int]:
    """``(text, completion tokens)`` from a chat-completion reply body; ``OpenAIError``
    naming what is wrong with any other shape (an error object, empty choices, wrong types)."""
    try:
        reply = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise OpenAIError(f"reply is not JSON ({type(e).__name__}, {len(data)} bytes)") from e
    if not isinstance(reply, dict):
        raise OpenAIError(f"reply is a JSON {type(reply).__name__}, not an object")
    if reply.get("error") is not None:
        err = reply["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        raise OpenAIError(f"server error in the reply: {str(msg)[:200]!r}")
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices:
        raise OpenAIError("reply has no choices")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise OpenAIError(f"reply's choices[0].message.content is {type(content).__name__}, not a string")
    usage = reply.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        tokens = len(content.split())
    return content, tokens


class OpenAICaptioner:
    """Chat completions against ``base_url`` (``.../v1``), one request per image."""

    name = "openai"
    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 max_new_tokens: int = 77, max_reply_bytes: int = 1 << 20):
        problem = base_url_problem(base_url)
        if problem:
            raise ValueError(f"recaption.base_url {base_url!r}: {problem}")
        self.base_url, self.model_id = base_url.rstrip("/"), model
        self.api_key_env, self.concurrency, self.timeout = api_key_env, concurrency, timeout
        self.retries, self.backoff, self.max_new_tokens = retries, backoff, max_new_tokens
        self.max_reply_bytes = max_reply_bytes
        u = urlsplit(self.base_url)
        self._https, self._host, self._port = u.scheme == "https", u.hostname, u.port
        self._path = f"{u.path}/chat/completions"

    def setup(self) -> None:
        self.api_key = os.environ.get(self.api_key_env or "", "")

    def _exchange(self, data: bytes) -> tuple[int, bytes]:
        """One POST under one wall-clock deadline: a timer shuts the socket when it passes,
        whatever phase the exchange is in (a server dribbling header bytes or sending
        ``100 Continue`` forever cannot hold it). http.client follows no redirects."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        expired = threading.Event()

        def expire():
            expired.set()
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", self._path, body=data, headers=headers)
            r = conn.getresponse()
            declared = r.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_reply_bytes:
                raise OpenAIError(f"reply of {declared} bytes is over the {self.max_reply_bytes}-byte cap")
            body = r.read(self.max_reply_bytes + 1)
            if len(body) > self.max_reply_bytes:
                raise OpenAIError(f"reply is over the {self.max_reply_bytes}-byte cap")
            if r.length:  # fewer bytes than Content-Length promised before the connection closed
                raise _Retry(f"reply truncated: {r.length} of {declared} bytes missing")
            if expired.is_set():
                raise _Retry(f"no complete reply within {self.timeout}s")
            return r.status, body
        except (OSError, http.client.HTTPException) as e:  # refused, reset, bad status line, truncated chunks
            if expired.is_set():
                raise _Retry(f"no complete reply within {self.timeout}s") from e
            raise _Retry(f"{type(e).__name__}: {str(e)[:200]}") from e
        finally:
            timer.cancel()
            conn.close()

    def _post(self, body: dict) -> tuple[str, int]:
        data = json.dumps(body).encode()
        err: OpenAIError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                status, reply = self._exchange(data)
            except _Retry as e:
                err = e
                continue
            if status == 200:
                return parse_reply(reply)
            snippet = reply[:200].decode("utf-8", "replace")
            if 300 <= status < 400:  # the key must not follow a redirect anywhere
                raise OpenAIError(f"HTTP {status}: redirect refused (base_url must be the server itself)")
            err = OpenAIError(f"HTTP {status}: {snippet!r}")
            if status not in self.RETRY_STATUS:
                raise err
        raise OpenAIError(f"gave up after {self.retries + 1} attempts: {err}")

    def _one(self, image, prompt: str, sampling: dict, seed: int | None) -> tuple[str, int]:
        body = {"model": self.model_id, "max_tokens": self.max_new_tokens,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                    {"type": "text", "text": prompt}]}]}
        if seed is not None:
            body["seed"] = seed  # vLLM and SGLang sample reproducibly per request with it
        if sampling.get("do_sample"):
            body.update({k: sampling[k] for k in ("temperature", "top_p") if k in sampling})
            if "repetition_penalty" in sampling:
                body["frequency_penalty"] = min(2.0, sampling["repetition_penalty"] - 1.0)
        else:
            body["temperature"] = 0.0
        return self._post(body)

    def generate(self, images, prompts: list[str], prefixes: list[str], sampling: dict,
                 seeds: list[int] | None = None) -> list[tuple]:
        seeds = seeds or [None] * len(images)
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._one, im, p, sampling, s) for im, p, s in zip(images, prompts, seeds)]
            out = []
            for f in futures:
                try:
                    out.append((*f.result(), None))
                except OpenAIError as e:
                    out.append((None, 0, f"server: {e}"))  # the row records the failure as its reason
            return out
