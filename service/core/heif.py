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
`ispe` box, so `images.decode_image` checks its limits before anything is decoded. That size is
not always what the decoder allocates, so `coded_size` reads that too, without a decoder: the
largest `ispe` (a `clap` crop is reported, the coded picture is decoded) and, for AVIF, the AV1
sequence headers (libavif decodes at the size the bitstream codes). libheif refuses a HEVC
picture coded much larger than its `ispe` itself, before decoding it.

Orientation is applied exactly once, by different parties: libheif applies `irot`/`imir` itself
while decoding (the size reported is already turned) and pillow-heif resets the EXIF orientation to
1, so `images._orient` leaves the picture alone; libavif does not apply them, and Pillow's AVIF
plugin turns them into the EXIF orientation that `images._orient` applies.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from typing import Any

import pillow_heif
from PIL import AvifImagePlugin
from pillow_heif import options as heif_options

from service.core.errors import ImageDecodeFailed

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
    # Patched on pillow-heif's own class, not a subclass of ours: anyone may register its class
    # again (imageio's Pillow plugin does), and the patch must hold whoever registered last.
    pillow_heif.HeifImageFile.load = _load_failing_as_pillow  # type: ignore[method-assign,assignment]
    # Patched on Pillow's class too: Pillow registers it itself, whenever its plugins load.
    avif = AvifImagePlugin.AvifImageFile
    avif._open = _avif_open_failing_as_pillow  # type: ignore[method-assign,assignment]
    avif.load = _avif_load_failing_as_pillow  # type: ignore[method-assign,assignment]


_pillow_heif_load = pillow_heif.HeifImageFile.load


def _load_failing_as_pillow(image: pillow_heif.HeifImageFile) -> Any:
    """pillow-heif's `load`, failing as Pillow's readers fail. libheif's decoding errors come as
    RuntimeError, which callers of Pillow do not expect: one is libheif's security limit on a
    coded picture larger than the header declared (which libheif checks before allocating it)."""
    try:
        return _pillow_heif_load(image)  # type: ignore[no-untyped-call]  # pillow-heif is untyped
    except RuntimeError as exc:
        raise ValueError(f"libheif: {exc}") from None


# Pillow's AVIF plugin lets libavif's errors out as RuntimeError (and a zero timescale in a
# damaged sequence as ZeroDivisionError), in `_open` as in `load`: one in a hundred damaged files
# did in a fuzzing run. Translated so that `Image.open` tries the next reader and then says it
# cannot identify the file, and `load` fails as Pillow's readers fail.
_LIBAVIF_ERRORS = (RuntimeError, ZeroDivisionError)
_avif_open = AvifImagePlugin.AvifImageFile._open
_avif_load = AvifImagePlugin.AvifImageFile.load


def _avif_open_failing_as_pillow(image: AvifImagePlugin.AvifImageFile) -> None:
    try:
        _avif_open(image)
    except _LIBAVIF_ERRORS as exc:
        raise SyntaxError(f"libavif: {exc}") from None


def _avif_load_failing_as_pillow(image: AvifImagePlugin.AvifImageFile) -> Any:
    try:
        return _avif_load(image)
    except _LIBAVIF_ERRORS as exc:
        raise ValueError(f"libavif: {exc}") from None


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


# --- AV1: the size the bitstream codes ----------------------------------------------------------
#
# libavif decodes an AV1 picture at the size its sequence header says, whatever the `ispe` box
# declares (a few hundred bytes can code 16384x16384). So the size checked for an AVIF is also the
# largest `max_frame_width/height` of every sequence header the decoder could read: those in
# `av1C` boxes, in every item's data (found through `iloc`) and in every sample of a sequence's
# tracks (found through the sample tables).

MAX_OBUS = 100_000
"""OBUs walked per file at most: stills have a handful per item; more is refused, not walked."""


def coded_size(encoded: bytes, image_format: str) -> tuple[int, int] | None:
    """The largest size a HEIF file makes its decoder allocate, as far as its header tells: its
    largest `ispe`, and for AVIF its largest AV1 sequence header. Raises ImageDecodeFailed for
    item data too convoluted to bound cheaply (overlapping extents, too many OBUs), which no
    encoder writes."""
    sizes = [declared_size(encoded), av1_coded_size(encoded) if image_format == "AVIF" else None]
    return max(
        (size for size in sizes if size is not None),
        key=lambda size: size[0] * size[1],
        default=None,
    )


def av1_coded_size(encoded: bytes) -> tuple[int, int] | None:
    """The largest frame any AV1 sequence header in a HEIF file allows, or None if it has none."""
    budget = [MAX_OBUS]
    sizes = [
        size
        for obus in itertools.chain(  # lazily: one item or sample in memory at a time
            _av1c_payloads(encoded),
            _item_payloads(encoded),
            _track_av1c_payloads(encoded),
            _sample_payloads(encoded),
        )
        for size in _sequence_header_sizes(obus, budget)
    ]
    return max(sizes, key=lambda size: size[0] * size[1], default=None)


