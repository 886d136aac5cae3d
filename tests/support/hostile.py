"""Hostile input for the whole service: events that must each end as exactly one known outcome.

`hostile_events(prefix, servers)` builds the cases family by family (malformed JSON, every
wrong type for every field, oversized records and metadata, invalid base64, truncated and
forged images, bombs, polyglots, unsupported formats, every forbidden address in every
spelling, redirects into forbidden ranges, misbehaving servers). Each `Hostile` names the
dead-letter code it must end with, or `VERDICT` for input that is odd but legitimately judged.

The servers the URL cases point at run on loopback in the test's own event loop:

- `Canary` (127.0.0.1 and ::1, one port) counts every TCP connection it accepts. The service is
  not allowed to reach it, so every URL and redirect aimed at it must be refused before
  connecting: its count must stay 0.
- `ImageServer` (aiohttp, 127.0.0.2) is the one allowed network (`ALLOWED_NETWORKS`): good
  images, error statuses, redirect chains, slow-loris and endless bodies, huge lengths.
- `RawServer` (asyncio, 127.0.0.2) misbehaves below HTTP: silence, dripped headers, garbage.

The expected codes follow `service/core/events.py`, `service/core/images.py` and
`service/adapters/fetch.py` under the limits in `LIMITS`; a case whose code depends on a limit
says so in its name.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import ipaddress
import struct
import zipfile
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import web
from PIL import Image
from yarl import URL

import service.core.heif  # noqa: F401  (registers the HEIC encoder the cases are made with)

VERDICT = "verdict"
"""The expectation of an event that is judged: a verdict, whatever its rating."""

KiB = 1024
ALLOWED_HOST = "127.0.0.2"
ALLOWED_NETWORKS = f"{ALLOWED_HOST}/32"
CANARY_HOST = "127.0.0.1"

# Small limits keep the run quick and make every limit reachable with small records.
LIMITS: dict[str, Any] = {
    "max_event_bytes": 256 * KiB,
    "max_image_bytes": 128 * KiB,
    "max_image_pixels": 4_000_000,
    "max_image_side": 4096,
    "max_metadata_bytes": 4096,
    "fetch_connect_timeout_s": 1.0,
    "fetch_read_timeout_s": 1.0,
    "fetch_total_timeout_s": 2.5,
    "fetch_max_redirects": 3,
    "fetch_allowed_networks": ALLOWED_NETWORKS,
}
MAX_EVENT_BYTES: int = LIMITS["max_event_bytes"]
MAX_IMAGE_BYTES: int = LIMITS["max_image_bytes"]
MAX_REDIRECTS: int = LIMITS["fetch_max_redirects"]

DRIP_INTERVAL_S = 0.4
"""Under the read timeout, so only the total timeout can end a drip."""
SERVE_AT_MOST_S = 30.0
"""How long an 'endless' response lasts if the client never hangs up (bounds test teardown)."""


@dataclass(frozen=True)
class Hostile:
    name: str
    value: bytes | None
    """The record value; None is a tombstone."""
    expect: str
    """The dead-letter code the event must end with, or VERDICT."""
    event_id: str | None
    """What the outcome's `event_id` must be (sent as the `event-id` header too), if any."""


# --- images ---------------------------------------------------------------------------------


def _encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _noise(width: int, height: int, seed: int = 4) -> Image.Image:
    # Noise does not compress, so a cut anywhere lands inside the pixel data.
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
    return Image.fromarray(pixels)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, pixels: bytes = b"\x00") -> bytes:
    """A well-formed 8-bit greyscale PNG whose header says width x height, whatever follows."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(pixels, 9))
        + _png_chunk(b"IEND", b"")
    )


def gif_declaring(
    screen: tuple[int, int], frame: tuple[int, int] = (1, 1), at: tuple[int, int] = (0, 0)
) -> bytes:
    """A GIF with a logical screen and one 1-pixel-of-data frame of the given sizes."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", *screen, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b"\x2c"
        + struct.pack("<HHHHB", *at, *frame, 0)
        + b"\x02\x02\x44\x01\x00"
        + b"\x3b"
    )


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to width x height."""
    jpeg = bytearray(_encoded(Image.new("L", (8, 8)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg)


def _bmp_declaring(width: int, height: int) -> bytes:
    """A small BMP whose info header is rewritten (negative height: stored top-down)."""
    bmp = bytearray(_encoded(Image.new("RGB", (4, 4)), "BMP"))
    bmp[18:26] = struct.pack("<ii", width, height)
    return bytes(bmp)


def _tiff_declaring(width: int, height: int) -> bytes:
    """A little-endian TIFF, 8-bit greyscale, one strip of one byte, declaring width x height."""
    tags = [
        (256, 4, width),  # ImageWidth, LONG
        (257, 4, height),  # ImageLength
        (258, 3, 8),  # BitsPerSample, SHORT
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # PhotometricInterpretation: black is zero
        (273, 4, 0),  # StripOffsets, patched below
        (278, 4, height),  # RowsPerStrip
        (279, 4, 1),  # StripByteCounts
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    data_offset = 8 + ifd_size
    entries = b"".join(
        struct.pack("<HHI", tag, kind, 1)
        + (
            struct.pack("<I", data_offset if tag == 273 else value)
            if kind == 4
            else struct.pack("<HH", value, 0)
        )
        for tag, kind, value in tags
    )
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + b"\0" * 5


def _jpeg_with_comment(comment: bytes) -> bytes:
    jpeg = _encoded(_noise(16, 16), "JPEG")
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return jpeg[:2] + segment + jpeg[2:]


def _gifar() -> bytes:
    """A GIF with a ZIP archive appended: readers of either format accept the file."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("Evil.class", b"\xca\xfe\xba\xbe" + b"\0" * 64)
    return _encoded(_noise(16, 16).convert("P"), "GIF") + archive.getvalue()


def _gif_js_polyglot() -> bytes:
    """GIF89a/*...*/=alert(1): JavaScript that is a GIF. `/*` makes the width 10799 pixels."""
    body = gif_declaring((0x2A2F, 10))[10:]  # everything after the screen's width and height
    return b"GIF89a/*\x0a\x00" + body + b"*/=alert(document.domain);"


def good_png() -> bytes:
    return _encoded(_noise(64, 48), "PNG")


def good_jpeg() -> bytes:
    return _encoded(_noise(64, 48), "JPEG", quality=80)


def one_pixel(fmt: str, mode: str = "RGB") -> bytes:
    return _encoded(Image.new(mode, (1, 1)), fmt)


