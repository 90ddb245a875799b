"""Hardened HTTP fetching for the download stage.

img2dataset fetches with ``urllib.request.urlopen`` and no scheme, address or size
checks. Tapir keeps img2dataset's downloader and installs an opener (urllib's own
extension point, ``urllib.request.install_opener``) in each download worker that:

- speaks only http and https (no ``file:``, ``ftp:``, ``data:``), and no proxies;
- resolves the host itself and refuses loopback, private, link-local (cloud metadata
  included), multicast, unspecified and reserved addresses, then connects to the
  vetted address, so what is checked is what is connected to (no DNS rebinding);
  every redirect hop goes through the same check;
- puts one wall-clock deadline over each URL, set when its request starts: connect, TLS
  handshake, status line, headers, body and every redirect hop. The socket enforces it on
  every blocking call, so a server that answers ``100 Continue`` forever, dribbles header
  bytes or never answers ends as a timeout at the deadline;
- caps redirects and bytes read (declared and actual);
- raises errors whose ``str()`` starts with a tag Tapir sets, ``tapir:<reason>``
  (``tapir:http_404``, ``tapir:timeout``, ``tapir:connection_error``...), taken from the
  status code or the exception's type, never from the server's reason phrase. img2dataset
  records only ``str(err)``; ``pipeline.download.classify`` reads the tag.

``FetchPolicy.allow_loopback`` is the only switch: it opens loopback for tests and the
demo. Nothing else turns the checks off.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import math
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

TAG = "tapir:"  # every error this module raises starts with TAG + reason
REFUSED = TAG + "refused"  # refused_address, refused_scheme
TOO_LARGE = TAG + "too_many_bytes"
DEADLINE = TAG + "timeout"


class FetchError(OSError):
    """A failed fetch with its class: ``str()`` is ``tapir:<reason> <detail>``."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{TAG}{reason} {detail}".rstrip())

    def __reduce__(self):  # OSError's would rebuild it from the message: tagged twice
        return type(self), (self.reason, self.detail)


class FetchRefused(FetchError):
    """The fetcher refused a URL or an address before connecting."""


@dataclass(frozen=True)
class FetchPolicy:
    allow_loopback: bool = False
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    deadline: float = 30.0  # seconds for one URL, all of it (download.fetch.read_deadline)


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
    raise FetchRefused("refused_address", f"{kind} address {ip}")


# -- one deadline per URL, enforced by the socket ------------------------------------------


class _Deadline:
    """Socket mixin: every blocking call waits at most until ``deadline`` (``time.monotonic()``),
    and at most ``op_timeout`` (the caller's per-call timeout); past the deadline a call raises
    ``tapir:timeout``. Set per call, so no sequence of calls (a status line, headers, a body
    read byte by byte) outlasts it."""

    deadline = math.inf
    op_timeout: float | None = None
    total = 0.0

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FetchError("timeout", f"not done within the {self.total:g}s deadline")
        super().settimeout(left if self.op_timeout is None else min(self.op_timeout, left))

    def connect(self, *args):
        self._arm()
        return super().connect(*args)

    def send(self, *args):
        self._arm()
        return super().send(*args)

    def sendall(self, *args):
        self._arm()
        return super().sendall(*args)

    def recv(self, *args):
        self._arm()
        return super().recv(*args)

    def recv_into(self, *args):
        self._arm()
        return super().recv_into(*args)


class _DeadlineSocket(_Deadline, socket.socket):
    pass


class _DeadlineSSLSocket(_Deadline, ssl.SSLSocket):  # made by our SSLContext (its sslsocket_class)
    def do_handshake(self, *args):
        self._arm()
        return super().do_handshake(*args)

    def read(self, *args):
        self._arm()
        return super().read(*args)


