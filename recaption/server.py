"""A small OpenAI-compatible chat-completions server around a local captioner.

It speaks the protocol ``OpenAICaptioner`` uses with vLLM or SGLang (POST
/v1/chat/completions, the image inline as a data URL), so the client is tested against a
real model on loopback; it can also answer slowly, fail or drop connections on purpose.

    python -m recaption.server MODEL_PATH --port 8000
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from recaption.backends import TransformersCaptioner


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        server: CaptionServer = self.server.owner  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with server.lock:
            server.requests += 1
            n = server.requests
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if n <= server.drop_first:
            self.close_connection = True
            return
        if n <= server.drop_first + server.fail_first:
            return self._send(503, {"error": {"message": "overloaded, try again"}})
        if server.delay:
            time.sleep(server.delay)
        content = body["messages"][-1]["content"]
        url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        prompt = " ".join(c["text"] for c in content if c["type"] == "text")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        sampling = {"do_sample": body.get("temperature", 0) > 0}
        if sampling["do_sample"]:
            sampling.update({k: body[k] for k in ("temperature", "top_p") if k in body})
        with server.lock:  # one generate at a time on the shared model
            server.captioner.max_new_tokens = int(body.get("max_tokens", 77))
            [(text, tokens, _)] = server.captioner.generate([image], [prompt], [server.prefix], sampling)
        self._send(200, {"object": "chat.completion", "model": body.get("model"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"completion_tokens": tokens}})

    def _send(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class CaptionServer:
    """Serve ``model`` on 127.0.0.1 (a context manager)."""

    def __init__(self, model: str, port: int = 0, delay: float = 0.0, fail_first: int = 0, drop_first: int = 0,
                 prefix: str = ""):
        self.captioner = TransformersCaptioner(model, device="auto")
        self.captioner.setup()
        self.delay, self.fail_first, self.drop_first, self.prefix = delay, fail_first, drop_first, prefix
        self.lock, self.requests = threading.Lock(), 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "CaptionServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    with CaptionServer(args.model, args.port) as server:
        print(f"serving {args.model} at {server.base_url}")
        threading.Event().wait()


if __name__ == "__main__":
    main()
