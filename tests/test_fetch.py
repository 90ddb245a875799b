"""The hardened fetcher refuses every non-public address class before connecting.

These run with allow_loopback off unless a test says otherwise. The socket guard would
fail a test on any connection attempt to a non-loopback address; on top of that each
refusal test asserts that no connect was even attempted (tapir_netguard.ATTEMPTS empty
and the server saw no request).
"""

import socket
import urllib.error

import pytest
import tapir_netguard

from pipeline.fetch import REFUSED, FetchPolicy, FetchRefused, address_class, build_opener
from pipeline.synthweb import Resource, WebServer, World

STRICT = FetchPolicy(allow_loopback=False, max_bytes=10_000, max_redirects=3, read_deadline=1.0)


def _refused(url, policy=STRICT):
    with pytest.raises((FetchRefused, urllib.error.URLError)) as exc:
        build_opener(policy).open(url, timeout=2)
    # urllib itself refuses a redirect to a non-http scheme before the policy sees it
    assert REFUSED in str(exc.value) or "is not allowed" in str(exc.value), exc.value
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
    ("/to-file", "Redirection to url 'file:///etc/passwd' is not allowed"),
    ("/to-named", "private address 10.9.9.9"),  # checked after DNS resolution, on the connected address
])
def test_redirect_from_allowed_to_refused(fake_public_host, path, expect):
    assert expect in _refused("http://images.example" + path)
    assert fake_public_host.hits[path] == 1  # the allowed hop happened; the refused one never connected


def test_byte_cap(fake_public_host):
    with pytest.raises(OSError, match="tapir-too-large"):
        build_opener(STRICT).open("http://images.example/big", timeout=2).read()


def test_read_deadline_stops_a_trickle(fake_public_host):
    with pytest.raises(TimeoutError, match="tapir-deadline"):
        build_opener(STRICT).open("http://images.example/trickle", timeout=2).read()


def test_max_redirects_is_exact(fake_public_host):
    """urllib lets a first redirect through whatever its limit: max_redirects 0 must refuse it."""
    with pytest.raises(urllib.error.HTTPError, match="redirect error: more than 0"):
        build_opener(FetchPolicy(max_redirects=0)).open("http://images.example/one-hop", timeout=2)
    assert build_opener(FetchPolicy(max_redirects=1)).open("http://images.example/one-hop", timeout=2).read() == \
        b"\xff\xd8jpeg"


def test_redirect_loop_is_cut(fake_public_host):
    with pytest.raises(urllib.error.HTTPError, match="infinite loop"):
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