def _av1c_payloads(encoded: bytes) -> Iterator[bytes]:
    for meta_start, meta_end in _children(encoded, 0, len(encoded), b"meta"):
        for iprp_start, iprp_end in _children(encoded, meta_start + 4, meta_end, b"iprp"):
            for ipco_start, ipco_end in _children(encoded, iprp_start, iprp_end, b"ipco"):
                for start, end in _children(encoded, ipco_start, ipco_end, b"av1C"):
                    yield encoded[start + 4 : end]  # after marker, version, profile, level


def _item_payloads(encoded: bytes) -> Iterator[bytes]:
    """Each item's data as the decoder would assemble it: its extents, in order."""
    total = 0
    for meta_start, meta_end in _children(encoded, 0, len(encoded), b"meta"):
        idat = next(_children(encoded, meta_start + 4, meta_end, b"idat"), (0, 0))
        for iloc_start, iloc_end in _children(encoded, meta_start + 4, meta_end, b"iloc"):
            for method, base, extents in _iloc_items(encoded[iloc_start:iloc_end]):
                if method not in (0, 1):
                    continue  # 2: data made of other items, which are walked themselves
                origin, limit = (0, len(encoded)) if method == 0 else idat
                parts = []
                for offset, length in extents:
                    start = origin + base + offset
                    end = limit if length == 0 else min(limit, start + length)
                    parts.append(encoded[start:end])
                    total += max(0, end - start)
                    if total > len(encoded):
                        raise ImageDecodeFailed("HEIF items overlap: their data exceeds the file")
                yield b"".join(parts)


def _sample_tables(encoded: bytes) -> Iterator[tuple[int, int]]:
    """(payload start, end) of the sample table (`stbl`) of every track of a sequence (`avis`)."""
    for moov_start, moov_end in _children(encoded, 0, len(encoded), b"moov"):
        for trak_start, trak_end in _children(encoded, moov_start, moov_end, b"trak"):
            for mdia_start, mdia_end in _children(encoded, trak_start, trak_end, b"mdia"):
                for minf_start, minf_end in _children(encoded, mdia_start, mdia_end, b"minf"):
                    yield from _children(encoded, minf_start, minf_end, b"stbl")


def _track_av1c_payloads(encoded: bytes) -> Iterator[bytes]:
    for stbl_start, stbl_end in _sample_tables(encoded):
        for stsd_start, stsd_end in _children(encoded, stbl_start, stbl_end, b"stsd"):
            # version, flags and entry count; then each sample entry has 78 bytes of
            # SampleEntry and VisualSampleEntry fields before its boxes.
            for entry_start, entry_end in _children(encoded, stsd_start + 8, stsd_end, b"av01"):
                for start, end in _children(encoded, entry_start + 78, entry_end, b"av1C"):
                    yield encoded[start + 4 : end]


def _sample_payloads(encoded: bytes) -> Iterator[bytes]:
    """Each sample of each track, located as the decoder locates them: chunk offsets (`stco`,
    `co64`), samples per chunk (`stsc` runs, each holding until the next run's first chunk) and
    sample sizes (`stsz`). At most MAX_OBUS chunks and samples in all, and no more bytes than
    the file holds."""
    total = walked = 0
    for stbl_start, stbl_end in _sample_tables(encoded):
        tables = {
            kind: encoded[start:end]
            for kind in (b"stsz", b"stsc", b"stco", b"co64")
            for start, end in _children(encoded, stbl_start, stbl_end, kind)
        }
        chunks = _table(tables.get(b"stco", b""), 4) or _table(tables.get(b"co64", b""), 8)
        runs = [(_int(run[:4]), _int(run[4:8])) for run in _table(tables.get(b"stsc", b""), 12)]
        sizes = _Bytes(tables.get(b"stsz", bytes(12)))
        sizes.int(4)  # version and flags
        constant, count = sizes.int(4), sizes.int(4)
        run = per_chunk = 0
        for index, chunk in enumerate(chunks, start=1):
            while run < len(runs) and runs[run][0] <= index:
                per_chunk = runs[run][1]
                run += 1
            at = _int(chunk)
            for _ in range(min(per_chunk, count)):
                size = constant or sizes.int(4)
                count -= 1
                total, walked = total + size, walked + 1
                if total > len(encoded) or walked > MAX_OBUS:
                    raise ImageDecodeFailed("HEIF samples overlap or are too many to walk")
                yield encoded[at : at + size]
                at += size


