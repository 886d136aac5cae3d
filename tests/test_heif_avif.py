"""HEIC (pillow-heif) and AVIF (Pillow's own plugin): decoded under the limits of every format.

Every file is made in the test: pillow-heif encodes HEIC (x265), Pillow encodes AVIF (aom). Sizes
that are too large are written into a small file's `ispe` box, so no test ever holds such a
picture.
"""

from __future__ import annotations

import io
import struct
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pillow_heif
import pytest
from PIL import AvifImagePlugin, Image

from service.core import heif
from service.core.errors import ImageDecodeFailed, ImageTooLarge
from service.core.images import ImageLimits, decode_image

LIMITS = ImageLimits(
    max_image_bytes=5_000_000, max_image_pixels=40_000_000, max_image_side=10_000, resize_side=512
)
FORMATS = ("HEIF", "AVIF")

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)

Pixels = npt.NDArray[np.uint8]


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, quality=95, **params)
    return out.getvalue()


def _quadrants(width: int, height: int) -> Image.Image:
    """Top-left red, top-right blue, bottom-left green, bottom-right white."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 2], pixels[: height // 2, width // 2 :] = RED, BLUE
    pixels[height // 2 :, : width // 2], pixels[height // 2 :, width // 2 :] = GREEN, WHITE
    return Image.fromarray(pixels)


def _quadrant_colours(pixels: Pixels) -> list[tuple[int, int, int]]:
    height, width = pixels.shape[:2]
    return [
        (int(pixel[0]), int(pixel[1]), int(pixel[2]))
        for pixel in (
            pixels[height // 4, width // 4],
            pixels[height // 4, 3 * width // 4],
            pixels[3 * height // 4, width // 4],
            pixels[3 * height // 4, 3 * width // 4],
        )
    ]


def _assert_quadrants(pixels: Pixels, colours: tuple[tuple[int, int, int], ...]) -> None:
    seen = _quadrant_colours(pixels)
    assert all(
        max(abs(a - b) for a, b in zip(pixel, colour, strict=True)) <= 24
        for pixel, colour in zip(seen, colours, strict=True)
    ), (seen, colours)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    # Bytes, not an Image.Exif: pillow-heif reads the orientation it writes as `irot`/`imir`
    # only from bytes.
    return exif.tobytes()


def _declaring(encoded: bytes, width: int, height: int) -> bytes:
    """`encoded` with its (first) `ispe` box rewritten to say width x height."""
    patched = bytearray(encoded)
    at = patched.index(b"ispe") + 8  # type, version and flags
    patched[at : at + 8] = struct.pack(">II", width, height)
    return bytes(patched)


def _with_major_brand(encoded: bytes, brand: bytes) -> bytes:
    return encoded[:8] + brand + encoded[12:]


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if either plugin decodes pixels."""

    def load(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(pillow_heif.HeifImageFile, "load", load)
    monkeypatch.setattr(AvifImagePlugin.AvifImageFile, "load", load)


# --- Decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_heic_and_avif_decode_to_rgb_uint8_pixels(fmt: str) -> None:
    encoded = _encode(_quadrants(48, 32), fmt)

    image = decode_image(encoded, LIMITS)

    assert (image.format, image.width, image.height) == (fmt, 48, 32)
    assert image.pixels.shape == (32, 48, 3)
    assert image.pixels.dtype == np.uint8
    assert image.pixels.flags.c_contiguous
    _assert_quadrants(image.pixels, (RED, BLUE, GREEN, WHITE))


@pytest.mark.parametrize("fmt", FORMATS)
def test_large_heic_and_avif_are_reduced_to_within_the_resize_side(fmt: str) -> None:
    image = decode_image(_encode(_quadrants(1200, 800), fmt), LIMITS)

    assert (image.width, image.height) == (1200, 800)
    assert image.pixels.shape == (267, 400, 3)  # box reduce by ceil(1200 / 512) = 3
    _assert_quadrants(image.pixels, (RED, BLUE, GREEN, WHITE))


def test_grid_heic_as_phones_write_it_decodes_whole_and_is_checked_whole() -> None:
    """iPhones store a photo as a grid of 512x512 tiles: the grid's `ispe` is the photo's size."""
    encoded = _encode(_quadrants(1100, 700), "HEIF", tile_size=512)
    assert b"grid" in encoded

    image = decode_image(encoded, LIMITS)

    assert (image.width, image.height) == (1100, 700)
    _assert_quadrants(image.pixels, (RED, BLUE, GREEN, WHITE))
    with pytest.raises(ImageTooLarge, match=r"^image is 1100x700; the longest side may be 1000$"):
        decode_image(encoded, ImageLimits(5_000_000, 40_000_000, 1000, 512))


def test_10_bit_heic_decodes_to_8_bit() -> None:
    deep = np.asarray(_quadrants(48, 32)).astype(np.uint16) * 257
    heic = pillow_heif.from_bytes(mode="RGB;16", size=(48, 32), data=deep.tobytes())
    out = io.BytesIO()
    heic.save(out, quality=-1)
    encoded = out.getvalue()
    assert Image.open(io.BytesIO(encoded)).info["bit_depth"] == 10

    image = decode_image(encoded, LIMITS)

    assert image.pixels.dtype == np.uint8
    _assert_quadrants(image.pixels, (RED, BLUE, GREEN, WHITE))


@pytest.mark.parametrize("fmt", FORMATS)
def test_transparency_is_flattened_over_white(fmt: str) -> None:
    rgba = np.asarray(_quadrants(48, 32).convert("RGBA")).copy()
    rgba[:, 24:, 3] = 0  # the right half fully transparent

    image = decode_image(_encode(Image.fromarray(rgba), fmt), LIMITS)

    _assert_quadrants(image.pixels, (RED, WHITE, GREEN, WHITE))


# --- Orientation: applied once, whoever applies it ---------------------------------------------

# As in test_images.py: the stored 200x100 picture is red, blue / green, white; 6 turns it 90°
# clockwise to view, 8 the other way, 3 upside down; 5 is 6 mirrored.
ORIENTATIONS = [
    pytest.param(3, (200, 100), (WHITE, GREEN, BLUE, RED), id="3-rotate-180"),
    pytest.param(6, (100, 200), (GREEN, RED, WHITE, BLUE), id="6-rotate-90-cw"),
    pytest.param(8, (100, 200), (BLUE, WHITE, RED, GREEN), id="8-rotate-90-ccw"),
    pytest.param(5, (100, 200), (RED, GREEN, BLUE, WHITE), id="5-transpose"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("orientation", "viewed_size", "quadrants"), ORIENTATIONS)
def test_irot_and_imir_turn_the_picture_exactly_once(
    fmt: str,
    orientation: int,
    viewed_size: tuple[int, int],
    quadrants: tuple[tuple[int, int, int], ...],
) -> None:
    encoded = _encode(_quadrants(200, 100), fmt, exif=_exif(orientation))
    assert b"irot" in encoded  # the turn is in the HEIF transform boxes, as phones write it

    image = decode_image(encoded, LIMITS)

    assert (image.width, image.height) == viewed_size
    assert image.pixels.shape == (viewed_size[1], viewed_size[0], 3)
    _assert_quadrants(image.pixels, quadrants)


# --- Limits, from the header ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("size", "message"),
    [
        pytest.param(
            (12_000, 100), r"^image is 12000x100; the longest side may be 10000$", id="side"
        ),
        # Over twice the pixel limit Pillow's own bomb check may speak first, once the service
        # has made Pillow's limit ours (`use_pixel_limit`, process-wide): either refusal holds.
        pytest.param((9000, 9000), r"81000000 pixels", id="px"),
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_size_over_our_limits_is_refused_from_the_header(
    fmt: str, size: tuple[int, int], message: str, no_decoding: None
) -> None:
    encoded = _declaring(_encode(_quadrants(48, 32), fmt), *size)

    with pytest.raises(ImageTooLarge, match=message):
        decode_image(encoded, LIMITS)


def test_a_small_crop_of_a_huge_coded_heic_is_refused_from_the_coded_size(
    no_decoding: None,
) -> None:
    """x265 codes 48x32 as 64x64 and crops it back with a `clap` box: Pillow reports the crop, but
    libheif would decode the whole coded picture first."""
    encoded = _declaring(_encode(_quadrants(48, 32), "HEIF"), 9000, 9000)
    assert b"clap" in encoded
    assert Image.open(io.BytesIO(encoded)).size == (48, 32)

    with pytest.raises(ImageTooLarge, match=r"^image is 9000x9000 = 81000000 pixels"):
        decode_image(encoded, LIMITS)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "size", [(100_000, 100_000), (40_000, 1), (2**32 - 1, 2**32 - 1)], ids=lambda s: str(s[0])
)
def test_bomb_no_decoder_would_allocate_is_too_large_at_once(
    fmt: str, size: tuple[int, int], no_decoding: None
) -> None:
    """Sizes up to 2^64 pixels: whoever refuses them (Pillow's bomb check, libheif's or libavif's
    limits), they end as image_too_large, within milliseconds."""
    encoded = _declaring(_encode(_quadrants(48, 32), fmt), *size)
    started = time.monotonic()

    with pytest.raises(ImageTooLarge):
        decode_image(encoded, LIMITS)

    assert time.monotonic() - started < 0.5


def test_heic_coded_larger_than_its_header_says_is_undecodable_not_a_crash() -> None:
    """libheif refuses to allocate a picture far larger than the header's, as a RuntimeError that
    service.core.heif turns into what Pillow's readers raise."""
    encoded = _declaring(_encode(Image.new("RGB", (512, 512), BLUE), "HEIF"), 64, 64)

    with pytest.raises(ImageDecodeFailed, match=r"libheif: .*Security limit exceeded"):
        decode_image(encoded, LIMITS)


def test_libheifs_errors_stay_translated_when_someone_registers_pillow_heif_again() -> None:
    pillow_heif.register_heif_opener()  # as imageio's Pillow plugin does
    encoded = _declaring(_encode(Image.new("RGB", (512, 512), BLUE), "HEIF"), 64, 64)

    with pytest.raises(ImageDecodeFailed, match=r"libheif: "):
        decode_image(encoded, LIMITS)


def test_avif_coding_more_than_its_header_says_is_too_large_before_decoding(
    no_decoding: None,
) -> None:
    """libavif decodes at the size of the AV1 sequence header, whatever `ispe` says (a few
    hundred bytes can code 16384x16384); here 1500x1500 declared as 64x64, under small limits."""
    small_limits = ImageLimits(
        max_image_bytes=5_000_000, max_image_pixels=1_000_000, max_image_side=1000, resize_side=512
    )
    flat = _encode(Image.new("RGB", (1500, 1500), BLUE), "AVIF", speed=10)
    encoded = _declaring(flat, 64, 64)
    assert len(encoded) < 2000
    assert Image.open(io.BytesIO(encoded)).size == (64, 64)

    with pytest.raises(ImageTooLarge, match=r"^image is 1500x1500; the longest side may be 1000$"):
        decode_image(encoded, small_limits)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_declared_size_is_undecodable(fmt: str) -> None:
    with pytest.raises(ImageDecodeFailed):
        decode_image(_declaring(_encode(_quadrants(48, 32), fmt), 0, 5), LIMITS)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.97])
