"""A socket guard for tests: no connection may leave loopback, in any process.

``install()`` wraps ``socket.socket.connect``/``connect_ex``/``sendto`` and
``socket.getaddrinfo``: a non-loopback destination (or a name lookup that would go to
DNS) is refused before any packet is sent and written to ``$TAPIR_NETGUARD_LOG``. The
test session puts this folder on PYTHONPATH, so ``sitecustomize`` installs it in every
Python process the tests start: the CLI, Ray's dashboard, raylet-spawned workers.

``ROUTES`` and ``FAKE_DNS`` let a test pretend a public host exists: a name resolves to
a public address, and a connection to that address is delivered to a loopback server.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time

FAKE_DNS: dict[str, str] = {}              # hostname -> public IP (tests only)
ROUTES: dict[tuple[str, int], tuple[str, int]] = {}  # (public IP, port) -> loopback (host, port)
ATTEMPTS: list[tuple[str, object]] = []    # every refused attempt in this process

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _log(line: str) -> None:
    path = os.environ.get("TAPIR_NETGUARD_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} pid={os.getpid()} {line} cmd={_cmdline()[:300]}\n")


def _cmdline() -> str:
    try:
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return " ".join(sys.argv)


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _refuse(what: str, dest) -> None:
    ATTEMPTS.append((what, dest))
    _log(f"VIOLATION {what} {dest!r}")
    raise ConnectionRefusedError(f"netguard: refused {what} to non-loopback {dest!r}")


def _check(sock, address, what):
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return address
    host, port = address[0], address[1]
    if (host, port) in ROUTES:
        return ROUTES[(host, port)]
    if not _is_loopback(host):
        _refuse(what, address)
    return address


_real = {}


def install() -> None:
    if _real:
        return
    _real.update(connect=socket.socket.connect, connect_ex=socket.socket.connect_ex,
                 sendto=socket.socket.sendto, getaddrinfo=socket.getaddrinfo)

    def connect(self, address):
        return _real["connect"](self, _check(self, address, "connect"))

    def connect_ex(self, address):
        return _real["connect_ex"](self, _check(self, address, "connect"))

    def sendto(self, data, *args):
        address = args[-1]
        _check(self, address, "sendto")
        return _real["sendto"](self, data, *args)

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else (host or "")
        if name in FAKE_DNS:
            name = FAKE_DNS[name]
        else:
            try:
                ipaddress.ip_address(name.split("%", 1)[0])
            except ValueError:
                if name.lower() not in _LOCAL_NAMES and name != socket.gethostname():
                    _refuse("dns lookup", name)
        return _real["getaddrinfo"](name, port, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.getaddrinfo = getaddrinfo
    _log("installed")
