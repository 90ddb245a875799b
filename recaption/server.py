"""A small OpenAI-compatible chat-completions server around a local captioner.

It speaks the protocol ``OpenAICaptioner`` uses with vLLM or SGLang (POST
/v1/chat/completions, the image inline as a data URL), so the client is tested against a
real model on loopback; it records what each request asked (prompt, seed, max_tokens) and
can answer slowly, fail or drop connections on purpose.

It is built to face clients it does not trust: the route, the bearer token (when
``--api-key-env`` names one) and the content type are checked before a byte of the body
is read; bodies need a Content-Length under ``--max-body``; ``max_tokens`` is clamped to
``--max-tokens``; images are decoded only as JPEG, PNG or WEBP under a pixel cap; an idle
or dribbling connection is closed after ``--idle-timeout`` seconds; at most
``--max-connections`` connections are served at once (others get 503); anything malformed
gets a 4xx with an OpenAI-style error object.

    TAPIR_CAPTION_KEY=... python -m recaption.server MODEL_PATH --port 8000 --api-key-env TAPIR_CAPTION_KEY
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from recaption.backends import TransformersCaptioner

ROUTE = "/v1/chat/completions"
FORMATS = ["JPEG", "PNG", "WEBP"]
_BUSY_BODY = b'{"error": {"message": "too many connections, try again", "code": 503}}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class BadRequest(ValueError):
    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def parse_request(body: dict, max_tokens: int) -> dict:
    """The fields a caption request needs, checked: image bytes, prompt, max_tokens (clamped),
    sampling and seed. ``BadRequest`` (400) names the first thing wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise BadRequest(400, "messages must be a non-empty list")
    message = body["messages"][-1]
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list) or not all(isinstance(c, dict) for c in content):
        raise BadRequest(400, "the last message's content must be a list of parts")
    urls = [c.get("image_url", {}).get("url") if isinstance(c.get("image_url"), dict) else None
            for c in content if c.get("type") == "image_url"]
    if len(urls) != 1 or not isinstance(urls[0], str) or not urls[0].startswith("data:image/") or \
            "," not in urls[0]:
        raise BadRequest(400, "exactly one image_url part with a data:image/...;base64 URL is required")
    texts = [c.get("text") for c in content if c.get("type") == "text"]
    if not all(isinstance(t, str) for t in texts):
        raise BadRequest(400, "text parts must hold strings")
    try:
        data = base64.b64decode(urls[0].split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(400, f"image is not valid base64: {e}") from e
    requested = body.get("max_tokens", max_tokens)
    temperature = body.get("temperature", 0)
    seed = body.get("seed")
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
        raise BadRequest(400, "max_tokens must be a positive integer")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise BadRequest(400, "temperature must be a number in [0, 2]")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest(400, "seed must be an integer")
    sampling = {"do_sample": temperature > 0}
    if sampling["do_sample"]:
        sampling["temperature"] = float(temperature)
        if isinstance(body.get("top_p"), (int, float)) and 0 < body["top_p"] <= 1:
            sampling["top_p"] = float(body["top_p"])
    return {"image": data, "prompt": " ".join(texts), "max_tokens": min(requested, max_tokens),
            "sampling": sampling, "seed": seed, "model": body.get("model")}


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise BadRequest(400, f"image of {im.width}x{im.height} pixels is over the {max_pixels}-pixel cap")
            return im.convert("RGB")
    except BadRequest:
        raise
    except Exception as e:  # PIL raises many types on hostile bytes; all of them are the client's 400
        raise BadRequest(400, f"image cannot be decoded: {type(e).__name__}") from e


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.owner.idle_timeout  # socket timeout: idle keep-alive and slow clients
        super().setup()

    def log_message(self, *args):
        pass

    def _error(self, status: int, message: str, close: bool = True, headers: dict | None = None):
        if close:  # an unread body must not be taken for the next request: close after answering
            self.close_connection = True
            length = self.headers.get("Content-Length", "") if self.headers else ""
            if length.isdigit() and int(length) <= 65536:
                try:  # read a small body unparsed, so closing does not reset the connection under the answer
                    self._read_body(int(length), time.monotonic() + self.server.owner.idle_timeout)
                except OSError:
                    pass
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}},
                   headers)

    def _send(self, status: int, payload: dict, headers: dict | None = None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self, n: int, deadline: float) -> bytes:
        chunks, got = [], 0
        while got < n:
            if time.monotonic() > deadline:
                raise TimeoutError("body not received in time")
            chunk = self.rfile.read1(min(65536, n - got))
            if not chunk:
                raise ConnectionError("connection closed mid-body")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        self._error(405 if path == ROUTE else 404, f"no route GET {path}", headers={"Allow": "POST"})

    def do_POST(self):  # noqa: N802
        server: CaptionServer = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != ROUTE:
            return self._error(404, f"no route POST {path}")
        if server.api_key:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                return self._error(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        if self.headers.get_content_type() != "application/json":
            return self._error(415, "Content-Type must be application/json")
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            return self._error(411, "a Content-Length is required (no chunked bodies)")
        if not length.isdigit():
            return self._error(400, "bad Content-Length")
        if int(length) > server.max_body:
            return self._error(413, f"body over {server.max_body} bytes")
        try:
            raw = self._read_body(int(length), time.monotonic() + server.idle_timeout)
        except (OSError, TimeoutError):
            self.close_connection = True
            return
        try:
            req = parse_request(json.loads(raw), server.max_tokens)
            image = decode_image(req.pop("image"), server.max_pixels)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return self._error(400, "body is not JSON", close=False)
        except BadRequest as e:
            return self._error(e.status, str(e), close=False)
        with server.lock:
            server.requests += 1
            n = server.requests
            server.received.append(req)
        if n <= server.drop_first:
            self.close_connection = True
            return
        if n <= server.drop_first + server.fail_first:
            return self._send(503, {"error": {"message": "overloaded, try again", "code": 503}})
        if server.delay:
            time.sleep(server.delay)
        with server.lock:  # one generate at a time on the shared model
            if server.closed:  # no model work after the server was closed
                self.close_connection = True
                return
            server.captioner.max_new_tokens = req["max_tokens"]
            seeds = [req["seed"]] if req["seed"] is not None else None
            [(text, tokens, _)] = server.captioner.generate([image], [req["prompt"]], [server.prefix],
                                                            req["sampling"], seeds)
        self._send(200, {"object": "chat.completion", "model": req["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"completion_tokens": tokens}})


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``slots`` at once; the one over gets 503 and is closed."""

    daemon_threads = True

    def __init__(self, address, handler, slots: int):
        self.slots = threading.BoundedSemaphore(slots)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class CaptionServer:
    """Serve ``model`` on ``host`` (127.0.0.1 by default; a context manager).

    ``received`` lists every accepted request's fields (prompt, seed, max_tokens after
    clamping, sampling, model name), in arrival order."""

    def __init__(self, model: str, port: int = 0, delay: float = 0.0, fail_first: int = 0, drop_first: int = 0,
                 prefix: str = "", host: str = "127.0.0.1", api_key: str | None = None, max_body: int = 20 << 20,
                 max_tokens: int = 512, max_pixels: int = 4096 * 4096, idle_timeout: float = 30.0,
                 max_connections: int = 16):
        self.captioner = TransformersCaptioner(model, device="auto")
        self.captioner.setup()
        self.delay, self.fail_first, self.drop_first, self.prefix = delay, fail_first, drop_first, prefix
        self.api_key, self.max_body, self.max_tokens = api_key, max_body, max_tokens
        self.max_pixels, self.idle_timeout = max_pixels, idle_timeout
        self.lock, self.requests, self.received, self.closed = threading.Lock(), 0, [], False
        self.httpd = _BoundedServer((host, port), _Handler, max_connections)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.base_url = f"http://{host}:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "CaptionServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:  # waits for a generate in flight; handlers still open start none after this
            self.closed = True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", help="environment variable holding the bearer token clients must send "
                   "(401 without it); unset: no token is asked for")
    p.add_argument("--prefix", default="", help="text prefix for a prefix-only captioner (BLIP)")
    p.add_argument("--max-body", type=int, default=20 << 20, help="largest request body, bytes (413 above)")
    p.add_argument("--max-tokens", type=int, default=512, help="requests' max_tokens are clamped to this")
    p.add_argument("--max-connections", type=int, default=16, help="connections served at once (503 above)")
    p.add_argument("--idle-timeout", type=float, default=30.0, help="seconds before an idle connection is closed")
    args = p.parse_args(argv)
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            p.error(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    with CaptionServer(args.model, args.port, host=args.host, api_key=key, prefix=args.prefix,
                       max_body=args.max_body, max_tokens=args.max_tokens, max_connections=args.max_connections,
                       idle_timeout=args.idle_timeout) as server:
        print(f"serving {args.model} at {server.base_url}" + (" (bearer token required)" if key else ""),
              flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