def test_truncated_heic_and_avif_are_undecodable(fmt: str, fraction: float) -> None:
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)
    encoded = _encode(Image.fromarray(noise), fmt)

    with pytest.raises(ImageDecodeFailed):
        decode_image(encoded[: int(len(encoded) * fraction)], LIMITS)


@pytest.mark.parametrize("brand", [b"heic", b"mif1", b"avif"])
def test_a_bare_ftyp_box_is_undecodable_not_unsupported(brand: bytes) -> None:
    with pytest.raises(ImageDecodeFailed):
        decode_image(b"\0\0\0\x18ftyp" + brand + bytes(76), LIMITS)


# --- Animations and image collections ------------------------------------------------------------

COLOURS = (RED, GREEN, BLUE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_first_frame_is_judged_and_more_when_asked(fmt: str) -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in COLOURS]
    encoded = _encode(frames[0], fmt, save_all=True, append_images=frames[1:])

    first = decode_image(encoded, LIMITS)
    every = decode_image(encoded, ImageLimits(**{**LIMITS.__dict__, "frames": 3}))

    assert first.frame_indexes == (0,)
    _assert_quadrants(first.pixels, (RED,) * 4)
    assert every.frame_indexes == (0, 1, 2)
    for pixels, colour in zip((every.pixels, *every.more_frames), COLOURS, strict=True):
        _assert_quadrants(pixels, (colour,) * 4)


