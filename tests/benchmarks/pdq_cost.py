"""Benchmark: what PDQ hashing adds to decoding an image, by image size.

    .venv/bin/python -m tests.benchmarks.pdq_cost --repeats 30

A script, not a test: its figures are read by people. Three JPEGs made from scikit-image's
astronaut photo: ~50 KB and ~500 KB (`jpeg_of_size`, as the throughput benchmark makes them) and
a 12 MP one (the photo upscaled to 4000x3000). Each is decoded with the service's default image
limits by `decode_image`, `--repeats` times with `pdq=False` and as many with `pdq=True`,
alternating so that both see the same machine; the table gives the median per image. PDQ hashes
the guard's downscaled pixels cut to 512 px, so its cost should not grow with the upload.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from dataclasses import replace

from PIL import Image

from service.app import limits_from
from service.config import Settings
from service.core.images import decode_image
from tests.benchmarks.report import markdown_table, number
from tests.benchmarks.throughput import jpeg_of_size
from tests.support.photos import PHOTOS


def twelve_megapixels() -> bytes:
    image = Image.fromarray(PHOTOS["astronaut"]()).resize((4000, 3000), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="decodes each way [%(default)s]")
    args = parser.parse_args(argv)
    without = replace(limits_from(Settings()).image, pdq=False)
    with_pdq = replace(without, pdq=True)
    images = {
        "~50 KB JPEG": jpeg_of_size(PHOTOS["astronaut"](), 50_000),
        "~500 KB JPEG": jpeg_of_size(PHOTOS["astronaut"](), 500_000),
        "12 MP JPEG": twelve_megapixels(),
    }
    rows = []
    figures = {}
    for name, encoded in images.items():
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for pdq, limits in ((False, without), (True, with_pdq)):
                began = time.perf_counter()
                decoded = decode_image(encoded, limits)
                times[pdq].append((time.perf_counter() - began) * 1000)
                assert (decoded.pdq is not None) == pdq
        plain, hashed = statistics.median(times[False]), statistics.median(times[True])
        figures[name] = (plain, hashed)
        pixels = f"{decoded.width}x{decoded.height}"
        rows.append(
            [name, number(len(encoded) / 1000), pixels, number(plain, 1), number(hashed, 1),
             number(hashed - plain, 1)]
        )  # fmt: skip
    header = ["image", "KB", "pixels", "decode p50 (ms)", "with PDQ p50 (ms)", "PDQ adds (ms)"]
    print(markdown_table(header, rows))
    return figures


if __name__ == "__main__":
    main()
