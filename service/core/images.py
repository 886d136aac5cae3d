"""Encoded image bytes → bounded, oriented, RGB pixels the guard model can take.

Everything here is synchronous and CPU-bound: the pipeline runs `decode_image` in a thread
pool (Pillow releases the GIL while decoding), so a large image never stalls the event loop.
Only the formats in `ALLOWED_FORMATS` are ever handed to a Pillow plugin: Pillow's other
readers (EPS through Ghostscript, for one) are not code we want strangers' bytes to reach.
HEIC and AVIF come through `service.core.heif`, which registers and configures their readers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from service.core import heif
from service.core.errors import (
    ImageDecodeFailed,
    ImageTooLarge,
    InvalidEvent,
    UnsupportedImageFormat,
)
from service.core.hashing import Pdq, pdq_of

# Tried in this order: AVIF before HEIF, so that Pillow's AV1 reader sees a HEIF file whose brand
# either could read before libheif does (see service/core/heif.py).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")

# Formats people upload that we do not decode, recognised so the dead letter can say
# "unsupported" rather than "corrupt". Checked only after the allowed readers gave up.
_KNOWN_UNSUPPORTED: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF", "PDF"),
    (0, b"%!PS", "PostScript"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"<svg", "SVG"),
    (0, b"<?xml", "SVG/XML"),
    (0, b"<!DOCTYPE svg", "SVG"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"8BPS", "PSD"),
    (0, b"qoif", "QOI"),
    (0, b"DDS ", "DDS"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (0, b"\xffO\xffQ", "JPEG 2000"),
)

_WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int
    max_image_pixels: int
    max_image_side: int
    resize_side: int
    frames: int = 1
    """Frames of an animated image to judge, evenly spaced from the first; 1: the first only."""
    pdq: bool = False
    """Also compute the PDQ hash of the (first) frame judged."""


@dataclass(frozen=True, eq=False)
class DecodedImage:
    pixels: npt.NDArray[np.uint8]
    """Shape (height, width, 3), RGB, C-contiguous, after orientation and downscaling."""
    format: str
    width: int
    """Width of the image as uploaded (after EXIF orientation), before downscaling."""
    height: int
    sha256: str
    """Hex digest of the encoded bytes, so a verdict can be matched to a stored file."""
    md5: str
    """Hex MD5 of the encoded bytes: some hash lists come as MD5."""
    encoded_bytes: int
    more_frames: tuple[npt.NDArray[np.uint8], ...] = ()
    """Further frames of an animated image (as `pixels`), when more than one is judged."""
    pdq: Pdq | None = None
    """PDQ hash of `pixels`, when the limits ask for it."""
    frame_indexes: tuple[int, ...] = (0,)
    """Where `pixels` and then `more_frames` are in the file."""


def use_pixel_limit(max_pixels: int) -> None:
    """Make Pillow's own decompression-bomb threshold ours (a process-wide setting).

    `decode_image` refuses images over the limit from their header before Pillow decodes
    anything; aligning Pillow keeps it from refusing what an operator allowed, and its warning
    about images we are about to refuse anyway is silenced.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_base64(data: str, max_bytes: int) -> bytes:
    """Decode the event's base64 image, refusing it before decoding when it is too large."""
    if len(data) // 4 * 3 > max_bytes + 2:
        raise ImageTooLarge(
            f"inline image is about {len(data) // 4 * 3} bytes; the limit is {max_bytes}"
        )
    try:
        encoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidEvent(f"image.data is not valid base64: {exc}") from None
    if len(encoded) > max_bytes:
        raise ImageTooLarge(f"inline image is {len(encoded)} bytes; the limit is {max_bytes}")
    if not encoded:
        raise ImageDecodeFailed("image.data decodes to zero bytes")
    return encoded


def decode_inline(data: str, limits: ImageLimits) -> DecodedImage:
    """An event's base64 image to pixels (both steps are CPU work for the decode pool)."""
    return decode_image(decode_base64(data, limits.max_image_bytes), limits)


def decode_image(encoded: bytes, limits: ImageLimits) -> DecodedImage:
    """Decode, check limits, orient, convert to RGB and downscale one encoded image."""
    if len(encoded) > limits.max_image_bytes:
        raise ImageTooLarge(f"image is {len(encoded)} bytes; the limit is {limits.max_image_bytes}")
    image = _open(encoded, limits)
    declared = image.size
    _check_dimensions(declared, limits)
    if image.format == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale for a fraction of the cost of a full decode
        # (the 12 MP photo of a phone at 1/4 is the guard's size already).
        image.draft("RGB", _draft_request(declared, limits.resize_side))
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise ImageDecodeFailed(f"{image.format} image could not be decoded: {exc}") from None
    oriented, turned = _orient(image)
    width, height = (declared[1], declared[0]) if turned else declared
    frame_count = getattr(image, "n_frames", 1) if limits.frames > 1 else 1
    frames = sample_frames(frame_count, limits.frames, declared, limits.max_image_pixels)
    image_format = str(image.format)
    first = _downscaled_rgb(oriented, limits)
    more = tuple(_frame(image, index, limits) for index in frames[1:])
    return DecodedImage(
        pixels=first,
        format=image_format,
        width=width,
        height=height,
        sha256=hashlib.sha256(encoded).hexdigest(),
        md5=hashlib.md5(encoded, usedforsecurity=False).hexdigest(),
        encoded_bytes=len(encoded),
        more_frames=more,
        pdq=pdq_of(first) if limits.pdq else None,
        frame_indexes=tuple(frames),
    )


