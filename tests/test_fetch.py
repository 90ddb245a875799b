"""The hardened fetcher refuses every non-public address class before connecting.

These run with allow_loopback off unless a test says otherwise. The socket guard would
fail a test on any connection attempt to a non-loopback address; on top of that each
refusal test asserts that no connect was even attempted (tapir_netguard.ATTEMPTS empty
and the server saw no request).
"""

import socket
import threading
import time

import pytest
import tapir_netguard

from pipeline.fetch import REFUSED, TOO_LARGE, FetchError, FetchPolicy, FetchRefused, address_class, build_opener
from pipeline.synthweb import Resource, WebServer, World

STRICT = FetchPolicy(allow_loopback=False, max_bytes=10_000, max_redirects=3, deadline=1.0)


def _refused(url, policy=STRICT):
    with pytest.raises(FetchRefused) as exc:
        build_opener(policy).open(url, timeout=2)
    assert str(exc.value).startswith(REFUSED), exc.value
    assert tapir_netguard.ATTEMPTS == [], "the fetcher tried to connect before refusing"
    return str(exc.value)


@pytest.mark.parametrize("url,kind", [
    ("http://127.0.0.1:9/x.jpg", "loopback"),
    ("http://127.8.9.10/x.jpg", "loopback"),
    ("http://[::1]:9/x.jpg", "loopback"),
    ("http://localhost:9/x.jpg", "loopback"),
    ("http://10.1.2.3/x.jpg", "private"),
    ("http://172.16.0.1/x.jpg", "private"),
    ("http://192.168.1.1/x.jpg", "private"),
    ("http://[fd12::1]/x.jpg", "private"),
    ("http://169.254.10.10/x.jpg", "link-local"),
    ("http://[fe80::1]/x.jpg", "link-local"),
    ("http://169.254.169.254/latest/meta-data/", "cloud-metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud-metadata"),
    ("http://224.0.0.1/x.jpg", "multicast"),
    ("http://[ff02::1]/x.jpg", "multicast"),
    ("http://0.0.0.0/x.jpg", "unspecified"),
    ("http://240.0.0.1/x.jpg", "reserved"),
    ("http://100.64.0.1/x.jpg", "reserved"),
    ("http://[::ffff:10.0.0.1]/x.jpg", "private"),
    ("http://[::ffff:127.0.0.1]:9/x.jpg", "loopback"),
    ("http://[2002:a00:1::1]/x.jpg", "private"),                       # 6to4 of 10.0.0.1
    ("http://[2002:a9fe:a9fe::1]/x.jpg", "cloud-metadata"),            # 6to4 of 169.254.169.254
    ("http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/x.jpg", "private"),  # Teredo, client 10.0.0.1
    ("http://[64:ff9b::7f00:1]/x.jpg", "loopback"),                    # NAT64 of 127.0.0.1
    ("http://[::10.0.0.1]/x.jpg", "private"),                          # IPv4-compatible
    ("http://[fec0::1]/x.jpg", "site-local"),
    ("http://168.63.129.16/machine/", "cloud-metadata"),               # Azure's wireserver
    ("http://198.18.0.1/x.jpg", "reserved"),
    ("http://[2001:db8::1]/x.jpg", "reserved"),
])
def test_refused_address_classes(url, kind):
    assert f"{kind} address" in _refused(url)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x.jpg", "data:image/png;base64,AAAA"])
def test_refused_schemes(url):
    assert "scheme" in _refused(url)


def test_address_class_public():
    assert address_class("93.184.215.14") is None
    assert address_class("2606:4700::1111") is None
    assert address_class("2002:5db8:d70e::1") is None  # 6to4 of the public 93.184.215.14
    assert address_class("64:ff9b::808:808") is None    # NAT64 of 8.8.8.8


@pytest.fixture
def fake_public_host():
    """'images.example' resolves to a public address whose port 80 is a loopback server."""
    resources = {
        "/ok.jpg": Resource(body=b"\xff\xd8jpeg"),
        "/one-hop": Resource(status=302, redirect="/ok.jpg"),
        "/to-private": Resource(status=302, redirect="http://10.0.0.5/x.jpg"),
        "/to-metadata": Resource(status=301, redirect="http://169.254.169.254/latest/meta-data/"),
        "/to-loopback": Resource(status=302, redirect="http://127.0.0.1:9/x.jpg"),
        "/to-file": Resource(status=302, redirect="file:///etc/passwd"),
        "/to-named": Resource(status=302, redirect="http://internal.example/x.jpg"),
        "/big": Resource(body=b"x" * 50_000),
        "/trickle": Resource(body=b"y" * 2_000, trickle=0.2),
        "/loop": Resource(status=302, redirect="/loop2"),
        "/loop2": Resource(status=302, redirect="/loop"),
    }
    with WebServer(World([], resources)) as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        tapir_netguard.FAKE_DNS.update({"images.example": "93.184.215.14", "internal.example": "10.9.9.9"})
        tapir_netguard.ROUTES[("93.184.215.14", 80)] = ("127.0.0.1", port)
        try:
            yield server
        finally:
            tapir_netguard.FAKE_DNS.clear()
            tapir_netguard.ROUTES.clear()