# --- One decoder per format ----------------------------------------------------------------------


def test_libheif_has_no_av1_decoder_so_pillow_alone_decodes_avif() -> None:
    decoders = pillow_heif.libheif_info()["decoders"]
    assert not any("av1" in name.lower() or "dav1d" in name.lower() for name in decoders)


@pytest.mark.parametrize(
    ("fmt", "brand"), [("AVIF", b"mif1"), ("HEIF", b"mif1"), ("HEIF", b"msf1")]
)
def test_a_brand_both_plugins_accept_reaches_the_decoder_of_its_codec(
    fmt: str, brand: bytes
) -> None:
    encoded = _with_major_brand(_encode(_quadrants(48, 32), fmt), brand)

    image = decode_image(encoded, LIMITS)

    assert image.format == fmt
    _assert_quadrants(image.pixels, (RED, BLUE, GREEN, WHITE))


def test_decoders_use_one_thread_no_thumbnails_and_keep_libheifs_limits() -> None:
    assert pillow_heif.options.DECODE_THREADS == 1
    assert AvifImagePlugin.DEFAULT_MAX_THREADS == 1
    assert pillow_heif.options.THUMBNAILS is False
    assert pillow_heif.options.DISABLE_SECURITY_LIMITS is False


# --- The size read without a decoder -------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_declared_size_reads_the_ispe_box(fmt: str) -> None:
    encoded = _encode(_quadrants(96, 64), fmt)  # whole 8x8 blocks: no crop box

    assert heif.declared_size(encoded) == (96, 64)
    assert heif.declared_size(_declaring(encoded, 70_000, 3)) == (70_000, 3)