def _vetted_connection(address, timeout, source_address, policy: FetchPolicy, deadline: float):
    """Resolve, vet every candidate address, connect to the first vetted one before ``deadline``."""
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise FetchError("dns_error", f"dns failure for {host}: {err}") from err
    for *_, sockaddr in infos:  # refuse if any record is refused: no mixed answers
        vet_address(sockaddr[0], policy)
    err = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = _DeadlineSocket(family, socktype, proto)
        sock.deadline, sock.total = deadline, policy.deadline
        sock.op_timeout = None if timeout is socket._GLOBAL_DEFAULT_TIMEOUT else timeout
        try:
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            err = exc
            sock.close()
    raise err or FetchError("dns_error", f"no address for {host}")


class CappedResponse(http.client.HTTPResponse):
    """An HTTP response whose body is capped in bytes; its read errors are tagged."""

    policy: FetchPolicy = FetchPolicy()

    def begin(self):
        super().begin()
        declared = self.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.policy.max_bytes:
            self.close()
            raise FetchError("too_many_bytes", f"declared {declared} bytes > cap {self.policy.max_bytes}")

    def read(self, amt=None):
        try:
            return super().read(amt) if amt is not None else self._read_capped()
        except FetchError:
            raise
        except Exception as err:  # the body's errors, by type (img2dataset calls read() outside the opener)
            self.close()
            raise tagged(err) from err

    def _read_capped(self) -> bytes:
        chunks, total = [], 0
        while True:
            chunk = self.read1(65536)
            if not chunk:
                if self.length:  # closed before its Content-Length: read1 says nothing, read() would
                    raise http.client.IncompleteRead(b"".join(chunks), self.length)
                return b"".join(chunks)
            total += len(chunk)
            if total > self.policy.max_bytes:
                self.close()
                raise FetchError("too_many_bytes", f"more than {self.policy.max_bytes} bytes")
            chunks.append(chunk)


# -- tags: a failure's class from its status code or exception type -----------------------

_BY_TYPE = [  # first match wins; order matters where classes nest
    (TimeoutError, "timeout"),  # socket.timeout is TimeoutError
    (socket.gaierror, "dns_error"),
    (ssl.SSLCertVerificationError, "tls_error"),
    ((ssl.SSLEOFError, ssl.SSLZeroReturnError), "connection_error"),
    (ssl.SSLError, "tls_error"),
    ((http.client.InvalidURL, UnicodeError, ValueError), "invalid_url"),
    ((ConnectionError, http.client.IncompleteRead, EOFError), "connection_error"),  # reset, refused, closed early
    (http.client.HTTPException, "bad_response"),  # a malformed status line, an overlong header...
    (OSError, "connection_error"),  # unreachable network, and the like
]


def status_reason(code: int) -> str:
    if code == 404 or code == 429:
        return f"http_{code}"
    return "http_5xx" if 500 <= code < 600 else f"http_{code}"


def tagged(err: BaseException) -> FetchError:
    """The :class:`FetchError` for an exception raised while fetching (itself if already one)."""
    if isinstance(err, FetchError):
        return err
    if isinstance(err, urllib.error.HTTPError):  # before URLError, its base class
        phrase = str(err.reason)[:80]  # the server's words: shown, never read
        return FetchError(status_reason(err.code), f"HTTP Error {err.code} ({phrase!r})")
    if isinstance(err, urllib.error.URLError):
        if isinstance(err.reason, BaseException):  # urllib wraps the connect phase's errors
            return tagged(err.reason)
        return FetchError("invalid_url", str(err.reason)[:200])  # 'no host given'
    detail = f"{type(err).__name__}: {err}"[:300]
    for types, reason in _BY_TYPE:
        if isinstance(err, types):
            return FetchError(reason, detail)
    return FetchError("other", detail)


# -- the opener ---------------------------------------------------------------------------


def _deadline_of(req: urllib.request.Request, policy: FetchPolicy) -> float:
    """The URL's deadline: set when its first request starts, carried along its redirects."""
    if getattr(req, "tapir_deadline", None) is None:
        req.tapir_deadline = time.monotonic() + policy.deadline
    return req.tapir_deadline


