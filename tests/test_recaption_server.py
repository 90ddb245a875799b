"""The caption server (``python -m recaption.server``) facing hostile clients: the route,
token and content type are checked before the body is read, bodies are capped, max_tokens
clamped, malformed requests answered 400, idle connections closed, connections bounded."""

import base64
import http.client
import io
import json
import socket
import time

import pytest
from PIL import Image

from recaption.backends import OpenAICaptioner, image_data_url
from recaption.server import CaptionServer, main

IMAGE = Image.new("RGB", (16, 16), "red")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    from recaption.tiny import save_tiny_chat_vlm

    return save_tiny_chat_vlm(tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="module")
def server(tiny_chat):
    with CaptionServer(tiny_chat, max_tokens=16, max_body=200_000, max_pixels=512 * 512, idle_timeout=2.0) as s:
        yield s


def body(**overrides) -> dict:
    return {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(IMAGE)}},
        {"type": "text", "text": "describe the image"}]}], **overrides}


def post(server, payload, path="/v1/chat/completions", headers=None, method="POST"):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"{}")
    conn.close()
    return out


def test_valid_request_is_answered_and_recorded(server):
    status, reply = post(server, body(seed=5, temperature=0.7))
    assert status == 200 and isinstance(reply["choices"][0]["message"]["content"], str)
    assert server.received[-1]["prompt"] == "describe the image" and server.received[-1]["seed"] == 5


def test_max_tokens_is_clamped(server):
    assert post(server, body(max_tokens=1_000_000))[0] == 200
    assert server.received[-1]["max_tokens"] == 16


def _image_part(url):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


PNG = io.BytesIO()
Image.new("RGB", (2000, 2000)).save(PNG, "PNG")
GIF = io.BytesIO()
Image.new("RGB", (8, 8)).save(GIF, "GIF")


@pytest.mark.parametrize("payload,status,message", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "messages must be"),
    ({"messages": []}, 400, "messages must be"),
    ({"messages": [{"role": "user", "content": "describe"}]}, 400, "list of parts"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, 400, "exactly one image_url"),
    (_image_part("https://example.com/cat.jpg"), 400, "exactly one image_url"),
    (_image_part("data:image/jpeg;base64,@@@@"), 400, "not valid base64"),
    (_image_part("data:image/jpeg;base64," + base64.b64encode(b"not an image").decode()), 400, "cannot be decoded"),
    (_image_part("data:image/gif;base64," + base64.b64encode(GIF.getvalue()).decode()), 400, "cannot be decoded"),
    (_image_part("data:image/png;base64," + base64.b64encode(PNG.getvalue()).decode()), 400, "pixel cap"),
    (body(max_tokens="many"), 400, "max_tokens"),
    (body(max_tokens=0), 400, "max_tokens"),
    (body(temperature="hot"), 400, "temperature"),
    (body(seed=1.5), 400, "seed"),
])
def test_malformed_request_gets_400(server, payload, status, message):
    before = len(server.received)
    got, reply = post(server, payload)
    assert got == status and message in reply["error"]["message"]
    assert len(server.received) == before  # nothing reached the model


def _raw(server, data: bytes) -> bytes:
    """Send raw bytes, return what came back before the server closed (or 10 s passed)."""
    s = socket.create_connection(server.httpd.server_address[:2], timeout=10)
    s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    s.close()
    return out


def test_route_and_content_type_are_checked_before_the_body(server):
    # an unparseable body on a wrong route or with a wrong type: refused for the route or type, not the body
    assert post(server, b"{garbage", path="/v1/completions")[0] == 404
    assert post(server, b"{garbage", path="/admin")[0] == 404
    assert post(server, b"", method="GET")[0] == 405
    assert post(server, b"{garbage", headers={"Content-Type": "text/plain"})[0] == 415
    # a huge declared body is refused at once, without waiting for (or reading) a byte of it
    started = time.monotonic()
    head = _raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000000000\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 5
    chunked = _raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411")


def test_idle_and_dribbling_connections_are_closed(server):
    """idle_timeout is 2 s: a silent client, one stuck mid-headers and one stuck mid-body are cut off."""
    for data in (b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"messages\""):
        started = time.monotonic()
        _raw(server, data)
        assert time.monotonic() - started < 9  # closed by the server, long before the client's own 10 s


def test_bearer_token(tiny_chat, monkeypatch):
    with CaptionServer(tiny_chat, api_key="s3cret", max_tokens=4) as server:
        assert post(server, body())[0] == 401
        assert post(server, body(), headers={"Authorization": "Bearer wrong"})[0] == 401
        assert post(server, b"{garbage", headers={"Authorization": "Bearer wrong"})[0] == 401  # before parsing
        assert post(server, body(), headers={"Authorization": "Bearer s3cret"})[0] == 200
        monkeypatch.setenv("TAPIR_TEST_SERVER_KEY", "s3cret")
        client = OpenAICaptioner(server.base_url, "m", api_key_env="TAPIR_TEST_SERVER_KEY", timeout=120, retries=0,
                                 max_new_tokens=4)
        client.setup()
        [(text, _, err)] = client.generate([IMAGE], ["describe"], [""], {})
        assert err is None and text is not None
        monkeypatch.setenv("TAPIR_TEST_SERVER_KEY", "")
        client.setup()
        [(text, _, err)] = client.generate([IMAGE], ["describe"], [""], {})
        assert text is None and "HTTP 401" in err


def test_server_cli_needs_the_named_key(monkeypatch):
    monkeypatch.delenv("TAPIR_TEST_SERVER_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["/nonexistent", "--api-key-env", "TAPIR_TEST_SERVER_KEY"])
    assert exit_.value.code == 2


def test_concurrent_connections_are_bounded(tiny_chat):
    """With two slots held by idle clients, a third connection is turned away (503, or closed)
    at once; once they go, it is served."""
    with CaptionServer(tiny_chat, max_connections=2, max_tokens=4, idle_timeout=60) as server:
        idle = [socket.create_connection(server.httpd.server_address[:2]) for _ in range(2)]
        deadline = time.monotonic() + 60  # wait until the server holds both slots (no fixed sleep to race)
        while server.httpd.slots._value and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.httpd.slots._value == 0
        started = time.monotonic()
        turned_away = _raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert turned_away in (b"",) or turned_away.startswith(b"HTTP/1.1 503")
        assert time.monotonic() - started < 9 and server.received == []
        for s in idle:
            s.close()
        client = OpenAICaptioner(server.base_url, "m", timeout=120, retries=5, backoff=0.2, max_new_tokens=4)
        client.setup()
        [(text, _, err)] = client.generate([IMAGE], ["describe"], [""], {})
        assert err is None and len(server.received) == 1
