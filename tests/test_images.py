"""Image preprocessing: encoded bytes → bounded, oriented RGB pixels, or the error saying why not.

Every image here is made in the test with Pillow and numpy (scikit-image's sample photos where a
real photo helps); nothing is read from the network.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import random
import struct
import zlib
from datetime import timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import GifImagePlugin, Image, ImageFile

from service.core.errors import (
    ImageDecodeFailed,
    ImageTooLarge,
    InvalidEvent,
    UnsupportedImageFormat,
)
from service.core.images import (
    ALLOWED_FORMATS,
    DecodedImage,
    ImageLimits,
    decode_base64,
    decode_image,
    decode_inline,
    sample_frames,
    sniff_unsupported,
)

skimage_data = pytest.importorskip("skimage.data")

LIMITS = ImageLimits(
    max_image_bytes=5_000_000, max_image_pixels=40_000_000, max_image_side=10_000, resize_side=512
)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

Pixels = npt.NDArray[np.uint8]

# Captured at import, before any test runs: `serve()`, run in-process by the end-to-end tests,
# sets this process-wide limit to the service's own.
PILLOW_DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


@pytest.fixture(autouse=True)
def _pillows_default_bomb_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pin decode_image against Pillow's defaults, whatever ran before them."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_MAX_PIXELS)


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def _quadrants(width: int, height: int) -> Image.Image:
    """Top-left red, top-right blue, bottom-left green, bottom-right white."""
    pixels = np.empty((height, width, 3), np.uint8)
    top, left = slice(0, height // 2), slice(0, width // 2)
    bottom, right = slice(height // 2, height), slice(width // 2, width)
    pixels[top, left], pixels[top, right] = RED, BLUE
    pixels[bottom, left], pixels[bottom, right] = GREEN, WHITE
    return Image.fromarray(pixels)


def _quadrant_colours(pixels: Pixels) -> tuple[Pixels, Pixels, Pixels, Pixels]:
    """The pixels at the centres of the top-left, top-right, bottom-left, bottom-right quarters."""
    height, width = pixels.shape[:2]
    ys, xs = (height // 4, 3 * height // 4), (width // 4, 3 * width // 4)
    return pixels[ys[0], xs[0]], pixels[ys[0], xs[1]], pixels[ys[1], xs[0]], pixels[ys[1], xs[1]]


def _close(pixel: Pixels, colour: tuple[int, int, int], tolerance: int = 24) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - np.array(colour)) <= tolerance))


def _assert_quadrants(pixels: Pixels, colours: tuple[tuple[int, int, int], ...]) -> None:
    """Top-left, top-right, bottom-left, bottom-right quarters are (close to) `colours`."""
    seen = [tuple(int(c) for c in pixel) for pixel in _quadrant_colours(pixels)]
    assert all(
        _close(pixel, colour)
        for pixel, colour in zip(_quadrant_colours(pixels), colours, strict=True)
    ), (seen, colours)


def _photo(width: int, height: int) -> Image.Image:
    return Image.fromarray(skimage_data.astronaut()).resize((width, height))


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width`x`height` 1-bit pixels and whose data is garbage."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"not deflate data")
        + _png_chunk(b"IEND", b"")
    )


# --- Formats -------------------------------------------------------------------------------------

SOURCE = _quadrants(48, 32)
SOURCE_PIXELS = np.asarray(SOURCE)

FORMAT_SAMPLES = [
    pytest.param("JPEG", {"quality": 95, "subsampling": 0}, id="JPEG"),
    pytest.param("PNG", {}, id="PNG"),
    pytest.param("WEBP", {"lossless": True}, id="WEBP"),
    pytest.param("GIF", {}, id="GIF"),
    pytest.param("BMP", {}, id="BMP"),
    pytest.param("TIFF", {}, id="TIFF"),
]


def test_allowed_formats_are_the_eight_the_contract_names() -> None:
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")


@pytest.mark.parametrize(("fmt", "params"), FORMAT_SAMPLES)
def test_every_allowed_format_decodes_to_rgb_uint8_pixels(fmt: str, params: dict[str, Any]) -> None:
    encoded = _encode(SOURCE, fmt, **params)

    image = decode_image(encoded, LIMITS)

    assert isinstance(image, DecodedImage)
    assert image.pixels.shape == (32, 48, 3)
    assert image.pixels.dtype == np.uint8
    assert image.pixels.flags.c_contiguous
    assert (image.format, image.width, image.height) == (fmt, 48, 32)
    assert image.encoded_bytes == len(encoded)
    assert image.sha256 == hashlib.sha256(encoded).hexdigest()
    if fmt == "JPEG":
        assert np.abs(image.pixels.astype(int) - SOURCE_PIXELS).mean() < 4
    else:
        np.testing.assert_array_equal(image.pixels, SOURCE_PIXELS)


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {"compression": "tiff_lzw"})],
)
def test_photo_in_a_lossless_format_decodes_pixel_for_pixel(
    fmt: str, params: dict[str, Any]
) -> None:
    photo = skimage_data.astronaut()[100:228, 150:342]

    image = decode_image(_encode(Image.fromarray(photo), fmt, **params), LIMITS)

    np.testing.assert_array_equal(image.pixels, photo)


def test_sha256_is_of_the_encoded_bytes_not_the_pixels() -> None:
    png = _encode(SOURCE, "PNG")
    bmp = _encode(SOURCE, "BMP")

    from_png, from_bmp = decode_image(png, LIMITS), decode_image(bmp, LIMITS)

    np.testing.assert_array_equal(from_png.pixels, from_bmp.pixels)
    assert from_png.sha256 != from_bmp.sha256
    assert from_bmp.sha256 == hashlib.sha256(bmp).hexdigest()


# --- Downscaling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "factor"),
    [(1000, 500, 2), (500, 1000, 2), (1024, 1024, 2), (513, 100, 2), (2000, 3, 4), (1537, 9, 4)],
)
def test_image_larger_than_resize_side_is_reduced_by_a_whole_factor_keeping_aspect(
    width: int, height: int, factor: int
) -> None:
    encoded = _encode(_quadrants(width, height), "PNG")

    image = decode_image(encoded, LIMITS)

    out_height, out_width = image.pixels.shape[:2]
    # ceil(longer / 512): the smallest whole factor that fits, so the longer side lands in
    # [256, 512]; Pillow's reduce keeps a partial last block (ceil).
    assert (out_width, out_height) == (-(-width // factor), -(-height // factor))
    assert 256 <= max(out_width, out_height) <= 512
    assert (image.width, image.height) == (width, height)


@pytest.mark.parametrize(("width", "height"), [(300, 200), (512, 40), (1, 1)])
def test_image_not_larger_than_resize_side_is_not_upscaled(width: int, height: int) -> None:
    image = decode_image(_encode(_quadrants(width, height), "PNG"), LIMITS)

    assert image.pixels.shape == (height, width, 3)
    assert (image.width, image.height) == (width, height)


@pytest.mark.parametrize(
    ("width", "height", "shape"),
    [
        (3000, 2000, (250, 375, 3)),  # DCT 1/8: the longer side 375, in [256, 512]
        (1000, 700, (350, 500, 3)),  # DCT 1/2
        (4032, 3024, (378, 504, 3)),  # a phone's 12 MP: DCT 1/8
    ],
)
def test_large_jpeg_is_decoded_at_a_reduced_dct_scale_and_reports_its_uploaded_size(
    width: int, height: int, shape: tuple[int, int, int]
) -> None:
    encoded = _encode(_quadrants(width, height), "JPEG", quality=90)

    image = decode_image(encoded, LIMITS)

    assert image.pixels.shape == shape
    assert (image.width, image.height) == (width, height)
    _assert_quadrants(image.pixels, (RED, BLUE, GREEN, WHITE))


def _psnr(a: Pixels, b: Pixels) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255**2 / mse)


@pytest.mark.parametrize(
    ("fmt", "width", "height"),
    [
        ("JPEG", 1500, 1500),  # the 500 KB bench image's shape: DCT 1/2
        # A phone's 12 MP: DCT 1/4. Seconds of encoding and Lanczos: make test's, not check's.
        pytest.param("JPEG", 4032, 3024, marks=pytest.mark.slow),
        ("JPEG", 2225, 1669),  # DCT 1/2 to an odd size
        ("WEBP", 1920, 1080),  # no DCT scaling: box reduce by 2
        ("PNG", 1500, 1500),
    ],
)
@pytest.mark.parametrize("photo", ["astronaut", "coffee", "rocket"])
def test_reduced_pixels_stay_within_35_db_of_a_full_decode_and_lanczos(
    fmt: str, width: int, height: int, photo: str
) -> None:
    """The bound held for the guard's pixels (README "Pixels the guard gets"): against the
    best a resampler can do at the same size, a full decode and Lanczos, PSNR >= 35 dB on
    photos at the sizes users send (measured: 37.5 to 52 dB)."""
    rng = np.random.default_rng(7)
    source = Image.fromarray(getattr(skimage_data, photo)()).convert("RGB")
    grain = rng.integers(-6, 7, (height, width, 3))  # sensor noise: JPEG at phone sizes
    pixels = np.asarray(source.resize((width, height), Image.Resampling.LANCZOS)) + grain
    encoded = _encode(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), fmt)
    limits = ImageLimits(50_000_000, 40_000_000, max_image_side=10_000, resize_side=1152)

    image = decode_image(encoded, limits)

    out_height, out_width = image.pixels.shape[:2]
    assert 576 <= max(out_width, out_height) <= 1152
    reference = Image.open(io.BytesIO(encoded)).convert("RGB")
    reference = reference.resize((out_width, out_height), Image.Resampling.LANCZOS)
    assert _psnr(image.pixels, np.asarray(reference)) >= 35.0


# --- EXIF orientation ----------------------------------------------------------------------------

# The stored 200x100 picture has red top-left, blue top-right, green bottom-left, white
# bottom-right. Orientation 6 means "turn 90° clockwise to view": the left column becomes the top
# row, so the viewed picture is 100x200 with green top-left and red top-right. 8 is the other way
# round (left column to the bottom row); 3 is upside down.
ORIENTATIONS = [
    pytest.param(1, (200, 100), (RED, BLUE, GREEN, WHITE), id="1-as-stored"),
    pytest.param(3, (200, 100), (WHITE, GREEN, BLUE, RED), id="3-rotate-180"),
    pytest.param(6, (100, 200), (GREEN, RED, WHITE, BLUE), id="6-rotate-90-cw"),
    pytest.param(8, (100, 200), (BLUE, WHITE, RED, GREEN), id="8-rotate-90-ccw"),
]


@pytest.mark.parametrize(("orientation", "viewed_size", "quadrants"), ORIENTATIONS)
def test_jpeg_exif_orientation_turns_the_picture_as_a_viewer_sees_it(
    orientation: int,
    viewed_size: tuple[int, int],
    quadrants: tuple[tuple[int, int, int], ...],
) -> None:
    encoded = _encode(
        _quadrants(200, 100), "JPEG", quality=95, subsampling=0, exif=_exif(orientation)
    )

    image = decode_image(encoded, LIMITS)

    assert (image.width, image.height) == viewed_size
    assert image.pixels.shape == (viewed_size[1], viewed_size[0], 3)
    _assert_quadrants(image.pixels, quadrants)


def test_orientation_6_makes_the_red_left_half_the_top_half() -> None:
    stored = np.zeros((100, 200, 3), np.uint8)
    stored[:, :100] = RED
    stored[:, 100:] = BLUE
    encoded = _encode(Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=_exif(6))

    pixels = decode_image(encoded, LIMITS).pixels

    assert pixels.shape == (200, 100, 3)
    assert _close(pixels[:90].reshape(-1, 3).mean(axis=0).astype(np.uint8), RED)
    assert _close(pixels[110:].reshape(-1, 3).mean(axis=0).astype(np.uint8), BLUE)


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
)
def test_exif_orientation_is_honoured_beyond_jpeg(fmt: str, params: dict[str, Any]) -> None:
    encoded = _encode(_quadrants(200, 100), fmt, exif=_exif(6), **params)

    image = decode_image(encoded, LIMITS)

    assert (image.width, image.height) == (100, 200)
    np.testing.assert_array_equal(
        _quadrant_colours(image.pixels), np.array([GREEN, RED, WHITE, BLUE], np.uint8)
    )


def test_large_jpeg_with_orientation_6_is_turned_then_downscaled() -> None:
    encoded = _encode(_quadrants(2000, 1000), "JPEG", quality=90, exif=_exif(6))

    image = decode_image(encoded, LIMITS)

    assert (image.width, image.height) == (1000, 2000)
    assert image.pixels.shape == (500, 250, 3)  # DCT 1/4 of the stored 2000x1000, turned
    _assert_quadrants(image.pixels, (GREEN, RED, WHITE, BLUE))


@pytest.mark.parametrize(
    "exif",
    [
        pytest.param(b"Exif\x00\x00garbage", id="garbage"),
        pytest.param(b"Exif\x00\x00MM\x00*\x00\x00\xff\xff", id="ifd-offset-past-end"),
        pytest.param(b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff", id="truncated-ifd"),
        pytest.param(b"\x00" * 30, id="zeros"),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_exif_block_does_not_fail_decoding(exif: bytes) -> None:
    encoded = _encode(_quadrants(200, 100), "JPEG", quality=95, exif=exif)

    image = decode_image(encoded, LIMITS)

    assert (image.width, image.height) == (200, 100)
    assert image.pixels.shape == (100, 200, 3)


def _exif_orientation_6_with_mistyped_tag() -> bytes:
    """Orientation 6 plus SamplesPerPixel (a SHORT tag) stored as the ASCII string "Cam"."""
    entries = struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">HH", 6, 0)
    entries += struct.pack(">HHI", 0x0115, 2, 4) + b"Cam\x00"
    return b"Exif\x00\x00MM\x00*" + struct.pack(">IH", 8, 2) + entries + struct.pack(">I", 0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_with_a_mistyped_tag_next_to_an_orientation_does_not_fail_decoding(
    fmt: str,
) -> None:
    encoded = _encode(_quadrants(20, 10), fmt, exif=_exif_orientation_6_with_mistyped_tag())

    image = decode_image(encoded, LIMITS)

    assert image.pixels.shape == (image.height, image.width, 3)


# --- Colour modes --------------------------------------------------------------------------------


def _with_transparent_and_opaque_pixel(mode: str) -> Image.Image:
    """A 4x2 image: (0, 0) fully transparent black, (1, 0) opaque, the rest opaque too."""
    if mode == "RGBA":
        image = Image.new("RGBA", (4, 2), (*RED, 255))
        image.putpixel((0, 0), (0, 0, 0, 0))
    elif mode == "LA":
        image = Image.new("LA", (4, 2), (77, 255))
        image.putpixel((0, 0), (0, 0))
    else:  # "P": palette index 0 is transparent black, index 1 red
        image = Image.new("P", (4, 2), 1)
        image.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
        image.putpixel((0, 0), 0)
    return image


@pytest.mark.parametrize(
    ("mode", "fmt", "params", "opaque"),
    [
        pytest.param("RGBA", "PNG", {}, RED, id="RGBA-PNG"),
        pytest.param("RGBA", "WEBP", {"lossless": True}, RED, id="RGBA-WEBP"),
        pytest.param("RGBA", "TIFF", {}, RED, id="RGBA-TIFF"),
        pytest.param("LA", "PNG", {}, (77, 77, 77), id="LA-PNG"),
        pytest.param("P", "PNG", {"transparency": 0}, RED, id="P-PNG-transparency"),
        pytest.param("P", "GIF", {"transparency": 0}, RED, id="P-GIF-transparency"),
    ],
)
def test_transparency_is_composited_over_white(
    mode: str, fmt: str, params: dict[str, Any], opaque: tuple[int, int, int]
) -> None:
    encoded = _encode(_with_transparent_and_opaque_pixel(mode), fmt, **params)

    pixels = decode_image(encoded, LIMITS).pixels

    assert tuple(pixels[0, 0]) == WHITE
    assert tuple(pixels[0, 1]) == opaque


def test_half_transparent_black_over_white_is_mid_grey() -> None:
    encoded = _encode(Image.new("RGBA", (2, 2), (0, 0, 0, 128)), "PNG")

    pixels = decode_image(encoded, LIMITS).pixels

    assert np.all(np.abs(pixels.astype(int) - 127) <= 1)


def test_rgb_png_with_a_transparent_colour_key_is_composited_over_white() -> None:
    image = Image.new("RGB", (4, 2), RED)
    image.putpixel((0, 0), BLACK)
    encoded = _encode(image, "PNG", transparency=BLACK)

    pixels = decode_image(encoded, LIMITS).pixels

    assert tuple(pixels[0, 0]) == WHITE
    assert tuple(pixels[0, 1]) == RED


def _palette_image() -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([*RED, *GREEN, *BLUE] + [0, 0, 0] * 253)
    image.putdata([0, 1, 2])
    return image


def _one_bit_image() -> Image.Image:
    image = Image.new("1", (3, 1), 0)
    image.putpixel((1, 0), 1)
    return image


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        pytest.param(
            Image.new("CMYK", (3, 1), (0, 255, 255, 0)), "TIFF", [RED] * 3, id="CMYK-TIFF-red"
        ),
        pytest.param(
            Image.new("CMYK", (3, 1), (0, 0, 0, 0)), "JPEG", [WHITE] * 3, id="CMYK-JPEG-white"
        ),
        pytest.param(Image.new("L", (3, 1), 77), "PNG", [(77, 77, 77)] * 3, id="L"),
        pytest.param(_one_bit_image(), "PNG", [BLACK, WHITE, BLACK], id="1-bit"),
        pytest.param(_palette_image(), "PNG", [RED, GREEN, BLUE], id="P-PNG"),
        pytest.param(_palette_image(), "GIF", [RED, GREEN, BLUE], id="P-GIF"),
        pytest.param(_palette_image(), "BMP", [RED, GREEN, BLUE], id="P-BMP"),
    ],
)
def test_colour_modes_convert_to_rgb(
    image: Image.Image, fmt: str, expected: list[tuple[int, int, int]]
) -> None:
    pixels = decode_image(_encode(image, fmt), LIMITS).pixels

    assert [tuple(int(c) for c in p) for p in pixels[0]] == expected


def test_16_bit_greyscale_png_maps_its_range_onto_0_to_255() -> None:
    encoded = _encode(Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)), "PNG")
    assert Image.open(io.BytesIO(encoded)).mode == "I;16"

    pixels = decode_image(encoded, LIMITS).pixels

    np.testing.assert_array_equal(pixels[0], [[0, 0, 0], [128, 128, 128], [255, 255, 255]])


def test_dark_16_bit_greyscale_png_keeps_its_16_bit_scale() -> None:
    encoded = _encode(Image.fromarray(np.array([[0, 128, 129, 255]], np.uint16)), "PNG")

    pixels = decode_image(encoded, LIMITS).pixels

    # value / 65535 * 255, rounded: 128 -> 0.498, 129 -> 0.502, 255 -> 0.992
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 0, 1, 1])


def test_float_tiff_in_0_to_1_maps_onto_0_to_255() -> None:
    values = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    encoded = _encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(encoded)).mode == "F"

    pixels = decode_image(encoded, LIMITS).pixels

    np.testing.assert_array_equal(pixels[0, :, 1], [0, 64, 128, 255])
    assert np.all(pixels[..., 0] == pixels[..., 2])


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    encoded = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    animated = Image.open(io.BytesIO(encoded))
    assert isinstance(animated, GifImagePlugin.GifImageFile)
    assert animated.n_frames == 3

    image = decode_image(encoded, LIMITS)

    assert image.format == "GIF"
    assert np.all(image.pixels == np.array(RED, np.uint8))


def _animation(fmt: str, colours: list[tuple[int, int, int]], side: int = 8) -> bytes:
    frames = [Image.new("RGB", (side, side), colour) for colour in colours]
    exact = {"lossless": True} if fmt == "WEBP" else {}
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **exact)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_can_be_judged_at_evenly_spaced_frames(fmt: str) -> None:
    colours = [RED, GREEN, BLUE, WHITE, BLACK, RED, GREEN]
    limits = ImageLimits(5_000_000, 40_000_000, 10_000, 512, frames=3)

    image = decode_image(_animation(fmt, colours), limits)

    assert image.frame_indexes == (0, 3, 6)
    got = [tuple(int(c) for c in frame[0, 0]) for frame in (image.pixels, *image.more_frames)]
    assert got == [RED, WHITE, GREEN]


def test_still_images_and_a_frames_setting_of_one_judge_one_frame() -> None:
    animated = _animation("GIF", [RED, GREEN, BLUE])
    still = _encode(Image.new("RGB", (8, 8), RED), "PNG")

    assert decode_image(animated, LIMITS).more_frames == ()
    sampled = decode_image(still, ImageLimits(5_000_000, 40_000_000, 10_000, 512, frames=4))
    assert (sampled.frame_indexes, sampled.more_frames) == ((0,), ())


@pytest.mark.parametrize(
    ("frame_count", "wanted", "size", "max_pixels", "expected"),
    [
        (1, 5, (10, 10), 1000, [0]),
        (10, 1, (10, 10), 1000, [0]),
        (10, 2, (10, 10), 1000, [0, 9]),
        (10, 4, (10, 10), 1000, [0, 3, 6, 9]),
        (3, 8, (10, 10), 1000, [0, 1, 2]),
        # Only the first 5 frames fit a budget of 5 frames' pixels: reaching frame k decodes
        # every frame before it.
        (10_000, 3, (10, 10), 500, [0, 2, 4]),
        (10_000, 3, (100, 100), 500, [0]),
    ],
)
def test_sampled_frames_are_evenly_spaced_within_the_decoding_budget(
    frame_count: int, wanted: int, size: tuple[int, int], max_pixels: int, expected: list[int]
) -> None:
    assert sample_frames(frame_count, wanted, size, max_pixels) == expected


# --- Limits --------------------------------------------------------------------------------------


def test_bytes_over_max_image_bytes_raise_image_too_large() -> None:
    encoded = _encode(SOURCE, "PNG")
    limits = ImageLimits(len(encoded) - 1, 40_000_000, 10_000, 512)

    with pytest.raises(ImageTooLarge, match=rf"^image is {len(encoded)} bytes; the limit is ") as r:
        decode_image(encoded, limits)

    assert r.value.code == "image_too_large"


def test_bytes_at_max_image_bytes_are_decoded() -> None:
    encoded = _encode(SOURCE, "PNG")
    limits = ImageLimits(len(encoded), 40_000_000, 10_000, 512)

    assert decode_image(encoded, limits).encoded_bytes == len(encoded)


def _fail_if_pixels_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.fixture(scope="module")
def one_bit_7000_square_png() -> bytes:
    return _encode(Image.new("1", (7000, 7000)), "PNG", optimize=True)


def test_declared_pixels_over_limit_raise_without_decoding(
    one_bit_7000_square_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(one_bit_7000_square_png) < 10_000
    _fail_if_pixels_are_decoded(monkeypatch)

    with pytest.raises(
        ImageTooLarge, match=r"^image is 7000x7000 = 49000000 pixels; the limit is 40000000$"
    ):
        decode_image(one_bit_7000_square_png, LIMITS)


def test_header_declaring_too_many_pixels_is_too_large_even_if_its_data_is_garbage() -> None:
    with pytest.raises(ImageTooLarge, match=r"7000x7000 = 49000000 pixels"):
        decode_image(_png_header_only(7000, 7000), LIMITS)


def test_side_over_max_image_side_raises_image_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = _encode(Image.new("L", (3000, 10)), "PNG")
    limits = ImageLimits(5_000_000, 40_000_000, max_image_side=2000, resize_side=512)
    _fail_if_pixels_are_decoded(monkeypatch)

    with pytest.raises(ImageTooLarge, match=r"^image is 3000x10; the longest side may be 2000$"):
        decode_image(encoded, limits)


def test_side_at_max_image_side_is_decoded() -> None:
    encoded = _encode(Image.new("L", (2000, 10)), "PNG")
    limits = ImageLimits(5_000_000, 40_000_000, max_image_side=2000, resize_side=512)

    assert decode_image(encoded, limits).width == 2000


@pytest.mark.parametrize(
    ("side", "message"),
    [
        pytest.param(12_000, r"^image is 12000x12000; the longest side may be 10000$", id="ours"),
        pytest.param(100_000, r"could be decompression bomb", id="past-pillows-bomb-check"),
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_png_bomb_declaring_a_huge_size_raises_image_too_large(
    side: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_if_pixels_are_decoded(monkeypatch)

    with pytest.raises(ImageTooLarge, match=message):
        decode_image(_png_header_only(side, side), LIMITS)


# --- Corrupt and unsupported input ---------------------------------------------------------------


def _photo_bytes(fmt: str) -> bytes:
    return _encode(_photo(96, 64), fmt)


def _truncated(fmt: str) -> bytes:
    encoded = _photo_bytes(fmt)
    return encoded[: len(encoded) // 2]


def _header_then_garbage(fmt: str) -> bytes:
    return _photo_bytes(fmt)[:24] + random.Random(fmt).randbytes(600)


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param(b"", id="empty"),
        pytest.param(random.Random(0).randbytes(2000), id="random-bytes"),
        pytest.param(b"hello, world", id="text"),
        *(pytest.param(_truncated(fmt), id=f"truncated-{fmt}") for fmt in ALLOWED_FORMATS),
        *(
            pytest.param(_header_then_garbage(fmt), id=f"header-then-garbage-{fmt}")
            for fmt in ALLOWED_FORMATS
        ),
        pytest.param(b"\x89PNG\r\n\x1a\n", id="png-signature-only"),
        pytest.param(b"\xff\xd8\xff", id="jpeg-soi-only"),
        pytest.param(_png_header_only(0, 10), id="png-zero-width"),
    ],
)
def test_corrupt_input_raises_image_decode_failed(encoded: bytes) -> None:
    with pytest.raises(ImageDecodeFailed) as raised:
        decode_image(encoded, LIMITS)

    assert raised.value.code == "image_decode_failed"


def test_message_for_unrecognised_bytes_shows_how_they_start() -> None:
    with pytest.raises(
        ImageDecodeFailed,
        match=(
            r"^not a recognisable JPEG/PNG/WEBP/GIF/BMP/TIFF/AVIF/HEIF image "
            r"\(starts with 68 65 6c 6c"
        ),
    ):
        decode_image(b"hello, world", LIMITS)


_SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'

UNSUPPORTED = [
    pytest.param(_encode(Image.new("RGB", (8, 8)), "PDF"), "PDF", id="PDF"),
    pytest.param(_SVG, "SVG", id="SVG"),
    pytest.param(b"\n  \t" + _SVG, "SVG", id="SVG-leading-whitespace"),
    pytest.param(b'<?xml version="1.0"?>\n' + _SVG, "SVG/XML", id="SVG-xml-declaration"),
    pytest.param(_encode(Image.new("RGB", (16, 16)), "ICO"), "ICO", id="ICO"),
    pytest.param(b"8BPS\x00\x01" + bytes(64), "PSD", id="PSD"),
    pytest.param(_encode(Image.new("RGB", (8, 8)), "EPS"), "PostScript", id="EPS-by-Pillow"),
    pytest.param(b"\xc5\xd0\xd3\xc6" + bytes(64), "EPS", id="EPS-binary-header"),
    pytest.param(_encode(Image.new("RGB", (8, 8)), "QOI"), "QOI", id="QOI"),
]


@pytest.mark.parametrize(("encoded", "name"), UNSUPPORTED)
def test_known_unsupported_format_raises_unsupported_naming_it(encoded: bytes, name: str) -> None:
    with pytest.raises(
        UnsupportedImageFormat,
        match=(
            rf"^{name} images are not supported; "
            "send one of JPEG, PNG, WEBP, GIF, BMP, TIFF, AVIF, HEIF$"
        ),
    ) as raised:
        decode_image(encoded, LIMITS)

    assert raised.value.code == "unsupported_image_format"
    assert sniff_unsupported(encoded) == name


@pytest.mark.parametrize(("fmt", "params"), FORMAT_SAMPLES)
def test_sniff_unsupported_does_not_claim_an_allowed_format(
    fmt: str, params: dict[str, Any]
) -> None:
    assert sniff_unsupported(_encode(SOURCE, fmt, **params)) is None


def test_eps_never_reaches_pillows_eps_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = _encode(Image.new("RGB", (8, 8)), "EPS")
    Image.init()

    def eps_factory(*args: object) -> Image.Image:
        raise AssertionError("Pillow's EPS plugin (and Ghostscript behind it) was reached")

    monkeypatch.setitem(Image.OPEN, "EPS", (eps_factory, lambda prefix: True))

    with pytest.raises(UnsupportedImageFormat, match=r"^PostScript images are not supported"):
        decode_image(eps, LIMITS)


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "TGA", "SGI"])
def test_format_pillow_reads_but_we_do_not_allow_is_not_decoded(fmt: str) -> None:
    encoded = _encode(Image.new("RGB", (8, 8), RED), fmt)
    assert Image.open(io.BytesIO(encoded)).format == fmt  # Pillow itself would decode it

    with pytest.raises(ImageDecodeFailed, match=r"^not a recognisable JPEG/PNG/WEBP/GIF/BMP/TIFF"):
        decode_image(encoded, LIMITS)


# --- Base64 --------------------------------------------------------------------------------------


def test_valid_base64_decodes_to_its_bytes() -> None:
    raw = bytes(range(256))

    assert decode_base64(base64.b64encode(raw).decode(), max_bytes=256) == raw


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("QQ=", id="bad-padding"),
        pytest.param("QQ", id="no-padding"),
        pytest.param("Q!==", id="bad-character"),
        pytest.param("QQ==\n", id="trailing-newline"),
        pytest.param("QUFB QUFB", id="space"),
        pytest.param("QUFB-_==", id="urlsafe-alphabet"),
        pytest.param("QUFBé===", id="non-ascii"),
        pytest.param("data:image/png;base64,iVBORw0KGgo=", id="data-url"),
    ],
)
def test_invalid_base64_raises_invalid_event(data: str) -> None:
    with pytest.raises(InvalidEvent, match=r"^image\.data is not valid base64: ") as raised:
        decode_base64(data, max_bytes=1024)

    assert raised.value.code == "invalid_event"


def test_base64_too_large_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def b64decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the string was decoded")

    monkeypatch.setattr(base64, "b64decode", b64decode)

    with pytest.raises(
        ImageTooLarge, match=r"^inline image is about 7500000 bytes; the limit is 1024"
    ):
        decode_base64("A" * 10_000_000, max_bytes=1024)


def test_base64_too_large_is_too_large_even_when_it_is_not_base64() -> None:
    with pytest.raises(ImageTooLarge):
        decode_base64("!" * 10_000_000, max_bytes=1024)


@pytest.mark.parametrize(("size", "too_large"), [(1024, False), (1025, True), (1026, True)])
def test_base64_limit_applies_to_the_decoded_size(size: int, too_large: bool) -> None:
    data = base64.b64encode(b"\x00" * size).decode()

    if too_large:
        with pytest.raises(
            ImageTooLarge, match=rf"^inline image is {size} bytes; the limit is 1024$"
        ):
            decode_base64(data, max_bytes=1024)
    else:
        assert len(decode_base64(data, max_bytes=1024)) == size


def test_base64_of_nothing_raises_image_decode_failed() -> None:
    with pytest.raises(ImageDecodeFailed, match=r"^image\.data decodes to zero bytes$"):
        decode_base64("", max_bytes=1024)


def test_decode_inline_decodes_a_base64_image() -> None:
    encoded = _encode(SOURCE, "PNG")

    image = decode_inline(base64.b64encode(encoded).decode(), LIMITS)

    np.testing.assert_array_equal(image.pixels, SOURCE_PIXELS)
    assert image.sha256 == hashlib.sha256(encoded).hexdigest()
    assert image.encoded_bytes == len(encoded)


def test_decode_inline_applies_max_image_bytes_to_the_decoded_image() -> None:
    encoded = _encode(SOURCE, "PNG")
    limits = ImageLimits(len(encoded) - 1, 40_000_000, 10_000, 512)

    with pytest.raises(ImageTooLarge):
        decode_inline(base64.b64encode(encoded).decode(), limits)


# --- Fuzzing -------------------------------------------------------------------------------------

_FUZZ_LIMITS = ImageLimits(
    max_image_bytes=1_000_000, max_image_pixels=4_000_000, max_image_side=4096, resize_side=64
)
_IMAGE_ERRORS = (ImageDecodeFailed, UnsupportedImageFormat, ImageTooLarge)


def _fuzz_seeds() -> list[bytes]:
    photo = _photo(40, 30)
    return [
        _encode(photo, "PNG"),
        _encode(photo, "JPEG", quality=80),
        _encode(photo, "JPEG", quality=80, progressive=True),
        _encode(photo.convert("P"), "GIF"),
        _encode(photo, "WEBP"),
        _encode(photo, "BMP"),
        _encode(photo, "TIFF", compression="tiff_lzw"),
        _encode(photo.convert("RGBA"), "PNG"),
    ]


_SEEDS = _fuzz_seeds()


@st.composite
def _mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        if not data:
            break
        at = draw(st.integers(min_value=0, max_value=len(data) - 1))
        action = draw(st.sampled_from(("flip", "truncate", "insert", "delete")))
        if action == "flip":
            data[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif action == "truncate":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(min_value=1, max_value=32))]
    return bytes(data)


def _decodes_or_raises_an_image_error(encoded: bytes) -> None:
    try:
        image = decode_image(encoded, _FUZZ_LIMITS)
    except _IMAGE_ERRORS:
        return
    assert image.pixels.dtype == np.uint8
    assert image.pixels.ndim == 3
    assert image.pixels.shape[2] == 3
    assert max(image.pixels.shape[:2]) <= _FUZZ_LIMITS.resize_side


_FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=3),
    suppress_health_check=[HealthCheck.too_slow],
)


@_FUZZ
@given(st.binary(max_size=4096))
@pytest.mark.filterwarnings("ignore")
def test_arbitrary_bytes_decode_or_raise_an_image_error(encoded: bytes) -> None:
    _decodes_or_raises_an_image_error(encoded)


@_FUZZ
@given(_mutated_images())
@pytest.mark.filterwarnings("ignore")
def test_mutated_real_images_decode_or_raise_an_image_error(encoded: bytes) -> None:
    _decodes_or_raises_an_image_error(encoded)
