"""The OpenAI-compatible client against loopback servers that misbehave on purpose: raw
sockets answering bad status lines, truncated bodies, redirects, replies of the wrong
shape or size, or nothing at all. Every malformed reply is one row's recorded failure
(text None, the reason in the error), never an exception that would fail the shard."""

import json
import socket
import threading
import time

import pytest
from PIL import Image

from recaption.backends import OpenAICaptioner, parse_reply


class RawServer:
    """Accepts on 127.0.0.1; per connection reads one request (headers and a Content-Length
    body), records it, then calls ``respond(conn, n)`` with the request's number."""

    def __init__(self, respond):
        self.respond, self.requests = respond, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            lines = head.decode().split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:])
            while len(body) < int(headers.get("Content-Length", 0)):
                body += conn.recv(65536)
            self.requests.append({"line": lines[0], "headers": headers, "body": json.loads(body or b"{}")})
            try:
                self.respond(conn, len(self.requests))
            except OSError:
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def reply(status: str, body: bytes, headers: str = "Content-Type: application/json\r\n", length: int | None = None):
    length = len(body) if length is None else length
    return f"HTTP/1.1 {status}\r\n{headers}Content-Length: {length}\r\nConnection: close\r\n\r\n".encode() + body


def canned(data: bytes):
    return lambda conn, n: conn.sendall(data)


GOOD = json.dumps({"choices": [{"message": {"role": "assistant", "content": "a red circle"}}],
                   "usage": {"completion_tokens": 3}}).encode()
IMAGE = Image.new("RGB", (16, 16), "red")


def _client(url, **kw):
    kw = {"concurrency": 1, "timeout": 5.0, "retries": 1, "backoff": 0.05, **kw}
    client = OpenAICaptioner(url, "m", api_key_env="TAPIR_TEST_CAPTION_KEY", **kw)
    client.setup()
    return client


def test_good_reply_and_seed_sent(monkeypatch):
    monkeypatch.setenv("TAPIR_TEST_CAPTION_KEY", "k-123")
    with RawServer(canned(reply("200 OK", GOOD))) as server:
        [(text, tokens, err)] = _client(server.base_url).generate([IMAGE], ["describe"], [""], {}, seeds=[42])
    assert (text, tokens, err) == ("a red circle", 3, None)
    [req] = server.requests
    assert req["line"] == "POST /v1/chat/completions HTTP/1.1"
    assert req["headers"]["Authorization"] == "Bearer k-123"
    assert req["body"]["seed"] == 42 and req["body"]["messages"][0]["content"][1]["text"] == "describe"


def _dribble(conn, n):  # a status line never finished: one byte at a time, slower than any read timeout matters
    for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
        conn.sendall(bytes([b]))
        time.sleep(0.1)


def _continue_forever(conn, n):  # http.client skips 100 Continue answers: an endless stream of them
    for _ in range(10_000):
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(0.1)


def _chunked_truncated(conn, n):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"400\r\n" + GOOD[:20])


def _chunked_huge(conn, n):
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(100):
        conn.sendall(b"1000\r\n" + b" " * 4096 + b"\r\n")


MALFORMED = {
    "bad_status_line": (canned(b"HTTP/1.1 OK-ish\r\n\r\n"), "BadStatusLine"),
    "not_http": (canned(b"SSH-2.0-OpenSSH_9.6\r\n"), "BadStatusLine"),
    "closed_without_reply": (canned(b""), "RemoteDisconnected"),
    "truncated_body": (canned(reply("200 OK", GOOD[:25], length=len(GOOD))), "reply truncated"),
    "truncated_chunks": (_chunked_truncated, "IncompleteRead"),
    "empty_choices": (canned(reply("200 OK", b'{"choices": []}')), "reply has no choices"),
    "error_with_200": (canned(reply("200 OK", b'{"error": {"message": "model is overloaded"}}')),
                       "server error in the reply: 'model is overloaded'"),
    "content_not_string": (canned(reply("200 OK", b'{"choices": [{"message": {"content": 42}}]}')),
                           "content is int, not a string"),
    "choices_not_list": (canned(reply("200 OK", b'{"choices": "a red circle"}')), "reply has no choices"),
    "message_missing": (canned(reply("200 OK", b'{"choices": [{"text": "a red circle"}]}')),
                        "content is NoneType"),
    "json_array": (canned(reply("200 OK", b"[1, 2]")), "reply is a JSON list"),
    "html": (canned(reply("200 OK", b"<html>hello</html>", "Content-Type: text/html\r\n")), "reply is not JSON"),
    "deeply_nested": (canned(reply("200 OK", b"[" * 4000)), "reply is not JSON"),
    "declared_too_big": (canned(reply("200 OK", b"{}", length=50_000_000)), "over the 4096-byte cap"),
    "chunked_too_big": (_chunked_huge, "over the 4096-byte cap"),
    "client_error": (canned(reply("400 Bad Request", b'{"error": {"message": "no"}}')), "HTTP 400"),
    "dribbled_headers": (_dribble, "no complete reply within 1.5s"),
    "continue_forever": (_continue_forever, "no complete reply within 1.5s"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_reply_is_a_recorded_row_failure(name):
    respond, reason = MALFORMED[name]
    with RawServer(respond) as server:
        client = _client(server.base_url, timeout=1.5, max_reply_bytes=4096)
        started = time.monotonic()
        out = client.generate([IMAGE, IMAGE], ["describe", "describe"], ["", ""], {})
        elapsed = time.monotonic() - started
    assert len(out) == 2
    for text, tokens, err in out:
        assert text is None and tokens == 0
        assert err.startswith("server: ") and reason in err, err
    assert elapsed < 20  # two rows, two attempts each, 1.5 s deadline per attempt


def test_redirect_is_refused_and_the_key_stays_home(monkeypatch):
    monkeypatch.setenv("TAPIR_TEST_CAPTION_KEY", "k-secret")
    with RawServer(canned(reply("200 OK", GOOD))) as elsewhere:
        location = f"Location: {elsewhere.base_url}/chat/completions\r\n"
        with RawServer(canned(reply("307 Temporary Redirect", b"", location))) as server:
            [(text, _, err)] = _client(server.base_url, retries=3).generate([IMAGE], ["describe"], [""], {})
    assert text is None and "HTTP 307: redirect refused" in err
    assert len(server.requests) == 1  # not retried either
    assert elsewhere.requests == []  # the key never left for the redirect's target


def test_retryable_status_then_success():
    answers = [reply("503 Service Unavailable", b"{}"), reply("200 OK", GOOD)]
    with RawServer(lambda conn, n: conn.sendall(answers[min(n, 2) - 1])) as server:
        [(text, _, err)] = _client(server.base_url).generate([IMAGE], ["describe"], [""], {})
    assert (text, err) == ("a red circle", None) and len(server.requests) == 2


@pytest.mark.parametrize("body,tokens", [
    ({"choices": [{"message": {"content": "a b c"}}], "usage": {"completion_tokens": True}}, 3),
    ({"choices": [{"message": {"content": "a b c"}}], "usage": "lots"}, 3),
    ({"choices": [{"message": {"content": "a b c"}}], "usage": {"completion_tokens": 7}}, 7),
])
def test_usage_of_the_wrong_type_falls_back_to_a_word_count(body, tokens):
    assert parse_reply(json.dumps(body).encode()) == ("a b c", tokens)
