"""HEIC and AVIF: the Pillow plugins that read them, registered once, and their settings.

Both are HEIF files (ISO base media boxes); HEIC holds HEVC pictures, AVIF holds AV1 ones. Each
has exactly one decoder here:

- HEIC/HEIF: pillow-heif's plugin (libheif + libde265), Pillow format name "HEIF". Its build has no
  AV1 decoder, so it never decodes an AVIF.
- AVIF: Pillow's own plugin (libavif + dav1d). `images.ALLOWED_FORMATS` names it before "HEIF": a
  file whose major brand both plugins accept (`mif1`, `msf1`) reaches libavif first, which refuses
  one that is not AV1 and lets Pillow pass it on to libheif.

Importing this module registers pillow-heif's plugin and sets both decoders' options; it does
nothing else. Neither plugin decodes pixels in `Image.open`: the size there comes from the file's
`ispe` box, so `images.decode_image` checks its limits before anything is decoded.

Orientation is applied exactly once, by different parties: libheif applies `irot`/`imir` itself
while decoding (the size reported is already turned) and pillow-heif resets the EXIF orientation to
1, so `images._orient` leaves the picture alone; libavif does not apply them, and Pillow's AVIF
plugin turns them into the EXIF orientation that `images._orient` applies.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pillow_heif
from PIL import AvifImagePlugin, Image
from pillow_heif import options as heif_options

FORMATS = frozenset({"AVIF", "HEIF"})
"""Pillow's names of the formats read from HEIF files."""

DECODER_MAX_SIDE = 32768
DECODER_MAX_PIXELS = 16384 * 16384
"""libavif's default limits, the stricter of the two decoders' (libheif's are higher): a file
declaring more is refused by its decoder before we could read its size through Pillow."""


def _configure() -> None:
    # We decode in our own thread pool, one image per thread: decoders that start their own
    # threads would oversubscribe the cores (pillow-heif's default is 4, libavif's all of them).
    heif_options.DECODE_THREADS = 1
    AvifImagePlugin.DEFAULT_MAX_THREADS = 1
    # The plugin's `draft` would decode an embedded thumbnail instead of the picture, and a file
    # can carry a thumbnail that shows something else: we judge the picture itself.
    heif_options.THUMBNAILS = False
    # Depth maps and auxiliary images (alpha is not one of them) are never judged: not parsing
    # them leaves less of a stranger's file for libheif to read.
    heif_options.DEPTH_IMAGES = False
    heif_options.AUX_IMAGES = False
    # libheif's limits (items, grid tiles, memory per allocation) bound what a file costs past the
    # size it declares, which is all that our own limits see.
    heif_options.DISABLE_SECURITY_LIMITS = False
    pillow_heif.register_heif_opener()  # the encoder, MIME type and extensions too (tests use them)
    _, accept = Image.OPEN[_HeifImageFile.format]
    Image.register_open(_HeifImageFile.format, _HeifImageFile, accept)


class _HeifImageFile(pillow_heif.HeifImageFile):
    """pillow-heif's reader, failing as Pillow's readers fail. libheif's decoding errors come as
    RuntimeError, which callers of Pillow do not expect: one is libheif's security limit on a
    coded picture larger than the header declared (which libheif checks before allocating it)."""

    def load(self) -> Any:
        try:
            return super().load()  # type: ignore[no-untyped-call]  # pillow-heif is untyped here
        except RuntimeError as exc:
            raise ValueError(f"libheif: {exc}") from None


_configure()


def over_decoder_limits(encoded: bytes) -> str | None:
    """Why a HEIF file its decoder refused is too large, if that is why: it declares an image
    over the decoders' own limits (which are far above ours), so the refusal is an
    `image_too_large`, not an undecodable file."""
    size = declared_size(encoded)
    if size is None:
        return None
    width, height = size
    if max(width, height) > DECODER_MAX_SIDE or width * height > DECODER_MAX_PIXELS:
        return f"image declares {width}x{height}, more than its decoder accepts"
    return None


def declared_size(encoded: bytes) -> tuple[int, int] | None:
    """The largest size (by pixels) any image in a HEIF file declares in its `ispe` boxes,
    read without a decoder; None when the bytes are not a HEIF file or declare none.

    A walk over at most len(encoded) / 8 boxes, stopping at the first malformed one."""
    if encoded[4:8] != b"ftyp":
        return None
    sizes = [
        struct.unpack_from(">II", encoded, start + 4)
        for meta_start, meta_end in _children(encoded, 0, len(encoded), b"meta")
        for iprp_start, iprp_end in _children(encoded, meta_start + 4, meta_end, b"iprp")
        for ipco_start, ipco_end in _children(encoded, iprp_start, iprp_end, b"ipco")
        for start, end in _children(encoded, ipco_start, ipco_end, b"ispe")
        if end - start >= 12  # version and flags, then width and height
    ]
    return max(sizes, key=lambda size: size[0] * size[1], default=None)


def _children(data: bytes, start: int, end: int, kind: bytes) -> Iterator[tuple[int, int]]:
    """(payload start, end) of the boxes of type `kind` directly inside data[start:end]."""
    for box_kind, payload_start, payload_end in _boxes(data, start, end):
        if box_kind == kind:
            yield payload_start, payload_end


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if size == 1:  # a 64-bit size follows the type
            if at + 16 > end:
                return
            (size,) = struct.unpack_from(">Q", data, at + 8)
            header = 16
        elif size == 0:  # the box runs to the end of its parent
            size = end - at
        if size < header or at + size > end:
            return
        yield kind, at + header, at + size
        at += size
