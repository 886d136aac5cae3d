"""`image.url` → encoded bytes, without SSRF: validated addresses only, bounded size and time.

Every hop (the event's URL, then each redirect) is checked the same way before anything is sent:

1. the URL: http or https, no credentials, a host that is a DNS name or a canonical IP literal.
   Browsers (WHATWG) read `0x7f.1`, `2130706433` and `0177.0.0.1` as 127.0.0.1; such spellings
   are refused outright rather than interpreted;
2. the name: on the allowlist when one is set; `localhost` and names under it refused;
3. the addresses: resolved once, and every one must be globally routable, or inside a network
   the operator allowed explicitly (an on-prem object store). IPv6 forms that carry an IPv4
   address (mapped, compatible, 6to4, Teredo, NAT64) are judged by that address too;
4. the connection: aiohttp connects only to the addresses of step 3, through a resolver pinned
   to them, so a second DNS answer (rebinding) is never used.

Bodies are streamed with a byte cap (a declared Content-Length over it is refused before
reading), compressed transfer encodings are not undone (a gzip bomb stays a few KiB of
undecodable bytes), and connect, read and total time are bounded. The content type is whatever
the bytes say: the decoder sniffs them, headers are not trusted. Environment proxies are ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from service.core.errors import FetchFailed, FetchTimeout, ImageTooLarge, UrlForbidden
from service.core.events import shown_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolve = Callable[[str, int], Awaitable[list[IPAddress]]]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
# WHATWG URL parsing treats a host whose last label is a number (decimal, or hex with 0x) as
# an IPv4 address in any of its spellings.
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def _networks(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# Named for the dead letter's message; anything else not globally routable is refused too.
_FORBIDDEN: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = (
    ("loopback", _networks("127.0.0.0/8", "::1/128")),
    ("private", _networks("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")),
    ("link-local (cloud metadata lives here)", _networks("169.254.0.0/16", "fe80::/10")),
    ("carrier-grade NAT", _networks("100.64.0.0/10")),
    ("multicast", _networks("224.0.0.0/4", "ff00::/8")),
    ("unspecified", _networks("0.0.0.0/8", "::/128")),
    # RFC 8215 local-use NAT64 leads to private networks, wherever it puts the IPv4 address.
    ("local-use NAT64", _networks("64:ff9b:1::/48")),
    (
        "reserved",
        _networks(
            "240.0.0.0/4",
            "192.0.0.0/24",
            "192.0.2.0/24",
            "198.18.0.0/15",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "2001:db8::/32",
            "fec0::/10",
        ),
    ),
)
# IPv6 prefixes whose last 32 bits are an IPv4 address: IPv4-compatible (deprecated), SIIT's
# IPv4-translated (RFC 2765) and well-known NAT64 (RFC 6052).
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_IPV4_IN_LAST_32_BITS = _networks("::ffff:0:0:0/96", "64:ff9b::/96")


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 5.0
    total_timeout_s: float = 15.0
    max_redirects: int = 3
    allowed_hosts: frozenset[str] = frozenset()
    """Empty: any public host. Otherwise exact names, or `*.example.com` for its subdomains."""
    allowed_networks: tuple[IPNetwork, ...] = ()
    """Networks fetched from although not public (e.g. an on-prem object store)."""
    user_agent: str = "guardstream"


@dataclass(frozen=True)
class Target:
    url: URL
    host: str
    """Lower case, IDNA-encoded, without a trailing dot; an IP literal without brackets."""
    port: int
    literal: IPAddress | None


def parse_allowed_networks(text: str) -> tuple[IPNetwork, ...]:
    """`10.0.0.0/8, fd00::/8` → networks; raises ValueError on a bad one."""
    return tuple(ipaddress.ip_network(part.strip()) for part in text.split(",") if part.strip())


def parse_allowed_hosts(text: str) -> frozenset[str]:
    return frozenset(part.strip().lower().rstrip(".") for part in text.split(",") if part.strip())


def check_url(url: str | URL, limits: FetchLimits) -> Target:
    """The URL's target, or UrlForbidden saying why it is not fetched."""
    try:
        parsed = url if isinstance(url, URL) else parse_url(url)
        port = parsed.port
    except ValueError as exc:
        raise UrlForbidden(f"not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise UrlForbidden(f"only http and https URLs are fetched, not {parsed.scheme or '(none)'}")
    if parsed.user is not None or parsed.password is not None:
        raise UrlForbidden("URLs with credentials are not fetched")
    raw = parsed.raw_host
    if not raw or port is None:
        raise UrlForbidden("the URL has no host")
    host = raw.lower()
    literal = _literal_address(host)
    if literal is None:
        host = host.removesuffix(".")  # the root label; `a..b` and `a..` stay invalid
        _check_name(host)
    if limits.allowed_hosts and not _host_allowed(host, limits.allowed_hosts):
        raise UrlForbidden(f"host {host} is not on the allowlist")
    if literal is not None:
        _check_address(literal, limits.allowed_networks, host)
    return Target(url=parsed, host=host, port=port, literal=literal)


_AUTHORITY = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:)?//([^/?#]*)")


