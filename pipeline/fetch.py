"""Hardened HTTP fetching for the download stage.

img2dataset fetches with ``urllib.request.urlopen`` and no scheme, address or size
checks. Tapir keeps img2dataset's downloader and installs an opener (urllib's own
extension point, ``urllib.request.install_opener``) in each download worker that:

- speaks only http and https (no ``file:``, ``ftp:``, ``data:``), and no proxies;
- resolves the host itself and refuses loopback, private, link-local (cloud metadata
  included), multicast, unspecified and reserved addresses, then connects to the
  vetted address, so what is checked is what is connected to (no DNS rebinding);
  every redirect hop goes through the same check;
- caps redirects, bytes read (declared and actual) and the wall time of a body read.

``FetchPolicy.allow_loopback`` is the only switch: it opens loopback for tests and the
demo. Nothing else turns the checks off.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

# Markers at the start of every error this module raises; pipeline.download maps them
# to the row's error_reason.
REFUSED = "tapir-refused"
TOO_LARGE = "tapir-too-large"
DEADLINE = "tapir-deadline"


class FetchRefused(OSError):
    """The fetcher refused a URL or an address before connecting."""


@dataclass(frozen=True)
class FetchPolicy:
    allow_loopback: bool = False
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    read_deadline: float = 30.0


# Refused networks, from the IANA special-purpose address registries, spelled out rather than
# read from ipaddress's is_private / is_global, whose answers change between Python patch releases.
_NETWORKS = [(kind, ipaddress.ip_network(net)) for kind, nets in {
    "loopback": ["127.0.0.0/8", "::1/128"],
    "cloud-metadata": ["169.254.169.254/32", "fd00:ec2::254/128", "100.100.100.200/32",
                       "168.63.129.16/32"],  # AWS, AWS IPv6, Alibaba, Azure's wireserver
    "link-local": ["169.254.0.0/16", "fe80::/10"],
    "multicast": ["224.0.0.0/4", "ff00::/8"],
    "unspecified": ["0.0.0.0/8", "::/128"],
    "private": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
    "site-local": ["fec0::/10"],
    "reserved": ["100.64.0.0/10", "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24",
                 "203.0.113.0/24", "240.0.0.0/4", "255.255.255.255/32", "::/8", "100::/64", "2001:db8::/32",
                 "2001:10::/28", "2001:20::/28", "3fff::/20", "5f00::/16"],
}.items() for net in nets]


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries: IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible
    (::a.b.c.d), NAT64 (64:ff9b::/96), 6to4 (2002::/16) or Teredo's client (2001::/32)."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    packed = addr.packed
    if packed[:12] == bytes(12) and int(addr) > 1 or addr in ipaddress.ip_network("64:ff9b::/96"):
        return ipaddress.IPv4Address(packed[12:])
    return None


def address_class(ip: str) -> str | None:
    """The refused class of an IP address, or None when it is a public unicast address. An IPv6
    address that embeds an IPv4 one (mapped, compatible, NAT64, 6to4, Teredo) is judged by it."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None:
            return address_class(str(inner))
    for kind, net in _NETWORKS:
        if addr.version == net.version and addr in net:
            return kind
    return None


def vet_address(ip: str, policy: FetchPolicy) -> None:
    kind = address_class(ip)
    if kind is None or (kind == "loopback" and policy.allow_loopback):
        return
    raise FetchRefused(f"{REFUSED}: {kind} address {ip}")


def _vetted_connection(address, timeout, source_address, policy: FetchPolicy):
    """Resolve, vet every candidate address, connect to the first vetted one."""
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise OSError(f"dns failure for {host}: {err}") from err
    for *_, sockaddr in infos:  # refuse if any record is refused: no mixed answers
        vet_address(sockaddr[0], policy)
    err = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            err = exc
            sock.close()
    raise err or OSError(f"no address for {host}")


class CappedResponse(http.client.HTTPResponse):
    """An HTTP response whose body read is capped in bytes and in wall time."""

    policy: FetchPolicy = FetchPolicy()

    def begin(self):
        super().begin()
        self._started = time.monotonic()
        declared = self.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.policy.max_bytes:
            self.close()
            raise OSError(f"{TOO_LARGE}: declared {declared} bytes > cap {self.policy.max_bytes}")

    def read(self, amt=None):
        if amt is not None:
            return self._checked(super().read(amt))
        chunks, total = [], 0
        while True:
            chunk = self._checked(self.read1(65536))  # what has arrived: a trickle cannot stall the deadline
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > self.policy.max_bytes:
                self.close()
                raise OSError(f"{TOO_LARGE}: more than {self.policy.max_bytes} bytes")
            chunks.append(chunk)

    def _checked(self, data):
        if time.monotonic() - self._started > self.policy.read_deadline:
            self.close()
            raise TimeoutError(f"{DEADLINE}: body not read within {self.policy.read_deadline}s")
        return data


def _connection_classes(policy: FetchPolicy):
    response = type("PolicyResponse", (CappedResponse,), {"policy": policy})

    def create(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *a, **k):
        return _vetted_connection(address, timeout, source_address, policy)

    def init(self, *args, **kwargs):
        super(type(self), self).__init__(*args, **kwargs)
        self._create_connection = create  # http.client sets this per instance in __init__

    attrs = {"response_class": response, "__init__": init}
    http_cls = type("VettedHTTPConnection", (http.client.HTTPConnection,), attrs)
    https_cls = type("VettedHTTPSConnection", (http.client.HTTPSConnection,), attrs)
    return http_cls, https_cls


def build_opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    """An opener that only speaks vetted http(s); usable directly or installed globally."""
    http_cls, https_cls = _connection_classes(policy)

    class VettedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_cls, req)

    class VettedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_cls, req, context=self._context)

    class CappedRedirectHandler(urllib.request.HTTPRedirectHandler):
        max_redirections = policy.max_redirects

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if len(getattr(req, "redirect_dict", {})) >= policy.max_redirects:  # urllib lets the first one by
                raise urllib.error.HTTPError(req.full_url, code, f"redirect error: more than "
                                             f"{policy.max_redirects} redirect(s)", headers, fp)
            scheme = newurl.split(":", 1)[0].lower()
            if scheme not in ("http", "https"):
                raise FetchRefused(f"{REFUSED}: redirect to scheme {scheme!r}")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    class RefuseOtherSchemes(urllib.request.BaseHandler):
        def unknown_open(self, req):
            raise FetchRefused(f"{REFUSED}: scheme {req.type!r}")

    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler({}),  # never route through an environment proxy
        RefuseOtherSchemes(),
        VettedHTTPHandler(),
        VettedHTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        CappedRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def install(policy: FetchPolicy) -> None:
    """Route every ``urllib.request.urlopen`` of this process (img2dataset's) through the policy."""
    urllib.request.install_opener(build_opener(policy))