def test_public_host_is_fetched(fake_public_host):
    assert build_opener(STRICT).open("http://images.example/ok.jpg", timeout=2).read() == b"\xff\xd8jpeg"


@pytest.mark.parametrize("path,expect", [
    ("/to-private", "private address 10.0.0.5"),
    ("/to-metadata", "cloud-metadata address 169.254.169.254"),
    ("/to-loopback", "loopback address 127.0.0.1"),
    ("/to-file", "tapir:refused_scheme redirect to scheme 'file'"),
    ("/to-named", "private address 10.9.9.9"),  # checked after DNS resolution, on the connected address
])
def test_redirect_from_allowed_to_refused(fake_public_host, path, expect):
    assert expect in _refused("http://images.example" + path)
    assert fake_public_host.hits[path] == 1  # the allowed hop happened; the refused one never connected


def test_byte_cap(fake_public_host):
    with pytest.raises(FetchError, match="^" + TOO_LARGE):
        build_opener(STRICT).open("http://images.example/big", timeout=2).read()


def test_read_deadline_stops_a_trickle(fake_public_host):
    with pytest.raises(FetchError, match="^tapir:timeout"):
        build_opener(STRICT).open("http://images.example/trickle", timeout=2).read()


def test_max_redirects_is_exact(fake_public_host):
    """urllib lets a first redirect through whatever its limit: max_redirects 0 must refuse it."""
    with pytest.raises(FetchError, match="^tapir:redirect_loop more than 0 redirect"):
        build_opener(FetchPolicy(max_redirects=0)).open("http://images.example/one-hop", timeout=2)
    assert build_opener(FetchPolicy(max_redirects=1)).open("http://images.example/one-hop", timeout=2).read() == \
        b"\xff\xd8jpeg"


def test_redirect_loop_is_cut(fake_public_host):
    with pytest.raises(FetchError, match="^tapir:redirect_loop"):
        build_opener(STRICT).open("http://images.example/loop", timeout=2)


def test_allow_loopback_opens_loopback_only():
    resources = {"/ok.jpg": Resource(body=b"abc"), "/to-private": Resource(status=302, redirect="http://192.168.0.9/")}
    with WebServer(World([], resources)) as server:
        policy = FetchPolicy(allow_loopback=True)
        assert build_opener(policy).open(server.base_url + "/ok.jpg", timeout=2).read() == b"abc"
        assert "private address 192.168.0.9" in _refused(server.base_url + "/to-private", policy)


def test_guard_itself_refuses_non_loopback(monkeypatch, tmp_path):
    """The guard the other tests rely on: a raw connect to a public address never leaves."""
    monkeypatch.setenv("TAPIR_NETGUARD_LOG", str(tmp_path / "own.log"))  # this violation is intended
    s = socket.socket()
    try:
        with pytest.raises(ConnectionRefusedError, match="netguard"):
            s.connect(("93.184.215.14", 80))
    finally:
        s.close()
    assert tapir_netguard.ATTEMPTS
    assert "VIOLATION connect ('93.184.215.14', 80)" in (tmp_path / "own.log").read_text()
    tapir_netguard.ATTEMPTS.clear()


# -- hostile servers: one deadline over connect, TLS, status line, headers and body --------