def parse_url(text: str) -> URL:
    """yarl's URL, refusing what yarl would silently reinterpret: a bracketed host that is not
    an IPv6 address (`[v1.x]`, an IPvFuture literal, comes out as the DNS name `v1.x`)."""
    authority = _AUTHORITY.match(text)
    if authority and "[" in authority[1]:
        bracketed = authority[1].partition("[")[2].partition("]")[0]
        if ":" not in bracketed:
            raise UrlForbidden(f"host [{bracketed}] is not an IPv6 address")
    return URL(text)


def _literal_address(host: str) -> IPAddress | None:
    """The address an IP-literal host names; refuses every spelling but the canonical one."""
    if "%" in host:
        raise UrlForbidden(f"host {host!r}: percent-encoding and zone ids are not accepted")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise UrlForbidden(f"host {host!r} is not a valid IPv6 address") from None
    last = host.rstrip(".").rsplit(".", 1)[-1]
    if not _NUMERIC_LABEL.match(last):
        return None
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        address = None
    if address is None or str(address) != host:
        raise UrlForbidden(
            f"host {host!r} is an IP address in a non-canonical spelling; write it as a.b.c.d"
        )
    return address


def _check_name(host: str) -> None:
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise UrlForbidden(f"host {host!r} is not a valid DNS name")
    if labels[-1] == "localhost":
        raise UrlForbidden(f"host {host!r} is local")


def _host_allowed(host: str, allowed: frozenset[str]) -> bool:
    return host in allowed or any(
        entry.startswith("*.") and host.endswith(entry[1:]) for entry in allowed
    )


def address_refusal(address: IPAddress, allowed_networks: Sequence[IPNetwork] = ()) -> str | None:
    """Why a connection to `address` is refused, or None when it may be made.

    An allowed network opens exactly its addresses: an IPv6 address that carries an allowed
    IPv4 one (6to4, NAT64, ...) is another route, and is judged without the allowance.
    """
    if any(address in network for network in allowed_networks):
        return None
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = address_refusal(embedded)
        return None if reason is None else f"{reason} ({embedded} inside {address})"
    for reason, networks in _FORBIDDEN:
        if any(address in network for network in networks):
            return reason
    return None if address.is_global else "not globally routable"


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    last_32_bits = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in network for network in _IPV4_IN_LAST_32_BITS):
        return last_32_bits
    # `::` and `::1` are IPv6's own unspecified and loopback addresses, not IPv4-compatible.
    if address in _IPV4_COMPATIBLE and int(address) > 1:
        return last_32_bits
    return None


def _check_address(address: IPAddress, allowed: Sequence[IPNetwork], host: str) -> None:
    reason = address_refusal(address, allowed)
    if reason is not None:
        shown = host if host == str(address) else f"{host} ({address})"
        raise UrlForbidden(f"{shown} is {reason}; not fetched")


async def system_resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses the system resolver gives for `host` (one lookup; TCP)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