@pytest.mark.parametrize("size", [(1, 1), (48, 32), (96, 64), (1200, 800)])
def test_av1_coded_size_reads_the_sequence_header(size: tuple[int, int]) -> None:
    encoded = _declaring(_encode(Image.new("RGB", size), "AVIF"), 1, 1)

    assert heif.av1_coded_size(encoded) == size
    assert heif.coded_size(encoded, "AVIF") == size
    assert heif.coded_size(encoded, "HEIF") == (1, 1)  # no AV1 in a HEIC: the ispe box alone


def _with_iloc_extents_repeated(encoded: bytes, times: int) -> bytes:
    """An AVIF whose one item lists its one extent `times` times (iloc version 0, 4-byte offsets
    and lengths, no base offset: what Pillow's encoder writes)."""
    at = encoded.index(b"iloc") + 4
    size = struct.unpack(">I", encoded[at - 8 : at - 4])[0]
    version, sizes, count = (
        encoded[at],
        encoded[at + 4],
        struct.unpack(">H", encoded[at + 6 : at + 8]),
    )
    assert (version, sizes, count) == (0, 0x44, (1,))
    item = encoded[at + 8 : at + 8 + 2 + 2 + 2 + 8]
    item_id, reference, _, extent = item[:2], item[2:4], item[4:6], item[6:14]
    body = b"\0\0\0\0" + bytes([0x44, 0]) + struct.pack(">H", 1)
    body += item_id + reference + struct.pack(">H", times) + extent * times
    iloc = struct.pack(">I", len(body) + 8) + b"iloc" + body
    patched = bytearray(encoded[: at - 8] + iloc + encoded[at - 8 + size :])
    meta = patched.index(b"meta") - 4  # the box around iloc grows with it
    old_size = struct.unpack(">I", patched[meta : meta + 4])[0]
    patched[meta : meta + 4] = struct.pack(">I", old_size + len(iloc) - size)
    return bytes(patched)