def _read_request(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return False
        data += chunk
    return True


class RawServer:
    """A loopback TCP server running ``behave(conn, stop)`` on each connection: HTTP as a
    hostile server speaks it, byte by byte."""

    def __init__(self, behave):
        self.behave, self.stop = behave, threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0

    def url(self, path="/x.jpg", scheme="http"):
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            try:
                self.behave(conn, self.stop)
            except OSError:
                pass  # the client gave up

    def __enter__(self):
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self._thread.join()
        self.sock.close()


def continue_forever(conn, stop):
    _read_request(conn)
    while not stop.wait(0.05):
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")


def dribble_headers(conn, stop):
    _read_request(conn)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Pad: " + b"a" * 100_000
    for byte in head:
        if stop.wait(0.2):
            return
        conn.sendall(bytes([byte]))


def never_answer(conn, stop):
    stop.wait(120)


def answer(status_line: bytes, body: bytes = b""):
    def behave(conn, stop):
        if _read_request(conn):
            conn.sendall(status_line + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    return behave


def slow_redirects(conn, stop):
    """Every path answers after 0.8 s with a redirect to the next one: no hop is slow, all are."""
    if _read_request(conn) and not stop.wait(0.8):
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /next%d\r\nContent-Length: 0\r\n\r\n" % time.monotonic_ns())


def within(seconds, fn):
    """fn()'s exception (or result) if it ends within ``seconds``; fails the test (instead of hanging
    it) if not."""
    out = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as err:  # noqa: BLE001 (handed to the test)
            out["error"] = err

    t = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds}s: the deadline did not hold"
    return out.get("error", out.get("result")), time.monotonic() - start


DEADLINE_S = 2.0
LOOPBACK = FetchPolicy(allow_loopback=True, max_redirects=20, deadline=DEADLINE_S)
MARGIN = 3.0  # a loaded 2-core machine


@pytest.mark.parametrize("behave,scheme", [
    (continue_forever, "http"), (dribble_headers, "http"), (never_answer, "http"),
    (never_answer, "https"),  # the TLS handshake never completes
    (slow_redirects, "http"),  # the deadline spans every hop
])
def test_one_deadline_over_the_whole_request(behave, scheme):
    with RawServer(behave) as server:
        # the per-call socket timeout (30 s) is far away: only the URL's deadline can end these
        err, took = within(DEADLINE_S + MARGIN, lambda: build_opener(LOOPBACK).open(server.url(scheme=scheme),
                                                                                    timeout=30).read())
    assert isinstance(err, FetchError) and str(err).startswith("tapir:timeout"), err
    assert took >= DEADLINE_S * 0.9


@pytest.mark.parametrize("status_line,reason", [
    (b"HTTP/1.1 404 timeout", "http_404"),           # the phrase never decides the class
    (b"HTTP/1.1 503 Not Found", "http_5xx"),
    (b"HTTP/1.1 429 OK", "http_429"),
    (b"HTTP/1.1 403 tapir:timeout", "http_403"),     # a phrase posing as a tag stays after Tapir's own
    (b"HTTP/1.1 302 Found", "http_302"),              # a redirect without a Location
    (b"HTTP/1.1 2000 OK", "bad_response"),            # a malformed status line
])
def test_errors_are_tagged_by_status_code(status_line, reason):
    with RawServer(answer(status_line)) as server:
        with pytest.raises(FetchError) as exc:
            build_opener(LOOPBACK).open(server.url(), timeout=5)
    assert str(exc.value).startswith(f"tapir:{reason} ") and exc.value.reason == reason, exc.value


def test_errors_are_tagged_by_exception_type():
    def reset(conn, stop):
        _read_request(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close

    def close_early(conn, stop):  # a body shorter than its Content-Length
        if _read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nshort")

    for behave, reason in [(reset, "connection_error"), (close_early, "connection_error")]:
        with RawServer(behave) as server:
            with pytest.raises(FetchError, match=f"^tapir:{reason} "):
                build_opener(LOOPBACK).open(server.url(), timeout=5).read()
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connection refused
    with pytest.raises(FetchError, match="^tapir:connection_error ConnectionRefusedError"):
        build_opener(LOOPBACK).open(f"http://127.0.0.1:{port}/x.jpg", timeout=5)
    with pytest.raises(FetchError, match="^tapir:invalid_url "):
        build_opener(LOOPBACK).open("http:///x.jpg", timeout=5)


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (made with the openssl command) and a server context."""
    import shutil
    import ssl
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "key.pem",
                    "-out", d / "cert.pem", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(d / "cert.pem", d / "key.pem")
    return d / "cert.pem", server


def _tls(server_ctx, trickle: float | None = None):
    def behave(conn, stop):
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            if not _read_request(tls):
                return
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\nConnection: close\r\n\r\n")
            for _ in range(40):
                if trickle and stop.wait(trickle):
                    return
                tls.sendall(b"z")
    return behave


def test_tls_is_verified_and_under_the_deadline(tls_pair, monkeypatch):
    import ssl

    from pipeline import fetch

    cert, server_ctx = tls_pair
    with RawServer(_tls(server_ctx)) as server:  # a certificate nobody vouches for: refused
        with pytest.raises(FetchError, match="^tapir:tls_error .*CERTIFICATE_VERIFY_FAILED"):
            build_opener(LOOPBACK).open(server.url(scheme="https"), timeout=5)
    real = ssl.create_default_context
    monkeypatch.setattr(fetch.ssl, "create_default_context", lambda: real(cafile=str(cert)))  # trust the test CA
    with RawServer(_tls(server_ctx)) as server:
        assert build_opener(LOOPBACK).open(server.url(scheme="https"), timeout=5).read() == b"z" * 40
    with RawServer(_tls(server_ctx, trickle=0.2)) as server:  # 8 s of body: the deadline ends it at 2 s
        err, took = within(DEADLINE_S + MARGIN,
                           lambda: build_opener(LOOPBACK).open(server.url(scheme="https"), timeout=30).read())
    assert isinstance(err, FetchError) and str(err).startswith("tapir:timeout"), err
