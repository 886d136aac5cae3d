"""Real photos (scikit-image's samples) as JPEG bytes, and their re-encoded near-duplicates."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from PIL import Image
from skimage import data

from service.core.hashing import Pdq, pdq_of

PHOTOS: dict[str, Callable[[], npt.NDArray[np.uint8]]] = {
    "astronaut": data.astronaut,
    "coffee": data.coffee,
    "chelsea": data.chelsea,
    "rocket": data.rocket,
}


def jpeg(name: str, *, quality: int = 90, scale: float = 1.0) -> bytes:
    """A sample photo as a JPEG, resized by `scale`; another scale or quality: a near-duplicate."""
    image = Image.fromarray(PHOTOS[name]())
    if scale != 1.0:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def pdq_of_jpeg(encoded: bytes) -> Pdq:
    return pdq_of(np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")))


def digests(encoded: bytes) -> tuple[str, str]:
    """(sha256, md5) of encoded bytes, as `DecodedImage` has them."""
    return hashlib.sha256(encoded).hexdigest(), hashlib.md5(encoded).hexdigest()
