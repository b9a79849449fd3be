"""Fetching a catalog image URL without letting the catalog reach inside the network (SSRF).

A marketplace's catalog is partly written by sellers, and the workers fetch its image URLs from inside the
shop's network. A URL that leads to a **loopback, private, link-local, carrier-grade NAT, multicast, reserved
or unspecified address, or to a cloud metadata endpoint** is refused with its reason
(:class:`~indexing.errors.ImageRefusedError`), whether it names the address directly (``http://127.0.0.1``,
``http://[::ffff:10.0.0.1]``, ``http://2130706433``), through a DNS answer or through a redirect, unless the
:class:`UrlPolicy` allows that network (a shop's own image host; setting ``image_url_allow_networks``).

The check holds for the address actually connected to: the host is resolved **once**, every answer is checked
(one refused answer refuses the URL: a name that answers both a public and a private address is a rebinding
attempt), and the connection goes to a checked IP, never to the name again (HTTPS still verifies the
certificate and sends SNI for the name). Redirects are followed by hand, at most ``max_redirects``, and every
hop is checked the same way. Proxies from the environment are not used: a proxy would connect on our behalf
to an address we never checked.

Cloud metadata addresses (``169.254.169.254``, ``fd00:ec2::254``, ``169.254.170.2``, ``100.100.100.200``,
``168.63.129.16``) stay refused even inside an allowed network, unless the allow-list names that very address
(``169.254.169.254/32``).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urljoin, urlsplit

from indexing.errors import ConfigError, ImageError, ImageRefusedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

URL_SCHEMES = ("http", "https")
DEFAULT_MAX_REDIRECTS = 5
REDIRECT_CODES = (301, 302, 303, 307, 308)
#: well-known cloud instance-metadata / platform endpoints (AWS IPv4/IPv6 and ECS, GCP/Azure/OpenStack via 169.254.169.254,
#: Alibaba Cloud, Azure WireServer)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 carrier-grade NAT: not global, not "private" to Python
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``["10.1.0.0/16", "127.0.0.2"]`` -> networks (a bare address is its own /32 or /128); ConfigError names a bad entry."""
    out = []
    for v in values:
        s = str(v).strip()
        try:
            out.append(ipaddress.ip_network(s, strict=True))
        except ValueError as e:
            raise ConfigError(f"image URL allow-list entry {v!r} is not an IP network in CIDR form (e.g. 10.1.0.0/16): {e}") from None
    return tuple(out)


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``), else itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_kind(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public address (``"loopback"``, ``"private"``, ``"cloud metadata"``...), or None when it is."""
    ip = _unwrap(ip)
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "carrier-grade NAT (shared)"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-public"
    return None


@dataclass(frozen=True)
class UrlPolicy:
    """Which addresses image URLs may connect to: public ones, plus ``allow_networks``."""

    allow_networks: tuple[IPNetwork, ...] = ()
    max_redirects: int = DEFAULT_MAX_REDIRECTS

    @classmethod
    def from_strings(cls, networks: Iterable[str] = (), *, max_redirects: int = DEFAULT_MAX_REDIRECTS) -> "UrlPolicy":
        if max_redirects < 0:
            raise ConfigError(f"max_redirects must be >= 0, got {max_redirects}")
        return cls(parse_networks(networks), max_redirects)

    def refusal(self, ip: IPAddress) -> str | None:
        """The kind of a refused address (see :func:`address_kind`), or None when ``ip`` may be connected to."""
        kind = address_kind(ip)
        if kind is None:
            return None
        for addr in {ip, _unwrap(ip)}:
            for net in self.allow_networks:
                if addr.version != net.version or addr not in net:
                    continue
                if kind == "cloud metadata" and net.num_addresses != 1:
                    continue  # a metadata endpoint must be named on its own, not swept in by a broad range
                return None
        return kind


DEFAULT_POLICY = UrlPolicy()


def resolve_checked(host: str, port: int, policy: UrlPolicy, ref: str) -> list[IPAddress]:
    """Resolve ``host`` once; every answer must pass ``policy`` (ImageRefusedError names the address and why)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise ImageError(f"image URL {ref!r} is unreachable: cannot resolve {host!r} ({e})") from None
    addrs: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if ip not in addrs:
            addrs.append(ip)
    if not addrs:
        raise ImageError(f"image URL {ref!r} is unreachable: {host!r} has no address")
    for ip in addrs:
        kind = policy.refusal(ip)
        if kind is not None:
            via = "is" if _is_literal(host) else "resolves to"
            raise ImageRefusedError(
                f"image URL {ref!r} refused: host {host!r} {via} {ip}, a {kind} address "
                "(allow its network with the setting image_url_allow_networks)"
            )
    return addrs


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to ``host`` that connects to the already checked ``ip`` (the name is not resolved again)."""

    def __init__(self, host: str, port: int, ip: IPAddress, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((str(self._ip), self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: IPAddress, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((str(self._ip), self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # certificate checked for the name


def _split(url: str, ref: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ImageRefusedError(f"image URL {ref!r} refused: {url!r} has unsupported scheme {parts.scheme!r}; allowed: {', '.join(URL_SCHEMES)}")
    host = parts.hostname
    if not host:
        raise ImageError(f"image URL {ref!r} has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise ImageError(f"image URL {ref!r} has a bad port: {e}") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port, target


def fetch_url(ref: str, *, policy: UrlPolicy = DEFAULT_POLICY, max_bytes: int, timeout_s: float) -> bytes:
    """The body of ``ref`` (an http/https URL) within ``max_bytes``: every hop's address checked by ``policy``."""
    url = ref
    for hop in range(policy.max_redirects + 1):
        scheme, host, port, target = _split(url, ref)
        addrs = resolve_checked(host, port, policy, ref if hop == 0 else f"{ref} (redirected to {url})")
        conn_cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        last: Exception | None = None
        for ip in addrs:  # the checked answers in resolver order; the name is never resolved again
            conn = conn_cls(host, port, ip, timeout_s)
            try:
                conn.request("GET", target, headers={"User-Agent": "fusionrank-indexer", "Accept": "image/*"})
                resp = conn.getresponse()
            except (socket.timeout, TimeoutError):
                conn.close()
                raise ImageError(f"image URL {ref!r} is unreachable: timed out after {timeout_s:g} s") from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                last = e
                continue
            break
        else:
            raise ImageError(f"image URL {ref!r} is unreachable: {last}") from None
        try:
            if resp.status in REDIRECT_CODES:
                location = resp.getheader("Location")
                if not location:
                    raise ImageError(f"image URL {ref!r} is unreachable: HTTP {resp.status} without a Location")
                url = urljoin(url, location.strip())
                continue
            if resp.status != 200:
                raise ImageError(f"image URL {ref!r} is unreachable: HTTP {resp.status} {resp.reason}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"image URL {ref!r} is too large: {int(length)} bytes (limit {max_bytes})")
            try:
                data = resp.read(max_bytes + 1)
            except (socket.timeout, TimeoutError):
                raise ImageError(f"image URL {ref!r} is unreachable: timed out after {timeout_s:g} s") from None
            except (OSError, http.client.HTTPException) as e:
                raise ImageError(f"image URL {ref!r} is unreachable: {e}") from None
            if len(data) > max_bytes:
                raise ImageError(f"image URL {ref!r} is too large: more than {max_bytes} bytes")
            return data
        finally:
            conn.close()
    raise ImageError(f"image URL {ref!r} is unreachable: more than {policy.max_redirects} redirects")


__all__ = ["DEFAULT_POLICY", "METADATA_ADDRESSES", "UrlPolicy", "address_kind", "fetch_url", "parse_networks", "resolve_checked"]
