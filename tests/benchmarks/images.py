"""The images the throughput benchmark sends: the mix users upload, by kind.

Every kind is made here, the same on every run (and kept in a cache directory: a 12 MP HEIC
takes x265 half a minute), from scikit-image's photos (or drawn, for the
screenshot). The 12 MP phone photos are 4032x3024 with sensor-like noise so that they encode to
what a phone writes (JPEG 2-4 MB); they are too big for a Kafka record (1 MB by default), so
they are sent as `image.url` events and served by a local static HTTP server.

MIX is the share of each kind in the uploads the benchmark stands for (an assumption, not a
measurement; change it here): phone photos dominate, half of them HEIC as iPhones write them.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pillow_heif
from PIL import Image, ImageDraw
from skimage import data as photos

pillow_heif.register_heif_opener()

PHOTOS = ("astronaut", "coffee", "rocket", "chelsea")
PHONE = (4032, 3024)


@dataclass(frozen=True)
class Kind:
    name: str
    label: str
    suffix: str
    """The served file's extension (URL kinds)."""
    by_url: bool
    """Sent as `image.url` (too big for a record) rather than inline base64."""
    events: int
    """The default backlog: modest for the big images, so that a full run stays short."""
    make: Callable[[], list[bytes]]


def jpeg_of_size(pixels: npt.NDArray[np.uint8], target: int, quality: int = 88) -> bytes:
    """The photo rescaled so that its JPEG is about `target` bytes (within a few percent)."""
    image = Image.fromarray(pixels).convert("RGB")
    low, high = 32, 4096
    best = b""
    for _ in range(14):
        side = (low + high) // 2
        scale = side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        out = io.BytesIO()
        image.resize(size, Image.Resampling.LANCZOS).save(out, "JPEG", quality=quality)
        encoded = out.getvalue()
        if abs(len(encoded) - target) < abs(len(best) - target):
            best = encoded
        if len(encoded) < target:
            low = side + 1
        else:
            high = side - 1
        if low > high:
            break
    return best


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def phone_photo(name: str, seed: int, size: tuple[int, int] = PHONE) -> Image.Image:
    """A photo at a phone's resolution with a sensor's noise (so it encodes like one)."""
    image = Image.fromarray(getattr(photos, name)()).convert("RGB")
    image = image.resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(seed).normal(0, 5, (size[1], size[0], 1))
    pixels = np.asarray(image).astype(np.int16) + noise.astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def screenshot(seed: int) -> Image.Image:
    """A 1920x1080 screenshot of an app: a title bar, panels, buttons and lines of text."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (1920, 1080), (245, 246, 248))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 1920, 56), fill=(40, 44, 52))
    draw.text((24, 18), f"guardstream bench window {seed}", fill=(230, 230, 230))
    draw.rectangle((0, 56, 320, 1080), fill=(228, 231, 236))
    for i in range(24):
        draw.text((24, 80 + 38 * i), f"Item {i:02d} of the sidebar", fill=(50, 50, 60))
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "upload", "image", "verdict", "queue"]
    for row in range(60):
        line = " ".join(rng.choice(words, size=14))
        draw.text((360, 80 + 16 * row), line, fill=(20, 20, 20))
    for i in range(6):
        x = 1400 + (i % 2) * 250
        y = 120 + (i // 2) * 120
        colour = tuple(int(c) for c in rng.integers(60, 220, size=3))
        draw.rounded_rectangle((x, y, x + 220, y + 80), 12, fill=colour, outline=(0, 0, 0))
        draw.text((x + 20, y + 30), f"Button {i}", fill=(255, 255, 255))
    return image


def _jpegs(target: int) -> Callable[[], list[bytes]]:
    return lambda: [jpeg_of_size(getattr(photos, name)(), target) for name in PHOTOS]


def _phone(fmt: str, **options: object) -> Callable[[], list[bytes]]:
    names = PHOTOS[:2]
    return lambda: [_encoded(phone_photo(name, i), fmt, **options) for i, name in enumerate(names)]


def _webp() -> list[bytes]:
    return [
        _encoded(phone_photo(name, i, (1920, 1080)), "WEBP", quality=80)
        for i, name in enumerate(PHOTOS[:2])
    ]


def _screenshots() -> list[bytes]:
    return [_encoded(screenshot(i), "PNG") for i in range(2)]


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("jpeg-50k", "50 KB JPEG", ".jpg", False, 6000, _jpegs(50_000)),
        Kind("jpeg-500k", "500 KB JPEG", ".jpg", False, 1000, _jpegs(500_000)),
        Kind("jpeg-12mp", "12 MP phone JPEG (URL)", ".jpg", True, 150, _phone("JPEG", quality=92)),
        Kind("heic-12mp", "12 MP HEIC (URL)", ".heic", True, 150, _phone("HEIF", quality=50)),
        Kind("avif-12mp", "12 MP AVIF (URL)", ".avif", True, 150, _phone("AVIF", speed=8)),
        Kind("webp-1080p", "1080p WebP", ".webp", False, 600, _webp),
        Kind("png-screenshot", "1080p PNG screenshot", ".png", False, 600, _screenshots),
    )
}

MIX: dict[str, float] = {
    "jpeg-12mp": 0.35,
    "heic-12mp": 0.20,
    "avif-12mp": 0.05,
    "jpeg-50k": 0.15,
    "jpeg-500k": 0.10,
    "webp-1080p": 0.10,
    "png-screenshot": 0.05,
}

_CUSTOM_JPEG = re.compile(r"jpeg-(\d+)")


def kind(name: str) -> Kind:
    """A kind of KINDS, or `jpeg-<bytes>` (inline JPEGs of about that size, e.g. jpeg-20000)."""
    if name in KINDS:
        return KINDS[name]
    match = _CUSTOM_JPEG.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown image kind {name!r}; one of {', '.join(KINDS)} or jpeg-<bytes>")
    target = int(match[1])
    return Kind(name, f"{target / 1000:g} KB JPEG", ".jpg", False, 1000, _jpegs(target))


# Bump when what a kind's images are changes, so that cached files are made again.
VERSION = 1


def images_of(k: Kind, cache: Path | None = None) -> list[bytes]:
    """The images of kind `k`, from `cache` when they were made before."""
    if cache is None:
        return k.make()
    stem = cache / f"v{VERSION}-{k.name}"
    cached = sorted(cache.glob(f"{stem.name}-*{k.suffix}"))
    if cached:
        return [path.read_bytes() for path in cached]
    images = k.make()
    cache.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        temporary = cache / f".{stem.name}-{i}{k.suffix}.tmp"
        temporary.write_bytes(image)
        temporary.rename(cache / f"{stem.name}-{i}{k.suffix}")
    return images