def test_item_data_larger_than_the_file_is_refused_not_walked() -> None:
    encoded = _encode(Image.new("RGB", (96, 64)), "AVIF")
    repeated = _with_iloc_extents_repeated(encoded, 10_000)

    with pytest.raises(ImageDecodeFailed, match=r"^HEIF items overlap"):
        heif.av1_coded_size(repeated)


def _sequence(size: tuple[int, int], frames: int) -> bytes:
    colours = [Image.new("RGB", size, COLOURS[i % 3]) for i in range(frames)]
    return _encode(colours[0], "AVIF", save_all=True, append_images=colours[1:], speed=10)


def test_av1_coded_size_of_a_sequence_reads_its_track_samples() -> None:
    """Without its `meta` box (renamed `free`), only the track tells the size."""
    tracks_only = _sequence((32, 48), 3).replace(b"meta", b"free", 1)

    assert heif.declared_size(tracks_only) is None
    assert heif.av1_coded_size(tracks_only) == (32, 48)


def test_sample_sizes_past_the_file_are_refused_not_walked() -> None:
    encoded = bytearray(_sequence((32, 32), 3))
    at = encoded.index(b"stsz") + 8  # type, version and flags
    encoded[at : at + 4] = struct.pack(">I", 1_000_000)  # every sample 1 MB

    with pytest.raises(ImageDecodeFailed, match=r"^HEIF samples overlap"):
        heif.av1_coded_size(bytes(encoded))


@pytest.mark.parametrize(
    "encoded",
    [
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"\0\0\0\x18ftypheic",
        b"\0\0\0\x18ftypheic" + bytes(12) + b"\0\0\0\x01meta" + b"\xff" * 8,
        b"\0\0\0\x18ftypheic" + bytes(12) + b"\xff\xff\xff\xffmeta" + bytes(64),
        b"\0\0\0\x18ftypheic" + bytes(12) + b"\0\0\0\x00meta" + bytes(64),
    ],
    ids=["empty", "png", "ftyp-only", "64-bit-size-cut", "size-past-the-end", "size-0-empty"],
)
def test_declared_size_of_bytes_without_one_is_none(encoded: bytes) -> None:
    assert heif.declared_size(encoded) is None


def test_declared_size_survives_random_boxes() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        body = rng.integers(0, 256, int(rng.integers(0, 400)), np.uint8).tobytes()
        size = heif.declared_size(b"\0\0\0\x18ftypheic" + bytes(12) + body)
        assert size is None or len(size) == 2


# --- Damaged files: a dead letter, never a crash -------------------------------------------------


def test_damaged_heic_and_avif_fail_as_dead_letters_never_as_other_exceptions() -> None:
    """Random byte changes, mostly in the boxes: libavif's RuntimeError and a zero timescale's
    ZeroDivisionError came out of Pillow's AVIF plugin for about one file in forty before
    service.core.heif translated them."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8))
    turned = [picture.rotate(90), picture.rotate(180)]
    seeds = [
        _encode(picture, fmt, **params)
        for fmt in FORMATS
        for params in ({}, {"save_all": True, "append_images": turned})
    ]
    limits = ImageLimits(5_000_000, 4_000_000, 4096, 512, frames=3)
    rng = np.random.default_rng(11)
    outcomes: dict[str, int] = {}
    for _ in range(800):
        damaged = bytearray(seeds[rng.integers(len(seeds))])
        for _ in range(int(rng.choice([1, 2, 4, 16]))):
            reach = min(len(damaged), 600) if rng.random() < 0.7 else len(damaged)
            damaged[rng.integers(reach)] = rng.integers(256)
        try:
            decode_image(bytes(damaged), limits)
            outcome = "judged"
        except (ImageDecodeFailed, ImageTooLarge) as exc:
            outcome = exc.code
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    assert set(outcomes) <= {"judged", "image_decode_failed", "image_too_large"}
    assert outcomes["image_decode_failed"] > 100