def sample_frames(
    frame_count: int, wanted: int, size: tuple[int, int], max_pixels: int
) -> list[int]:
    """Indexes of the frames to judge: `wanted` evenly spaced from the first to the last.

    Reaching frame k of a GIF or WebP decodes every frame before it, so only frames within a
    decoding budget of `max_pixels` in all are sampled: a file of ten thousand large frames
    costs no more than one image at the pixel limit.
    """
    reachable = min(frame_count, max(1, max_pixels // max(1, size[0] * size[1])))
    if wanted <= 1 or reachable <= 1:
        return [0]
    step = (reachable - 1) / (min(wanted, reachable) - 1)
    return sorted({round(i * step) for i in range(min(wanted, reachable))})


def _frame(image: Image.Image, index: int, limits: ImageLimits) -> npt.NDArray[np.uint8]:
    try:
        image.seek(index)
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise ImageDecodeFailed(f"frame {index} could not be decoded: {exc}") from None
    return _downscaled_rgb(_orient(image)[0], limits)


def _draft_request(size: tuple[int, int], side: int) -> tuple[int, int]:
    """What to ask `Image.draft` for so that libjpeg's scale keeps the longer side at least
    half the resize side: draft picks the smallest scale at or above the request, and the
    shorter side must not hold it back (a panorama keeps its length)."""
    wanted = max(1, -(-side // 2))
    return (wanted, 1) if size[0] >= size[1] else (1, wanted)


def _downscaled_rgb(image: Image.Image, limits: ImageLimits) -> npt.NDArray[np.uint8]:
    """RGB with the longer side in [resize_side / 2, resize_side], as a C-contiguous array.

    No fractional resampling: the guard model's own processor resamples what it gets (to its
    tile grid, or to 320 px for the CPU guard), so a second fine filter here only costs. A JPEG
    arrives already scaled by its DCT (`_draft_request`); what is still too large is reduced
    by a whole factor with a box filter (each output pixel the mean of k x k input pixels: no
    aliasing, a few ms at 12 MP). README "Pixels the guard gets" has the choice and its
    measured quality against full decode + Lanczos."""
    rgb = _to_rgb(image)
    longer = max(rgb.size)
    if longer > limits.resize_side:
        rgb = rgb.reduce(-(-longer // limits.resize_side))
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def _open(encoded: bytes, limits: ImageLimits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(encoded), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except UnidentifiedImageError:
        too_large = heif.over_decoder_limits(encoded)
        if too_large:
            raise ImageTooLarge(too_large) from None
        known = sniff_unsupported(encoded)
        if known:
            raise UnsupportedImageFormat(
                f"{known} images are not supported; send one of {', '.join(ALLOWED_FORMATS)}"
            ) from None
        raise ImageDecodeFailed(
            f"not a recognisable {'/'.join(ALLOWED_FORMATS)} image "
            f"(starts with {encoded[:8].hex(' ')})"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise ImageDecodeFailed(f"image header could not be read: {exc}") from None
    if image.format in heif.FORMATS:
        _check_coded_size(encoded, image, limits)
    return image


def _check_coded_size(encoded: bytes, image: Image.Image, limits: ImageLimits) -> None:
    """A HEIF file's size as Pillow reports it is after its clean-aperture crop (`clap`), and
    libavif decodes an AV1 picture at the size its bitstream codes, whatever the header says:
    the size the decoder will allocate is checked too."""
    coded = heif.coded_size(encoded, str(image.format))
    if coded is not None:
        _check_dimensions(coded, limits)


def sniff_unsupported(encoded: bytes) -> str | None:
    """Name the format of bytes we recognise but do not decode, if we do."""
    head = encoded[:64].removeprefix(b"\xef\xbb\xbf").lstrip()
    for offset, magic, name in _KNOWN_UNSUPPORTED:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def _check_dimensions(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeFailed(f"image declares an empty size {width}x{height}")
    if max(width, height) > limits.max_image_side:
        raise ImageTooLarge(
            f"image is {width}x{height}; the longest side may be {limits.max_image_side}"
        )
    if width * height > limits.max_image_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_image_pixels}"
        )


# What Pillow raises on a malformed EXIF block: struct.error among them, when a tag's stored
# type does not match Pillow's tag table and exif_transpose rewrites the block.
_EXIF_ERRORS = (OSError, ValueError, SyntaxError, TypeError, KeyError, IndexError, struct.error)
# EXIF orientations other than "as stored" (1): mirrored, turned, or both.
_TRANSPOSED = frozenset(range(2, 9))


def _orient(image: Image.Image) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation; True when width and height swapped. A broken EXIF block
    leaves the image as stored."""
    try:
        orientation = image.getexif().get(0x0112, 1)
        if orientation not in _TRANSPOSED:
            # exif_transpose would return a copy of the whole image, and most have no turn.
            return image, False
        return ImageOps.exif_transpose(image), orientation in (5, 6, 7, 8)
    except _EXIF_ERRORS:
        return image, False


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as a viewer would see it: transparency composited over white, deep images scaled."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), image.mode), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _scale_to_uint8(values: npt.NDArray[np.generic], mode: str) -> npt.NDArray[np.uint8]:
    """Map deep greyscale onto 0-255 by the range its mode implies, not by its content (a dark
    16-bit picture must stay dark): 16-bit and 32-bit integer images as 0-65535 (32-bit ones
    come from 16-bit sources in practice), float images as 0.0-1.0."""
    top = 1.0 if mode == "F" else 65535.0
    scaled = np.clip(np.nan_to_num(values.astype(np.float64)) / top * 255.0, 0, 255)
    return np.rint(scaled).astype(np.uint8)
