"""Fetching image URLs: what is refused before any connection, and how real servers on
loopback are read (byte cap, timeouts, redirects re-validated, one DNS answer used)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from service.adapters.fetch import (
    Fetcher,
    FetchLimits,
    IPAddress,
    address_refusal,
    check_url,
    parse_allowed_hosts,
    parse_allowed_networks,
)
from service.core.errors import FetchFailed, FetchTimeout, ImageTooLarge, UrlForbidden
from service.core.events import shown_url

LIMITS = FetchLimits(max_bytes=10_000)

# --- Refused from the URL alone --------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://127.1/a.png",
        "http://2130706433/a.png",
        "http://0x7f000001/a.png",
        "http://0x7f.0.0.1/a.png",
        "http://0177.0.0.1/a.png",
        "http://017700000001/a.png",
        "http://127.0.0.1./a.png",
        "http://[::1]/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "http://[::ffff:7f00:1]/a.png",
        "http://[::127.0.0.1]/a.png",
        "http://[2002:7f00:1::]/a.png",
        "http://[64:ff9b::a9fe:a9fe]/a.png",
        "http://[fe80::1]/a.png",
        "http://[fe80::1%25eth0]/a.png",
        "http://[fc00::1]/a.png",
        "http://[::]/a.png",
        "http://0.0.0.0/a.png",
        "http://10.0.0.1/a.png",
        "http://172.16.5.4/a.png",
        "http://192.168.1.1/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/a.png",
        "http://224.0.0.1/a.png",
        "http://255.255.255.255/a.png",
        "http://localhost/a.png",
        "http://LOCALHOST./a.png",
        "http://api.localhost/a.png",
        "http://%31%32%37.0.0.1/a.png",
        "http://user:secret@images.example.com/a.png",
        "ftp://images.example.com/a.png",
        "file:///etc/passwd",
        "http:///a.png",
        "http://a..b/a.png",
        "http://-bad-.example.com/a.png",
        "http://images.example.com:99999/a.png",
        "http://[v1.x]/a.png",
    ],
)
def test_forbidden_or_malformed_urls_are_refused_before_any_lookup(url: str) -> None:
    with pytest.raises(UrlForbidden):
        check_url(url, LIMITS)


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("https://images.example.com/u/1.jpg", "images.example.com", 443),
        ("http://Images.Example.COM.:8080/x", "images.example.com", 8080),
        ("https://münchen.example/x", "xn--mnchen-3ya.example", 443),
        ("http://93.184.216.34/x", "93.184.216.34", 80),
        ("http://[2606:2800:220:1:248:1893:25c8:1946]/x", "2606:2800:220:1:248:1893:25c8:1946", 80),
    ],
)
def test_public_urls_are_accepted_with_a_normalised_host(url: str, host: str, port: int) -> None:
    target = check_url(url, LIMITS)

    assert (target.host, target.port) == (host, port)


def test_private_literal_inside_an_allowed_network_is_accepted() -> None:
    limits = FetchLimits(max_bytes=1, allowed_networks=parse_allowed_networks("10.20.0.0/16"))

    assert check_url("http://10.20.3.4/x", limits).literal == ipaddress.ip_address("10.20.3.4")
    with pytest.raises(UrlForbidden, match="private"):
        check_url("http://10.21.3.4/x", limits)


def test_an_allowed_network_does_not_open_ipv6_routes_to_it() -> None:
    allowed = parse_allowed_networks("127.0.0.2/32")

    assert address_refusal(ipaddress.ip_address("127.0.0.2"), allowed) is None
    for wrapped in ("2002:7f00:2::", "::ffff:127.0.0.2", "64:ff9b::7f00:2"):
        assert address_refusal(ipaddress.ip_address(wrapped), allowed) is not None


def test_allowlist_admits_exact_names_and_wildcard_subdomains_only() -> None:
    limits = FetchLimits(
        max_bytes=1, allowed_hosts=parse_allowed_hosts("cdn.example.com, *.img.example")
    )

    check_url("https://cdn.example.com/a", limits)
    check_url("https://eu.img.example/a", limits)
    for url in ("https://example.com/a", "https://img.example/a", "https://evilimg.example/a"):
        with pytest.raises(UrlForbidden, match="allowlist"):
            check_url(url, limits)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("fd12::1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.100.100.200", "carrier-grade NAT"),
        ("239.1.1.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("198.18.0.1", "reserved"),
        ("::ffff:10.0.0.1", "private (10.0.0.1 inside ::ffff:a00:1)"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback (127.0.0.1 inside"),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),
        ("::ffff:0:7f00:1", "loopback (127.0.0.1 inside"),
        ("64:ff9b::", "unspecified (0.0.0.0 inside"),
        ("64:ff9b:1::a00:1", "local-use NAT64"),
        ("64:ff9b::808:808", None),
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
    ],
)
def test_address_refusal_names_the_range(address: str, reason: str | None) -> None:
    refusal = address_refusal(ipaddress.ip_address(address))

    assert refusal is None if reason is None else reason in (refusal or "")


def test_messages_never_show_the_query_of_a_signed_url() -> None:
    shown = shown_url("https://bucket.example/a.png?X-Amz-Signature=secret#frag")

    assert shown == "https://bucket.example/a.png"


def test_bad_allowed_networks_are_a_settings_error() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        parse_allowed_networks("10.0.0.0/33")


# --- Against real servers on loopback ---------------------------------------------------------

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


@dataclass
class Server:
    """An aiohttp app on 127.0.0.2 (allowed in these tests) and the requests it saw."""

    port: int = 0
    seen: list[str] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.2") -> str:
        return f"http://{host}:{self.port}{path}"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    made = Server()

    async def image(request: web.Request) -> web.StreamResponse:
        return web.Response(body=PNG, content_type="text/html")  # type deliberately wrong

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.query["to"])

    async def loop(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/loop")

    async def missing(request: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while True:
            await response.write(b"\0" * 65536)

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while True:
            await response.write(b"\0")
            await asyncio.sleep(0.2)

    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    async def declared(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "999999999"})
        await response.prepare(request)
        return response

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        made.seen.append(request.path)
        return await handler(request)

    app = web.Application(middlewares=[record])
    for path, handle in [
        ("/a.png", image),
        ("/redirect", redirect),
        ("/loop", loop),
        ("/missing", missing),
        ("/endless", endless),
        ("/drip", drip),
        ("/silent", silent),
        ("/declared", declared),
    ]:
        app.router.add_get(path, handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.2", 0)
    await site.start()
    made.port = runner.addresses[0][1]
    try:
        yield made
    finally:
        await runner.cleanup()


def _fetcher(**changes: object) -> Fetcher:
    values: dict[str, object] = {
        "max_bytes": 100_000,
        "read_timeout_s": 1.0,
        "total_timeout_s": 2.0,
        "allowed_networks": parse_allowed_networks("127.0.0.2/32"),
        **changes,
    }
    return Fetcher(FetchLimits(**values))  # type: ignore[arg-type]


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    made = _fetcher()
    yield made
    await made.close()


async def test_fetches_the_body_whatever_its_declared_type(
    fetcher: Fetcher, server: Server
) -> None:
    assert await fetcher.fetch(server.url("/a.png")) == PNG


async def test_redirects_are_followed_and_each_hop_revalidated(
    fetcher: Fetcher, server: Server
) -> None:
    hop = server.url("/a.png")
    assert await fetcher.fetch(server.url(f"/redirect?to={hop}")) == PNG

    into_loopback = server.url("/a.png", host="127.0.0.1")
    with pytest.raises(UrlForbidden, match="loopback"):
        await fetcher.fetch(server.url(f"/redirect?to={into_loopback}"))
    with pytest.raises(UrlForbidden, match="link-local"):
        await fetcher.fetch(server.url("/redirect?to=http://169.254.169.254/"))
    assert server.seen.count("/a.png") == 1


async def test_a_redirect_loop_ends_after_the_limit(fetcher: Fetcher, server: Server) -> None:
    with pytest.raises(FetchFailed, match="more than 3 redirects"):
        await fetcher.fetch(server.url("/loop"))

    assert server.seen.count("/loop") == 4


async def test_http_errors_fail_the_fetch(fetcher: Fetcher, server: Server) -> None:
    with pytest.raises(FetchFailed, match="HTTP 404"):
        await fetcher.fetch(server.url("/missing"))


@pytest.mark.parametrize(
    ("path", "error"), [("/endless", ImageTooLarge), ("/declared", ImageTooLarge)]
)
async def test_bodies_over_the_cap_are_refused(
    fetcher: Fetcher, server: Server, path: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await fetcher.fetch(server.url(path))


@pytest.mark.parametrize("path", ["/drip", "/silent"])
async def test_slow_servers_time_out(fetcher: Fetcher, server: Server, path: str) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(FetchTimeout):
        await fetcher.fetch(server.url(path))
    assert loop.time() - started < 3.0


async def test_nothing_listening_fails_the_fetch(fetcher: Fetcher) -> None:
    with pytest.raises(FetchFailed):
        await fetcher.fetch("http://127.0.0.2:9/a.png")


async def test_connects_only_to_the_one_validated_answer(server: Server) -> None:
    """DNS rebinding: the name is resolved once per hop and that answer is what aiohttp uses."""
    lookups: list[str] = []

    async def rebinding(host: str, port: int) -> list[IPAddress]:
        lookups.append(host)
        first = len(lookups) == 1
        return [ipaddress.ip_address("127.0.0.2" if first else "127.0.0.1")]

    fetcher = Fetcher(_fetcher().limits, resolve=rebinding)
    try:
        assert await fetcher.fetch(f"http://images.test:{server.port}/a.png") == PNG
        assert lookups == ["images.test"]
        with pytest.raises(UrlForbidden, match="loopback"):
            await fetcher.fetch(f"http://images.test:{server.port}/a.png")
    finally:
        await fetcher.close()


async def test_a_name_with_any_forbidden_address_is_refused(server: Server) -> None:
    async def mixed(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("10.0.0.1")]

    fetcher = Fetcher(_fetcher().limits, resolve=mixed)
    try:
        with pytest.raises(UrlForbidden, match="private"):
            await fetcher.fetch(f"http://images.test:{server.port}/a.png")
    finally:
        await fetcher.close()
    assert server.seen == []


async def test_unresolvable_names_fail_the_fetch() -> None:
    async def nxdomain(host: str, port: int) -> list[IPAddress]:
        raise OSError(f"{host}: Name or service not known")

    fetcher = Fetcher(_fetcher().limits, resolve=nxdomain)
    try:
        with pytest.raises(FetchFailed, match="cannot resolve"):
            await fetcher.fetch("https://images.invalid/a.png")
    finally:
        await fetcher.close()


# --- Properties --------------------------------------------------------------------------------

_ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


def _spellings(address: ipaddress.IPv4Address) -> list[str]:
    """What WHATWG URL parsing (and inet_aton) would read as `address`, canonical form excluded."""
    number, octets = int(address), address.packed
    return [
        str(number),
        hex(number),
        ".".join(f"0{b:o}" for b in octets),
        ".".join(hex(b) for b in octets),
        f"{octets[0]}.{int.from_bytes(octets[1:], 'big')}",
        f"{octets[0]}.{octets[1]}.{int.from_bytes(octets[2:], 'big')}",
    ]


@settings(max_examples=300, deadline=None)
@given(_ipv4)
def test_every_address_is_accepted_only_canonically_spelt_and_public(
    address: ipaddress.IPv4Address,
) -> None:
    for spelling in _spellings(address):
        if spelling == str(address):
            continue
        with pytest.raises(UrlForbidden, match="non-canonical"):
            check_url(f"http://{spelling}/a.png", LIMITS)
    for url in (f"http://{address}/a.png", f"http://[::ffff:{address}]/a.png"):
        if address_refusal(address) is None:
            assert check_url(url, LIMITS).literal is not None
        else:
            with pytest.raises(UrlForbidden):
                check_url(url, LIMITS)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300) | st.from_regex(r"\Ahttps?://[^/]{0,60}/[ -~]{0,40}\Z"))
def test_any_text_is_a_target_or_url_forbidden(url: str) -> None:
    try:
        target = check_url(url, LIMITS)
    except UrlForbidden:
        return
    assert target.url.scheme in ("http", "https")
    assert target.literal is None or address_refusal(target.literal) is None