def _int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def _table(box: bytes, entry: int) -> list[bytes]:
    """The entries of a full box that is a 32-bit count, then that many `entry`-byte entries."""
    if len(box) < 8:
        return []
    count = _int(box[4:8])
    if 8 + count * entry > len(box) or count > MAX_OBUS:
        raise ImageDecodeFailed("a sample table ends early or is too long to walk")
    return [box[8 + i * entry : 8 + (i + 1) * entry] for i in range(count)]


def _iloc_items(box: bytes) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """(construction method, base offset, [(extent offset, extent length)]) of each item."""
    reader = _Bytes(box)
    version = reader.int(1)
    reader.int(3)  # flags
    sizes = reader.int(2)
    offset_size, length_size = sizes >> 12, (sizes >> 8) & 15
    base_size, index_size = (sizes >> 4) & 15, sizes & 15 if version in (1, 2) else 0
    for _ in range(reader.int(2 if version < 2 else 4)):
        reader.int(2 if version < 2 else 4)  # item ID
        method = reader.int(2) & 15 if version in (1, 2) else 0
        reader.int(2)  # data reference index
        base = reader.int(base_size)
        extents = []
        for _ in range(reader.int(2)):
            reader.int(index_size)
            extents.append((reader.int(offset_size), reader.int(length_size)))
        yield method, base, extents


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def int(self, size: int) -> int:
        if self.at + size > len(self.data):
            raise ImageDecodeFailed("an iloc box ends early")
        value = int.from_bytes(self.data[self.at : self.at + size], "big")
        self.at += size
        return value


def _sequence_header_sizes(obus: bytes, budget: list[int]) -> Iterator[tuple[int, int]]:
    """The max frame size of each sequence header OBU in an OBU stream, walked until it ends or
    stops being one (where the decoder would stop too)."""
    at = 0
    while at < len(obus):
        budget[0] -= 1
        if budget[0] < 0:
            raise ImageDecodeFailed(f"more than {MAX_OBUS} AV1 OBUs")
        header = obus[at]
        if header & 0x80:  # forbidden bit: not an OBU
            return
        kind, extended, sized = (header >> 3) & 15, header & 4, header & 2
        at += 2 if extended else 1
        size = len(obus) - at
        if sized:
            size, at = _leb128(obus, at)
        if size < 0 or at + size > len(obus):
            return
        if kind == 1:  # OBU_SEQUENCE_HEADER
            frame = _max_frame_size(obus[at : at + size])
            if frame is not None:
                yield frame
        at += size


def _leb128(data: bytes, at: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        if at + i >= len(data):
            return -1, at
        value |= (data[at + i] & 0x7F) << (7 * i)
        if not data[at + i] & 0x80:
            return value, at + i + 1
    return -1, at


def _max_frame_size(payload: bytes) -> tuple[int, int] | None:
    """max_frame_width/height of a sequence header OBU (AV1 specification, 5.5.1); None when it
    is cut short (the decoder refuses it too)."""
    try:
        return _read_max_frame_size(_Bits(payload))
    except IndexError:
        return None


def _read_max_frame_size(bits: _Bits) -> tuple[int, int]:
    bits.read(3)  # seq_profile
    bits.read(1)  # still_picture
    if bits.read(1):  # reduced_still_picture_header
        bits.read(5)  # seq_level_idx
    else:
        decoder_model_info = False
        if bits.read(1):  # timing_info_present_flag
            bits.read(32), bits.read(32)  # num_units_in_display_tick, time_scale
            if bits.read(1):  # equal_picture_interval
                bits.uvlc()
            decoder_model_info = bool(bits.read(1))
            if decoder_model_info:
                delay_length = bits.read(5) + 1
                bits.read(32), bits.read(5), bits.read(5)
        initial_display_delay = bits.read(1)
        for _ in range(bits.read(5) + 1):  # operating points
            bits.read(12)  # operating_point_idc
            if bits.read(5) > 7:  # seq_level_idx
                bits.read(1)  # seq_tier
            if decoder_model_info and bits.read(1):
                bits.read(delay_length), bits.read(delay_length), bits.read(1)
            if initial_display_delay and bits.read(1):
                bits.read(4)
    width_bits, height_bits = bits.read(4) + 1, bits.read(4) + 1
    return bits.read(width_bits) + 1, bits.read(height_bits) + 1


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def read(self, count: int) -> int:
        value = 0
        for _ in range(count):
            value = value << 1 | (self.data[self.at >> 3] >> (7 - (self.at & 7))) & 1
            self.at += 1
        return value

    def uvlc(self) -> int:
        zeros = 0
        while not self.read(1):
            zeros += 1
            if zeros >= 32:
                return 2**32 - 1
        return self.read(zeros) + (1 << zeros) - 1