GZIP_BOMB_UNPACKED = 64 * 1024 * 1024
"""64 MiB of zeros: about 64 KiB gzipped, under max_image_bytes."""


def gzip_bomb() -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as packed:
        zeros = b"\0" * (1024 * 1024)
        for _ in range(GZIP_BOMB_UNPACKED // len(zeros)):
            packed.write(zeros)
    return out.getvalue()


def image_cases() -> list[tuple[str, bytes, str]]:
    """Images sent inline: (name, encoded bytes, expected code)."""
    png = good_png()
    gifar = _gifar()
    cases: list[tuple[str, bytes, str]] = [
        # 1x1 in every format: odd, but an image; the guard judges it.
        *[(f"1x1 {fmt}", one_pixel(fmt), VERDICT) for fmt in ("PNG", "JPEG", "BMP", "TIFF")],
        ("1x1 WEBP", one_pixel("WEBP"), VERDICT),
        ("1x1 GIF", one_pixel("GIF", "P"), VERDICT),
        ("1x1 transparent PNG", one_pixel("PNG", "RGBA"), VERDICT),
        ("1x1 bilevel PNG", one_pixel("PNG", "1"), VERDICT),
        # Every side over max_image_side (4096), in every format that can say so.
        ("100000x1 PNG", _encoded(Image.new("L", (100_000, 1)), "PNG"), "image_too_large"),
        ("1x100000 PNG", _encoded(Image.new("L", (1, 100_000)), "PNG"), "image_too_large"),
        ("65535x1 GIF", _encoded(Image.new("P", (65_535, 1)), "GIF"), "image_too_large"),
        ("16383x1 WEBP", _encoded(Image.new("RGB", (16_383, 1)), "WEBP"), "image_too_large"),
        ("65500x1 JPEG", _encoded(Image.new("L", (65_500, 1)), "JPEG"), "image_too_large"),
        ("100000x1 BMP header", _bmp_declaring(100_000, 1), "image_too_large"),
        ("1x-100000 top-down BMP header", _bmp_declaring(1, -100_000), "image_too_large"),
        ("100000x1 TIFF header", _tiff_declaring(100_000, 1), "image_too_large"),
        # Bombs: a few bytes declaring billions of pixels.
        ("PNG bomb 100000x100000", png_declaring(100_000, 100_000), "image_too_large"),
        ("PNG bomb 2^32-1 square", png_declaring(2**32 - 1, 2**32 - 1), "image_too_large"),
        ("PNG 4000x4000 (over max_image_pixels)", png_declaring(4000, 4000), "image_too_large"),
        ("GIF bomb 65535x65535 screen", gif_declaring((65_535, 65_535)), "image_too_large"),
        (
            "GIF frame far outside a 10x10 screen",
            gif_declaring((10, 10), (60_000, 60_000)),
            "image_too_large",
        ),
        (
            "GIF frame offset 65000,65000",
            gif_declaring((10, 10), at=(65_000, 65_000)),
            "image_too_large",
        ),
        ("JPEG bomb 65500x65500", _jpeg_declaring(65_500, 65_500), "image_too_large"),
        ("BMP bomb 100000x100000", _bmp_declaring(100_000, 100_000), "image_too_large"),
        ("TIFF bomb 65535x65535", _tiff_declaring(65_535, 65_535), "image_too_large"),
        # 2000x2000 zeros: 12 KiB that inflate to 12 MB, inside every limit, so judged.
        (
            "PNG 2000x2000 at the pixel limit",
            png_declaring(2000, 2000, b"\0" * 2000 * 2001),
            VERDICT,
        ),
        # Headers that cannot describe an image.
        ("PNG declaring 0x0", png_declaring(0, 0), "image_decode_failed"),
        ("PNG declaring 0x5", png_declaring(0, 5), "image_decode_failed"),
        ("PNG with a bad IHDR CRC", png[:29] + b"\0\0\0\0" + png[33:], "image_decode_failed"),
        # Truncated, at every depth: signature, header, pixel data.
        *[
            (f"PNG cut to {n} bytes", png[:n], "image_decode_failed")
            for n in (1, 8, 16, 33, 100, len(png) // 2, len(png) * 9 // 10)
        ],
        # Losing only the trailer leaves every pixel: decoders accept that.
        ("PNG without IEND", png[:-12], VERDICT),
        *_truncations(),
        *heif_cases(),
        # Polyglots: valid images carrying something else are judged as the image they are.
        ("GIFAR (GIF + ZIP)", gifar, VERDICT),
        ("PNG with HTML appended", png + b"<html><script>alert(1)</script></html>", VERDICT),
        (
            "JPEG with PHP in a comment",
            _jpeg_with_comment(b"<?php system($_GET['c']); ?>"),
            VERDICT,
        ),
        ("GIF/JavaScript polyglot (10799 wide)", _gif_js_polyglot(), "image_too_large"),
        ("PDF header then a PNG", b"%PDF-1.7\n%" + png, "unsupported_image_format"),
        (
            "PNG signature then a PDF",
            png[:8] + b"%PDF-1.7\n1 0 obj<<>>endobj",
            "image_decode_failed",
        ),
        (
            "HTML with a PNG inside",
            b"<html><body>" + png + b"</body></html>",
            "image_decode_failed",
        ),
        (
            "SVG with a script (BOM, leading blank lines)",
            b"\xef\xbb\xbf\n\n  <svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
            "unsupported_image_format",
        ),
        ("ZIP archive", gifar[gifar.index(b"PK\x03\x04") :], "image_decode_failed"),
        ("ELF executable", b"\x7fELF\x02\x01\x01" + b"\0" * 57, "image_decode_failed"),
        ("shell script", b"#!/bin/sh\nrm -rf /\n", "image_decode_failed"),
        ("gzip of a PNG", gzip.compress(png), "image_decode_failed"),
        ("a single zero byte", b"\0", "image_decode_failed"),
        ("exactly max_image_bytes of noise", _noise_bytes(MAX_IMAGE_BYTES), "image_decode_failed"),
        *_unsupported_formats(),
    ]
    return cases


def _heif(image: Image.Image, fmt: str) -> bytes:
    """HEIC (fmt "HEIF", pillow-heif's encoder, registered by service.core.heif) or AVIF."""
    return _encoded(image, fmt, quality=80)


def _declaring_ispe(encoded: bytes, width: int, height: int) -> bytes:
    """A HEIF file whose (first) `ispe` box, the size its header declares, says width x height."""
    patched = bytearray(encoded)
    at = patched.index(b"ispe") + 8  # type, version and flags
    patched[at : at + 8] = struct.pack(">II", width, height)
    return bytes(patched)


def heif_cases() -> list[tuple[str, bytes, str]]:
    """HEIC and AVIF: small ones judged; oversized ones refused from the header (however the
    size is said); malformed and truncated ones undecodable."""
    cases: list[tuple[str, bytes, str]] = []
    noise = _noise(64, 64)
    for name, fmt in (("HEIC", "HEIF"), ("AVIF", "AVIF")):
        whole = _heif(noise, fmt)
        small = _heif(Image.new("RGB", (96, 64), (20, 120, 200)), fmt)
        ftyp = whole[: struct.unpack(">I", whole[:4])[0]]
        cases += [
            (f"64x64 {name}", whole, VERDICT),
            (f"1x1 {name}", _heif(Image.new("RGB", (1, 1)), fmt), VERDICT),
            (f"transparent {name}", _heif(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), fmt), VERDICT),
            # Every way to be too large: a side, the pixels, past Pillow's bomb check, past
            # what libheif and libavif themselves accept, and 2^64 pixels.
            (f"{name} declaring 5000x1", _declaring_ispe(small, 5000, 1), "image_too_large"),
            (f"{name} declaring 3000x3000", _declaring_ispe(small, 3000, 3000), "image_too_large"),
            (
                f"{name} bomb 65535x65535",
                _declaring_ispe(small, 65_535, 65_535),
                "image_too_large",
            ),
            (f"{name} declaring 40000x1", _declaring_ispe(small, 40_000, 1), "image_too_large"),
            (
                f"{name} bomb 2^32-1 square",
                _declaring_ispe(small, 2**32 - 1, 2**32 - 1),
                "image_too_large",
            ),
            # Malformed: nothing after the file type, an empty size, garbage after the header.
            (f"{name} file type box only", ftyp, "image_decode_failed"),
            (f"{name} declaring 0x5", _declaring_ispe(small, 0, 5), "image_decode_failed"),
            (
                f"{name} header then garbage",
                whole[:64] + _noise_bytes(2000),
                "image_decode_failed",
            ),
            *[
                (f"{name} cut to {cut} of {len(whole)} bytes", whole[:cut], "image_decode_failed")
                for cut in (1, 12, len(whole) // 10, len(whole) // 2, len(whole) - 1)
            ],
        ]
    # x265 codes 48x32 as 64x64 and crops it with a `clap` box: a tiny crop of a huge coded
    # picture is as large as the coded picture (libheif decodes all of it first).
    cropped = _heif(Image.new("RGB", (48, 32), (200, 10, 10)), "HEIF")
    # Pictures coded larger than their header says: libavif would decode the AV1 picture at its
    # coded size (a few hundred bytes for 3000x3000); libheif refuses one past its own limit.
    flat = Image.new("RGB", (3000, 3000), (10, 200, 30))
    av1_lie = _declaring_ispe(_encoded(flat, "AVIF", speed=10), 64, 64)
    hevc_lie = _declaring_ispe(_heif(flat.resize((512, 512)), "HEIF"), 64, 64)
    cases += [
        ("HEIC 48x32 crop of 3000x3000", _declaring_ispe(cropped, 3000, 3000), "image_too_large"),
        ("AVIF coding 3000x3000, declaring 64x64", av1_lie, "image_too_large"),
        ("HEIC coding 512x512, declaring 64x64", hevc_lie, "image_decode_failed"),
    ]
    return cases


def _noise_bytes(size: int) -> bytes:
    return np.random.default_rng(size).integers(0, 256, size, np.uint8).tobytes()


def _truncations() -> list[tuple[str, bytes, str]]:
    noise = _noise(64, 64)
    cases = []
    for fmt in ("JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        whole = _encoded(noise.convert("P") if fmt == "GIF" else noise, fmt)
        for cut in (1, len(whole) // 10, len(whole) // 2):
            cases.append(
                (f"{fmt} cut to {cut} of {len(whole)} bytes", whole[:cut], "image_decode_failed")
            )
    whole_jpeg = _encoded(noise, "JPEG")
    cases.append(("JPEG missing its last byte", whole_jpeg[:-1], "image_decode_failed"))
    return cases


# Formats people send that are not decoded: recognised ones are named as unsupported, the
# rest (Pillow could read them, but only the allowed plugins ever see strangers' bytes) are
# undecodable.
def _unsupported_formats() -> list[tuple[str, bytes, str]]:
    small = Image.new("RGB", (16, 16), (200, 10, 10))
    named = [
        ("PDF", b"%PDF-1.7\n1 0 obj\n<< >>\nendobj\n"),
        ("PostScript", b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 1 1\n"),
        ("EPS (DOS binary)", b"\xc5\xd0\xd3\xc6" + b"\0" * 28),
        ("SVG", b"<svg xmlns='http://www.w3.org/2000/svg' width='1' height='1'/>"),
        ("SVG as XML", b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>"),
        ("SVG doctype", b"<!DOCTYPE svg><svg/>"),
        ("ICO", _encoded(small, "ICO")),
        ("PSD", b"8BPS\x00\x01" + b"\0" * 20),
        ("QOI", _encoded(small, "QOI")),
        ("DDS", _encoded(small, "DDS")),
        ("JPEG XL codestream", b"\xff\x0a" + b"\0" * 16),
        ("JPEG XL container", b"\x00\x00\x00\x0cJXL \r\n\x87\n"),
        ("JPEG 2000", _encoded(small, "JPEG2000")),
        ("JPEG 2000 codestream", b"\xffO\xffQ" + b"\0" * 16),
    ]
    unnamed = [
        (fmt, _encoded(small.convert(mode), fmt))
        for fmt, mode in (
            ("PPM", "RGB"),
            ("PCX", "RGB"),
            ("TGA", "RGB"),
            ("SGI", "RGB"),
            ("XBM", "1"),
            ("ICNS", "RGB"),
        )
    ]
    return [(f"{name} file", data, "unsupported_image_format") for name, data in named] + [
        (f"{name} file (Pillow reads it; not allowed)", data, "image_decode_failed")
        for name, data in unnamed
    ]


# --- addresses ------------------------------------------------------------------------------

# One address in every range fetch.py refuses, named as its dead letters name them.
FORBIDDEN_IPV4: tuple[tuple[str, str], ...] = (
    ("loopback", CANARY_HOST),
    ("private 10/8", "10.0.0.1"),
    ("private 172.16/12", "172.16.0.1"),
    ("private 192.168/16", "192.168.0.1"),
    ("link-local (cloud metadata)", "169.254.169.254"),
    ("carrier-grade NAT", "100.64.0.1"),
    ("multicast", "224.0.0.1"),
    ("unspecified", "0.0.0.0"),
    ("reserved 240/4", "240.0.0.1"),
    ("broadcast", "255.255.255.255"),
    ("IETF protocol assignments", "192.0.0.1"),
    ("TEST-NET-1", "192.0.2.1"),
    ("benchmarking", "198.18.0.1"),
    ("TEST-NET-2", "198.51.100.1"),
    ("TEST-NET-3", "203.0.113.1"),
)
FORBIDDEN_IPV6: tuple[tuple[str, str], ...] = (
    ("loopback", "::1"),
    ("loopback, long form", "0:0:0:0:0:0:0:1"),
    ("loopback, zero-padded", "0000:0000:0000:0000:0000:0000:0000:0001"),
    ("unspecified", "::"),
    ("link-local", "fe80::1"),
    ("unique local fc00::/8", "fc00::1"),
    ("unique local fd00::/8", "fd12:3456::1"),
    ("multicast", "ff02::1"),
    ("site-local (deprecated)", "fec0::1"),
    ("documentation", "2001:db8::1"),
    ("discard-only", "100::1"),
    ("ORCHID", "2001:10::1"),
    ("Teredo hiding 255.255.255.254", "2001::1"),
    ("IPv4-mapped unspecified", "::ffff:0:0"),
)
# Fullwidth forms sit 0xFEE0 above ASCII; IDNA (UTS 46) maps them back to digits and dots.
_FULLWIDTH = {ord(c): ord(c) + 0xFEE0 for c in "0123456789."}


def ipv4_spellings(address: str) -> dict[str, str]:
    """Every way a URL host can name `address` (IPv6 ones in brackets), by spelling name.

    WHATWG parsers read most of these as the address itself; `check_url` must refuse them all,
    canonical or not.
    """
    ip = ipaddress.IPv4Address(address)
    n = int(ip)
    a, b, *_ = ip.packed
    high, low = n >> 16, n & 0xFFFF
    spellings = {
        "dotted": address,
        "decimal": str(n),
        "hex": f"0x{n:08x}",
        "upper-case hex": f"0X{n:08X}",
        "octal": f"0{n:o}",
        "dotted hex": ".".join(f"0x{x:02x}" for x in ip.packed),
        "dotted octal": ".".join(f"0{x:o}" for x in ip.packed),
        "zero-padded": ".".join(f"{x:03d}" for x in ip.packed),
        "two parts": f"{a}.{n & 0xFFFFFF}",
        "three parts": f"{a}.{b}.{low}",
        "trailing dot": f"{address}.",
        "fullwidth digits": address.translate(_FULLWIDTH),
        "ideographic full stops": address.replace(".", "\u3002"),
        "IPv4-mapped": f"[::ffff:{address}]",
        "IPv4-mapped hex": f"[::ffff:{high:x}:{low:x}]",
        "IPv4-mapped long": f"[0:0:0:0:0:ffff:{address}]",
        "IPv4-compatible": f"[::{address}]",
        "NAT64": f"[64:ff9b::{address}]",
        "local-use NAT64": f"[64:ff9b:1::{address}]",
        "IPv4-translated (SIIT)": f"[::ffff:0:{address}]",
        "6to4": f"[2002:{high:x}:{low:x}::]",
        # Teredo: server 65.54.227.120, client stored inverted in the last 32 bits.
        "Teredo": f"[2001:0:4136:e378:8000:63bf:{~high & 0xFFFF:x}:{~low & 0xFFFF:x}]",
    }
    # 255.255.255.255 zero-padded is itself: keep each distinct spelling once.
    return {name: host for name, host in spellings.items() if name == "dotted" or host != address}


_LOCAL_NAMES = (
    "localhost",
    "LOCALHOST",
    "localhost.",
    "LocalHost.",
    "a.localhost",
    "a.b.localhost.",
    "localhost..",
)


def loopback_names_in_hosts_file(path: Path = Path("/etc/hosts")) -> list[str]:
    """Names this machine resolves to a loopback address without DNS (its hostname, often):
    they reach the canary unless the resolved address is checked."""
    names: list[str] = []
    for line in path.read_text().splitlines():
        address, *aliases = line.split("#", 1)[0].split()
        if not aliases or not ipaddress.ip_address(address).is_loopback:
            continue
        names += [a for a in aliases if a.lower().rstrip(".").split(".")[-1] != "localhost"]
    return list(dict.fromkeys(names))


# --- servers --------------------------------------------------------------------------------


class Canary:
    """Counts every TCP connection accepted on 127.0.0.1 and ::1 (one port): 0 is the pass."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        first = await asyncio.start_server(self._accepted, CANARY_HOST, 0)
        self.port = first.sockets[0].getsockname()[1]
        self._servers = [first]
        # Without IPv6 loopback, IPv6 spellings of it connect nowhere: nothing to count.
        with contextlib.suppress(OSError):
            self._servers.append(await asyncio.start_server(self._accepted, "::1", self.port))

    def _accepted(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()


def _connected(request: web.Request) -> bool:
    return request.transport is not None and not request.transport.is_closing()


class ImageServer:
    """The allowed server (aiohttp on 127.0.0.2): what a hostile image host answers.

    `/body/{name}`: a fixed body; `/status/{code}`; `/redirect/{status}?to=`: one redirect;
    `/chain/{n}?to=`: n redirects to itself, then one to `to`; `/hops/{n}`: n redirects, then a
    good PNG; `/loop`; `/no-location`; `/slow-loris` (a byte every DRIP_INTERVAL_S, also
    `/slow-loris-sized` with a Content-Length); `/endless`; `/huge-length`.
    """

    def __init__(self) -> None:
        self.url = URL()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/body/{name}", self._body)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/redirect/{status}", self._redirect)
        app.router.add_get("/chain/{n}", self._chain)
        app.router.add_get("/hops/{n}", self._hops)
        app.router.add_get("/loop", self._loop)
        app.router.add_get("/no-location", self._no_location)
        app.router.add_get("/slow-loris", self._slow_loris)
        app.router.add_get("/slow-loris-sized", self._slow_loris)
        app.router.add_get("/endless", self._endless)
        app.router.add_get("/huge-length", self._huge_length)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, ALLOWED_HOST, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = URL.build(scheme="http", host=ALLOWED_HOST, port=port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _body(self, request: web.Request) -> web.Response:
        served = served_bodies()[request.match_info["name"]]
        return web.Response(body=served.body, headers=served.headers)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    async def _redirect(self, request: web.Request) -> web.Response:
        status = int(request.match_info["status"])
        return web.Response(status=status, headers={"Location": request.query["to"]})

    async def _chain(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        to = request.query["to"]
        location = to if n == 0 else str(self.url.with_path(f"/chain/{n - 1}").with_query(to=to))
        return web.Response(status=302, headers={"Location": location})

    async def _hops(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=good_png(), content_type="image/png")
        return web.Response(status=302, headers={"Location": f"/hops/{n - 1}"})

    async def _loop(self, _request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/loop"})

    async def _no_location(self, _request: web.Request) -> web.Response:
        return web.Response(status=302)

    async def _slow_loris(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        if request.path.endswith("-sized"):
            response.content_length = 10_000
        await response.prepare(request)
        signature = good_png()
        await _write_while_connected(
            request, response, lambda i: signature[i % len(signature) : i % len(signature) + 1]
        )
        return response

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        await response.prepare(request)
        chunk = good_png()[:8] + b"\0" * (64 * KiB - 8)
        await _write_while_connected(request, response, lambda _: chunk, interval_s=0)
        return response

    async def _huge_length(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.content_length = 10**12
        await response.prepare(request)
        await _write_while_connected(request, response, lambda _: b"\0", interval_s=1.0)
        return response


async def _write_while_connected(
    request: web.Request,
    response: web.StreamResponse,
    chunk: Callable[[int], bytes],
    interval_s: float = DRIP_INTERVAL_S,
) -> None:
    """Write chunk(0), chunk(1), ... until the client hangs up (or SERVE_AT_MOST_S passed)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + SERVE_AT_MOST_S
    i = 0
    try:
        while _connected(request) and loop.time() < until:
            await response.write(chunk(i))
            i += 1
            await asyncio.sleep(interval_s)
    except ConnectionError:
        return  # the client hung up mid-write: what these endpoints wait for


class RawServer:
    """Misbehaves below HTTP (asyncio on 127.0.0.2), by request path: see `_BEHAVIOURS`."""

    def __init__(self) -> None:
        self.url = URL()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, ALLOWED_HOST, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = URL.build(scheme="http", host=ALLOWED_HOST, port=port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            await _BEHAVIOURS[path](reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up first: expected of every behaviour here
        finally:
            writer.close()
            self._writers.discard(writer)


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _until_hangup(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    """Accept the request and never answer."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SERVE_AT_MOST_S):
            while await reader.read(1024):
                pass


async def _drip_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A status line, then one byte of a header line every DRIP_INTERVAL_S, never ending it."""
    writer.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
    loop = asyncio.get_running_loop()
    until = loop.time() + SERVE_AT_MOST_S
    while loop.time() < until:
        try:
            if not await asyncio.wait_for(reader.read(1024), DRIP_INTERVAL_S):
                return
        except TimeoutError:
            writer.write(b"x")
            await writer.drain()


def _answer(data: bytes) -> Behaviour:
    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return answer


_OK = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
_BEHAVIOURS: dict[str, Behaviour] = {
    "/silent": _until_hangup,
    "/drip-headers": _drip_headers,
    "/hang-up": _answer(b""),
    "/ssh-banner": _answer(b"SSH-2.0-OpenSSH_9.6\r\n"),
    "/http-0.9": _answer(b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
    "/lying-length": _answer(_OK + b"Content-Length: 1000\r\n\r\n" + b"\x89PNG\r\n\x1a\n"),
    "/negative-length": _answer(_OK + b"Content-Length: -1\r\n\r\n"),
    "/two-lengths": _answer(_OK + b"Content-Length: 5\r\nContent-Length: 500000\r\n\r\nhello"),
    "/huge-header": _answer(_OK + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n"),
    "/many-headers": _answer(_OK + b"".join(b"X-%d: 1\r\n" % i for i in range(20_000)) + b"\r\n"),
    "/bad-chunking": _answer(_OK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"),
}


@dataclass(frozen=True)
class Servers:
    canary_port: int
    images: URL
    raw: URL
    closed: URL
    """An allowed address and port nothing listens on."""


@dataclass(frozen=True)
class Served:
    body: bytes
    headers: dict[str, str]
    expect: str


@cache
def served_bodies() -> dict[str, Served]:
    """What `/body/{name}` answers on the allowed server, and how fetching it must end.

    Headers are the server's word only: the decoder sniffs the bytes.
    """
    png = good_png()
    return {
        "good.png": Served(png, {"Content-Type": "image/png"}, VERDICT),
        "good.jpg": Served(good_jpeg(), {"Content-Type": "image/jpeg"}, VERDICT),
        "1x1.png": Served(one_pixel("PNG"), {"Content-Type": "image/png"}, VERDICT),
        "png-labelled-text": Served(png, {"Content-Type": "text/plain"}, VERDICT),
        "empty": Served(b"", {"Content-Type": "image/png"}, "image_decode_failed"),
        "truncated.png": Served(png[:100], {"Content-Type": "image/png"}, "image_decode_failed"),
        "html-as-png": Served(
            b"<!doctype html><html><body>not an image</body></html>",
            {"Content-Type": "image/png"},
            "image_decode_failed",
        ),
        "svg-as-png": Served(
            b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            {"Content-Type": "image/png"},
            "unsupported_image_format",
        ),
        "pdf-as-jpeg": Served(
            b"%PDF-1.7\n", {"Content-Type": "image/jpeg"}, "unsupported_image_format"
        ),
        "png-bomb": Served(
            png_declaring(100_000, 100_000), {"Content-Type": "image/png"}, "image_too_large"
        ),
        "gif-bomb": Served(
            gif_declaring((65_535, 65_535)), {"Content-Type": "image/gif"}, "image_too_large"
        ),
        "100000x1.png": Served(
            _encoded(Image.new("L", (100_000, 1)), "PNG"),
            {"Content-Type": "image/png"},
            "image_too_large",
        ),
        # The fetcher asks for identity and does not inflate: the decoder sees gzip's bytes.
        "gzip-bomb": Served(
            gzip_bomb(),
            {"Content-Type": "image/png", "Content-Encoding": "gzip"},
            "image_decode_failed",
        ),
        "gzipped-png": Served(
            gzip.compress(png),
            {"Content-Type": "image/png", "Content-Encoding": "gzip"},
            "image_decode_failed",
        ),
        "max_image_bytes-of-noise": Served(
            _noise_bytes(MAX_IMAGE_BYTES), {"Content-Type": "image/png"}, "image_decode_failed"
        ),
        "max_image_bytes-plus-one": Served(
            _noise_bytes(MAX_IMAGE_BYTES + 1), {"Content-Type": "image/png"}, "image_too_large"
        ),
    }


# --- events ---------------------------------------------------------------------------------

TINY_PNG_B64 = base64.b64encode(one_pixel("PNG")).decode()


class _Cases:
    """Collects cases; each event gets the id `<prefix><index>`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.cases: list[Hostile] = []

    def next_id(self) -> str:
        return f"{self.prefix}{len(self.cases):03d}"

    def raw(self, name: str, value: bytes | None, expect: str, event_id: str | None = None) -> None:
        self.cases.append(Hostile(name, value, expect, event_id))

    def event(self, name: str, expect: str, **fields: Any) -> None:
        """An event with a valid id and `fields` (a 1x1 PNG when no image is given)."""
        event_id = self.next_id()
        document = {"event_id": event_id, "image": {"data": TINY_PNG_B64}, **fields}
        self.raw(name, orjson.dumps(document), expect, event_id)

    def inline(self, name: str, image: bytes, expect: str) -> None:
        self.event(name, expect, image={"data": base64.b64encode(image).decode()})

    def url(self, name: str, url: str | URL, expect: str) -> None:
        self.event(name, expect, image={"url": str(url)})


def hostile_events(prefix: str, servers: Servers) -> list[Hostile]:
    """Every hostile case, with event ids starting with `prefix`."""
    cases = _Cases(prefix)
    _malformed_json(cases)
    _wrong_shapes(cases)
    _wrong_types(cases)
    _sizes(cases)
    _base64(cases)
    for name, image, expect in image_cases():
        cases.inline(f"inline {name}", image, expect)
    _odd_but_valid(cases)
    _forbidden_urls(cases, servers.canary_port)
    _hostile_servers(cases, servers)
    return cases.cases


def _malformed_json(cases: _Cases) -> None:
    valid = orjson.dumps({"event_id": "x", "image": {"data": TINY_PNG_B64}})
    for name, value in {
        "empty value": b"",
        "whitespace only": b" \n\t ",
        "lone brace": b"{",
        "half an event": valid[: len(valid) // 2],
        "trailing comma": b'{"event_id": "x",}',
        "single quotes": b"{'event_id': 'x'}",
        "missing comma": b'{"event_id": "x" "image": {}}',
        "garbage after the object": valid + b" trailing",
        "two objects": valid + valid,
        "NaN": b'{"event_id": NaN}',
        "Infinity": b'{"event_id": "x", "metadata": {"n": Infinity}}',
        "number overflowing a double": b'{"event_id": "x", "metadata": {"n": 1e999}}',
        "comment": b'// producer v2\n{"event_id": "x"}',
        "byte order mark": b"\xef\xbb\xbf" + valid,
        "UTF-16": '{"event_id": "x"}'.encode("utf-16"),
        "invalid UTF-8": b'{"event_id": "\xff\xfe"}',
        "lone surrogate escape": b'{"event_id": "\\ud800"}',
        "raw control character": b'{"event_id": "a\x01b"}',
        "unterminated string": b'{"event_id": "x',
        "nested 2000 deep": b"[" * 2000 + b"]" * 2000,
        "NUL bytes": b"\0" * 64,
        "a PNG as the record": good_png(),
        "Python repr": b"{'event_id': 'x', 'image': None}",
        "XML": b"<event><event_id>x</event_id></event>",
    }.items():
        cases.raw(f"not JSON: {name}", value, "invalid_json")


def _wrong_shapes(cases: _Cases) -> None:
    for name, value in {
        "array": b"[1, 2, 3]",
        "empty array": b"[]",
        "string": b'"image"',
        "number": b"42",
        "null": b"null",
        "true": b"true",
        "empty object": b"{}",
        "only image": orjson.dumps({"image": {"data": TINY_PNG_B64}}),
    }.items():
        cases.raw(f"not an event: {name}", value, "invalid_event")
    cases.raw("tombstone (no value)", None, "invalid_event")
    # Invalid, but its id can still be read: the dead letter carries it back.
    event_id = cases.next_id()
    cases.raw(
        "not an event: only event_id",
        orjson.dumps({"event_id": event_id}),
        "invalid_event",
        event_id,
    )
    for name, image in {
        "empty": {},
        "both data and url": {"data": TINY_PNG_B64, "url": "https://example.com/a.png"},
        "data and an extra key": {"data": TINY_PNG_B64, "format": "png"},
        "url and an extra key": {"url": "https://example.com/a.png", "headers": {"X": "1"}},
        "unknown source": {"path": "/etc/passwd"},
    }.items():
        cases.event(f"image object: {name}", "invalid_event", image=image)
    for key in ("extra", "Event_Id", "eventId", "__proto__", "constructor", "image_url", "", "\0"):
        cases.event(f"unknown top-level field {key!r}", "invalid_event", **{key: 1})
    cases.event("schema_version 2", "invalid_event", schema_version=2)


# Every JSON type, for every field; the values a field accepts are skipped per field below.
_WRONG_VALUES: dict[str, Any] = {
    "null": None,
    "true": True,
    "false": False,
    "zero": 0,
    "negative": -1,
    "float": 1.5,
    # orjson writes no integer past 64 bits: the text goes in as it is.
    "huge integer": orjson.Fragment(b"18446744073709551616"),
    "string": "x",
    "empty string": "",
    "array": [],
    "array of one": ["x"],
    "object": {},
}
_ACCEPTED: dict[str, set[str]] = {
    "schema_version": set(),
    "event_id": {"string"},
    "image": set(),
    "image.data": set(),
    "image.url": set(),
    "policy_id": {"null"},
    "metadata": {"object"},
    "created_at": {"null"},
}
# Accepted by the schema, but failing later with another code.
_LATER: dict[tuple[str, str], str] = {("policy_id", "string"): "unknown_policy"}


def _wrong_types(cases: _Cases) -> None:
    for field, accepted in _ACCEPTED.items():
        for kind, value in _WRONG_VALUES.items():
            if kind in accepted:
                continue
            expect = _LATER.get((field, kind), "invalid_event")
            name = f"{field} is {kind}"
            if field == "event_id":
                # No usable id: the dead letter has none either.
                document = {"event_id": value, "image": {"data": TINY_PNG_B64}}
                cases.raw(name, orjson.dumps(document), expect)
            elif field.startswith("image."):
                cases.event(name, expect, image={field.removeprefix("image."): value})
            else:
                cases.event(name, expect, **{field: value})


def _sizes(cases: _Cases) -> None:
    big = "x" * 100_000
    cases.raw("event_id of 257 characters", orjson.dumps({"event_id": "e" * 257}), "invalid_event")
    cases.raw(
        "event_id of 100000 characters",
        orjson.dumps({"event_id": big, "image": {"data": TINY_PNG_B64}}),
        "invalid_event",
    )
    cases.event("policy_id of 65 characters", "invalid_event", policy_id="p" * 65)
    cases.event("policy_id of 100000 characters", "invalid_event", policy_id=big)
    cases.event("policy_id path traversal", "invalid_event", policy_id="../../etc/passwd")
    cases.event("url of 2049 characters", "invalid_event", image={"url": "http://a/" + "a" * 2040})
    cases.event("url of 100000 characters", "invalid_event", image={"url": "https://" + big})
    cases.event("created_at of 100000 characters", "invalid_event", created_at=big)
    # metadata is capped at 4096 bytes of compact JSON: {"k":"…"} is 8 bytes around the value.
    cases.event("metadata one byte over its limit", "invalid_event", metadata={"k": "m" * 4089})
    cases.event("metadata of 100000 bytes", "invalid_event", metadata={"k": big})
    cases.event("metadata key of 100000 bytes", "invalid_event", metadata={big: 1})
    cases.event(
        "metadata with 5000 keys", "invalid_event", metadata={str(i): i for i in range(5000)}
    )
    cases.event("metadata nested 300 deep", "invalid_event", metadata={"k": _nested(300)})
    cases.event("metadata nested 1000 deep", "invalid_event", metadata={"k": _nested(1000)})
    cases.event("unknown field of 20000 items", "invalid_event", extra=list(range(20_000)))
    event_id = cases.next_id()
    head = orjson.dumps({"event_id": event_id, "image": {"data": TINY_PNG_B64}})
    # Trailing blanks are valid JSON: the record's size is all that differs.
    cases.raw(
        "record of max_event_bytes",
        head + b" " * (MAX_EVENT_BYTES - len(head)),
        VERDICT,
        event_id,
    )
    event_id = cases.next_id()
    head = orjson.dumps({"event_id": event_id, "image": {"data": TINY_PNG_B64}})
    cases.raw(
        "record one byte over max_event_bytes",
        head + b" " * (MAX_EVENT_BYTES + 1 - len(head)),
        "event_too_large",
        event_id,
    )
    cases.raw(
        "record of 2x max_event_bytes, not JSON", b"\xff" * 2 * MAX_EVENT_BYTES, "event_too_large"
    )
    event_id = cases.next_id()
    cases.raw(
        "record over max_event_bytes in an unknown field",
        orjson.dumps({"event_id": event_id, "pad": "p" * MAX_EVENT_BYTES}),
        "event_too_large",
        event_id,
    )
    cases.inline(
        "inline image one byte over max_image_bytes",
        _noise_bytes(MAX_IMAGE_BYTES + 1),
        "image_too_large",
    )
    cases.inline(
        "inline image 1.2x max_image_bytes",
        _noise_bytes(MAX_IMAGE_BYTES * 6 // 5),
        "image_too_large",
    )


def _nested(depth: int) -> orjson.Fragment:
    # Deeper than orjson (or json) will write: spliced in as text.
    return orjson.Fragment(b"[" * depth + b"]" * depth)


def _base64(cases: _Cases) -> None:
    for name, data in {
        "not base64 at all": "@@not base64@@",
        "missing padding": "AAA",
        "five characters": "AAAAA",
        "data after padding": "AA==AA",
        "only padding": "====",
        "one padding character": "=",
        "trailing newline": base64.b64encode(good_png()).decode() + "\n",
        "line-wrapped (MIME)": base64.encodebytes(good_png()).decode(),
        "leading space": " " + TINY_PNG_B64,
        "URL-safe alphabet": base64.urlsafe_b64encode(b"\xfb\xff\xfe" * 20).decode(),
        "non-ASCII": "ÄÖÜä",
        "NUL inside": "AA\0A",
        "a data: URL": "data:image/png;base64," + TINY_PNG_B64,
    }.items():
        cases.event(f"image.data {name}", "invalid_event", image={"data": data})
    for name, data in {"one zero byte": "AA==", "three bytes, extra padding": "AAAA===="}.items():
        cases.event(f"image.data {name}", "image_decode_failed", image={"data": data})


def _odd_but_valid(cases: _Cases) -> None:
    """Strange events the contract allows: they must be judged, not dead-lettered."""
    cases.event("policy_id in the wrong case", "unknown_policy", policy_id="LLAVAGUARD-V1.2")
    cases.event("schema_version 1.0", VERDICT, schema_version=1.0)
    cases.event("created_at year 1 at +23:59", VERDICT, created_at="0001-01-01T00:00:00+23:59")
    cases.event("metadata exactly at its limit", VERDICT, metadata={"k": "m" * 4088})
    for name, event_id in {
        "NUL, newline and RTL override": "\0\n\u202e-evil",
        "256 characters": "i" * 256,
        "emoji and zero-width joiners": "🧑\u200d💻" * 20,
    }.items():
        document = {"event_id": event_id, "image": {"data": TINY_PNG_B64}}
        cases.raw(f"event_id with {name}", orjson.dumps(document), VERDICT, event_id)


def _forbidden_urls(cases: _Cases, canary_port: int) -> None:
    """Every forbidden address in every spelling, on the canary's port: refused, never dialled."""
    for range_name, address in FORBIDDEN_IPV4:
        for spelling, host in ipv4_spellings(address).items():
            url = f"http://{host}:{canary_port}/"
            name = f"{range_name} {address} as {spelling}: {url}"
            cases.url(name, url, "url_forbidden")
    for range_name, address in FORBIDDEN_IPV6:
        cases.url(f"IPv6 {range_name}", f"http://[{address}]:{canary_port}/", "url_forbidden")
    for name in (*_LOCAL_NAMES, *loopback_names_in_hosts_file()):
        cases.url(f"name {name!r}", f"http://{name}:{canary_port}/", "url_forbidden")
    canary = f"{CANARY_HOST}:{canary_port}"
    for name, url in {
        "upper-case scheme": f"HTTP://{canary}/",
        "https": f"https://{canary}/",
        "credentials": f"http://user:secret@{canary}/",
        "a name as user": f"http://images.example.com@{canary}/",
        "the target as user": f"http://{canary}@images.example.com/",
        "empty credentials": f"http://:@{canary}/",
        "backslash in the authority": f"http://images.example.com\\@{canary}/",
        "percent-encoded host": f"http://%31%32%37.0.0.1:{canary_port}/",
        "IPv6 zone id": f"http://[fe80::1%25lo]:{canary_port}/",
        "unclosed IPv6 bracket": "http://[::1",
        "no host": "http://",
        "no host, a path": "http:///image.png",
        "only a port": f"http://:{canary_port}/",
        "port out of range": "http://127.0.0.1:99999/",
        "five-part address": "http://1.2.3.4.5/",
        "octet over 255": "http://256.0.0.1/",
        "bare 0x": "http://0x/",
        "space in the host": "http://images example.com/",
        "label starting with a hyphen": "http://-images.example.com/",
        "empty label": "http://images..example.com/",
        "label of 64 characters": f"http://{'a' * 64}.example.com/",
        "name of 300 characters": f"http://{'a.' * 150}com/",
        "host invalid under NFKC": "http://\u2100.example.com/",
    }.items():
        cases.url(f"URL {name}", url, "url_forbidden")
    # Refused by the event contract before any fetching is considered.
    for name, url in {
        "ftp": f"ftp://{canary}/a.png",
        "file": "file:///etc/passwd",
        "gopher": f"gopher://{canary}/_",
        "dict": f"dict://{canary}/",
        "data": "data:image/png;base64," + TINY_PNG_B64,
        "javascript": "javascript:alert(1)",
        "protocol-relative": f"//{canary}/",
        "leading space": f" http://{canary}/",
        "backslashes": f"http:\\\\{canary}\\",
        "one slash": f"http:/{canary}/",
        "empty": "",
    }.items():
        cases.url(f"image.url {name}", url, "invalid_event")


def _hostile_servers(cases: _Cases, servers: Servers) -> None:
    images, raw = servers.images, servers.raw
    canary = f"{CANARY_HOST}:{servers.canary_port}"
    for name, served in served_bodies().items():
        cases.url(f"served {name}", images / "body" / name, served.expect)
    cases.url(
        "served with credentials in the URL",
        images.with_user("u").with_password("p") / "body" / "good.png",
        "url_forbidden",
    )
    cases.url(
        "https to a plain-HTTP server",
        images.with_scheme("https") / "body" / "good.png",
        "fetch_failed",
    )
    cases.url("a port nothing listens on", servers.closed / "a.png", "fetch_failed")
    for code in (204, 304, 400, 401, 403, 404, 410, 418, 429, 500, 502, 503):
        cases.url(f"HTTP {code}", images / "status" / str(code), "fetch_failed")
    cases.url(
        f"{MAX_REDIRECTS} redirects (the limit)", images / "hops" / str(MAX_REDIRECTS), VERDICT
    )
    cases.url(
        f"{MAX_REDIRECTS + 1} redirects", images / "hops" / str(MAX_REDIRECTS + 1), "fetch_failed"
    )
    cases.url("a redirect loop", images / "loop", "fetch_failed")
    cases.url("a redirect without Location", images / "no-location", "fetch_failed")

    def redirect(to: str, status: int = 302) -> URL:
        return (images / "redirect" / str(status)).with_query(to=to)

    # Header values are ASCII here: the non-ASCII spellings are tried as event URLs above.
    for spelling, host in ipv4_spellings(CANARY_HOST).items():
        if host.isascii():
            to = f"http://{host}:{servers.canary_port}/"
            name = f"redirect to the canary as {spelling}"
            cases.url(name, redirect(to), "url_forbidden")
    for status in (301, 303, 307, 308):
        cases.url(
            f"HTTP {status} to the canary", redirect(f"http://{canary}/", status), "url_forbidden"
        )
    for n in (1, 2):
        cases.url(
            f"{n} allowed redirects, then the canary",
            (images / "chain" / str(n)).with_query(to=f"http://{canary}/"),
            "url_forbidden",
        )
    for name, to in {
        "the cloud metadata address": "http://169.254.169.254/latest/meta-data/",
        "the metadata address, IPv4-mapped": "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "a private address": "http://10.0.0.1/",
        "IPv6 loopback": f"http://[::1]:{servers.canary_port}/",
        "'localhost.'": f"http://localhost.:{servers.canary_port}/",
        "a protocol-relative canary": f"//{canary}/",
        "ftp": f"ftp://{canary}/a.png",
        "file": "file:///etc/passwd",
        "gopher": f"gopher://{canary}/_",
        "javascript": "javascript:alert(1)",
        "credentials on the allowed server": str(
            images.with_user("u").with_password("p") / "body" / "good.png"
        ),
        "an unclosed IPv6 bracket": "http://[::1",
        "a port out of range": "http://127.0.0.2:99999/",
    }.items():
        cases.url(f"redirect to {name}", redirect(to), "url_forbidden")
    cases.url(
        "redirect to https on a plain-HTTP server",
        redirect(str(images.with_scheme("https") / "body" / "good.png")),
        "fetch_failed",
    )
    cases.url(
        "redirect to a port nothing listens on",
        redirect(str(servers.closed / "a.png")),
        "fetch_failed",
    )
    cases.url("slow-loris body", images / "slow-loris", "fetch_timeout")
    cases.url("slow-loris body with a Content-Length", images / "slow-loris-sized", "fetch_timeout")
    cases.url("endless body", images / "endless", "image_too_large")
    cases.url("Content-Length of a terabyte", images / "huge-length", "image_too_large")
    for path, expect in {
        "/silent": "fetch_timeout",
        "/drip-headers": "fetch_timeout",
        "/hang-up": "fetch_failed",
        "/ssh-banner": "fetch_failed",
        "/http-0.9": "fetch_failed",
        "/lying-length": "fetch_failed",
        "/negative-length": "fetch_failed",
        "/two-lengths": "fetch_failed",
        "/huge-header": "fetch_failed",
        "/many-headers": "fetch_failed",
        "/bad-chunking": "fetch_failed",
    }.items():
        cases.url(f"raw server {path}", raw.with_path(path), expect)