class _PinnedResolver(AbstractResolver):
    """aiohttp's resolver, answering only with addresses the fetcher validated.

    A name is pinned for the duration of one request (counted, since requests for one host
    may overlap); aiohttp asking for any other name is refused. IP literals never reach a
    resolver in aiohttp, and are validated before the request instead.
    """

    def __init__(self) -> None:
        self._pins: dict[tuple[str, int], tuple[list[IPAddress], int]] = {}

    @contextmanager
    def pinned(self, host: str, port: int, addresses: list[IPAddress]) -> Iterator[None]:
        key = (host, port)
        _, count = self._pins.get(key, ([], 0))
        self._pins[key] = (addresses, count + 1)
        try:
            yield
        finally:
            current, count = self._pins[key]
            if count <= 1:
                del self._pins[key]
            else:
                self._pins[key] = (current, count - 1)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        pin = self._pins.get((host.lower().rstrip("."), port))
        if pin is None:
            raise OSError(f"{host}:{port} was not validated for this request")
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=socket.IPPROTO_TCP,
                flags=socket.AI_NUMERICHOST,
            )
            for address in pin[0]
        ]

    async def close(self) -> None:
        self._pins.clear()


@dataclass
class Fetcher:
    """Fetches image URLs under `limits`; one per process, closed at shutdown."""

    limits: FetchLimits
    max_connections: int = 64
    resolve: Resolve = system_resolve
    _resolver: _PinnedResolver = field(default_factory=_PinnedResolver, init=False)
    _session: aiohttp.ClientSession | None = field(default=None, init=False)

    async def fetch(self, url: str) -> bytes:
        """The body of `url` (after at most `max_redirects` validated redirects)."""
        try:
            async with asyncio.timeout(self.limits.total_timeout_s):
                return await self._follow(url)
        except TimeoutError:
            raise FetchTimeout(
                f"fetching {shown_url(url)} took longer than {self.limits.total_timeout_s:g}s"
            ) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _follow(self, url: str) -> bytes:
        current: str | URL = url
        for _ in range(self.limits.max_redirects + 1):
            target = check_url(current, self.limits)
            addresses = await self._addresses(target)
            with self._resolver.pinned(target.host, target.port, addresses):
                location = await self._get(target)
            if isinstance(location, bytes):
                return location
            current = target.url.join(location)
        raise FetchFailed(
            f"{shown_url(url)}: more than {self.limits.max_redirects} redirects; not followed"
        )

    async def _addresses(self, target: Target) -> list[IPAddress]:
        if target.literal is not None:
            return [target.literal]
        try:
            addresses = await self.resolve(target.host, target.port)
        except OSError as exc:
            raise FetchFailed(f"cannot resolve {target.host}: {exc}") from None
        if not addresses:
            raise FetchFailed(f"{target.host} has no addresses")
        for address in addresses:
            _check_address(address, self.limits.allowed_networks, target.host)
        return addresses

    async def _get(self, target: Target) -> bytes | URL:
        """The body, or where a redirect points."""
        shown = shown_url(target.url)
        try:
            async with self._client().get(target.url, allow_redirects=False) as response:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchFailed(f"{shown}: HTTP {response.status} without a Location")
                    try:
                        return parse_url(location)
                    except ValueError as exc:
                        raise UrlForbidden(f"{shown} redirects to an invalid URL: {exc}") from None
                if response.status != 200:
                    raise FetchFailed(f"{shown}: HTTP {response.status} {response.reason or ''}")
                return await self._read(response, shown)
        except aiohttp.ServerTimeoutError as exc:
            raise FetchTimeout(f"{shown}: {exc or 'timed out'}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise FetchFailed(f"{shown}: {type(exc).__name__}: {exc}") from None

    async def _read(self, response: aiohttp.ClientResponse, shown: str) -> bytes:
        limit = self.limits.max_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            raise ImageTooLarge(f"{shown} declares {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise ImageTooLarge(f"{shown} sent more than {limit} bytes; the limit")
        return bytes(body)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=self._resolver,
                use_dns_cache=False,
                limit=self.max_connections,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self.limits.connect_timeout_s,
                    sock_read=self.limits.read_timeout_s,
                ),
                headers={
                    "User-Agent": self.limits.user_agent,
                    "Accept": "image/*",
                    "Accept-Encoding": "identity",
                },
                auto_decompress=False,
                trust_env=False,
            )
        return self._session