def _connection_classes(policy: FetchPolicy):
    response = type("PolicyResponse", (CappedResponse,), {"policy": policy})

    def init(self, *args, deadline: float | None = None, **kwargs):
        super(type(self), self).__init__(*args, **kwargs)
        deadline = deadline or time.monotonic() + policy.deadline
        self._deadline = deadline

        def create(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *a, **k):
            return _vetted_connection(address, timeout, source_address, policy, deadline)

        self._create_connection = create  # http.client sets this per instance in __init__

    def tls_connect(self):
        """HTTPSConnection.connect, with the handshake under the URL's deadline too."""
        http.client.HTTPConnection.connect(self)  # the vetted TCP connection
        sock = self._context.wrap_socket(self.sock, server_hostname=self.host, do_handshake_on_connect=False)
        sock.deadline, sock.total, sock.op_timeout = self._deadline, policy.deadline, self.sock.op_timeout
        self.sock = sock
        sock.do_handshake()

    attrs = {"response_class": response, "__init__": init}
    http_cls = type("VettedHTTPConnection", (http.client.HTTPConnection,), attrs)
    https_cls = type("VettedHTTPSConnection", (http.client.HTTPSConnection,), attrs | {"connect": tls_connect})
    return http_cls, https_cls


class _TaggingOpener(urllib.request.OpenerDirector):
    """An OpenerDirector whose errors are all :class:`FetchError` (tagged by code or type)."""

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        try:
            return super().open(fullurl, data, timeout)
        except FetchError:
            raise
        except Exception as err:
            if isinstance(err, urllib.error.HTTPError):
                err.close()  # its body is not read: free the connection
            raise tagged(err) from err


def build_opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    """An opener that only speaks vetted http(s); usable directly or installed globally."""
    http_cls, https_cls = _connection_classes(policy)
    context = ssl.create_default_context()  # certificates and host names verified
    context.sslsocket_class = _DeadlineSSLSocket

    class VettedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(functools.partial(http_cls, deadline=_deadline_of(req, policy)), req)

    class VettedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(functools.partial(https_cls, deadline=_deadline_of(req, policy)), req,
                                context=self._context)

    class CappedRedirectHandler(urllib.request.HTTPRedirectHandler):
        max_redirections = policy.max_redirects + 1  # ours is the limit that counts

        def http_error_302(self, req, fp, code, msg, headers):
            target = headers.get("location") or headers.get("uri")
            if target:  # checked before urllib's own check, whose message carries the server's phrase
                scheme = urllib.parse.urlparse(urllib.parse.urljoin(req.full_url, target)).scheme.lower()
                if scheme not in ("http", "https"):
                    raise FetchRefused("refused_scheme", f"redirect to scheme {scheme!r}")
            try:
                return super().http_error_302(req, fp, code, msg, headers)
            except urllib.error.HTTPError as err:  # urllib's loop detection (later hops' errors come tagged)
                raise FetchError("redirect_loop", f"redirect loop at HTTP {code}") from err

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if len(getattr(req, "redirect_dict", {})) >= policy.max_redirects:  # urllib lets the first one by
                raise FetchError("redirect_loop", f"more than {policy.max_redirects} redirect(s)")
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None:
                new.tapir_deadline = getattr(req, "tapir_deadline", None)  # one deadline for all hops
            return new

    class RefuseOtherSchemes(urllib.request.BaseHandler):
        def unknown_open(self, req):
            raise FetchRefused("refused_scheme", f"scheme {req.type!r}")

    opener = _TaggingOpener()
    for handler in (
        urllib.request.ProxyHandler({}),  # never route through an environment proxy
        RefuseOtherSchemes(),
        VettedHTTPHandler(),
        VettedHTTPSHandler(context=context),
        urllib.request.HTTPDefaultErrorHandler(),
        CappedRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def install(policy: FetchPolicy) -> None:
    """Route every ``urllib.request.urlopen`` of this process (img2dataset's) through the policy."""
    urllib.request.install_opener(build_opener(policy))
