"""Hashes of a decoded image that known content is matched by: PDQ, and the bytes' digests.

PDQ (Meta's perceptual hash, `pdqhash`'s binding of the reference C++) gives 256 bits that
stay within a few bits of each other across re-encoding, resizing and small edits, and a
quality score: a flat or tiny image hashes to little information, and hashes under
`PDQ_MIN_QUALITY` are not used to match anything (PDQ's own recommendation). PDQ reduces the
image to 64x64 itself; it is given the guard's pixels cut to `PDQ_SIDE` (PDQ's authors hash
at most 512 px), so a 12 MP photo costs no more than a thumbnail. The hex form is
ThreatExchange's: the 256 bits in order, most significant first, so hashes from HMA and
ThreatExchange exports compare with ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pdqhash
from PIL import Image

PDQ_SIDE = 512
PDQ_MIN_QUALITY = 50
PDQ_MATCH_DISTANCE = 31
"""PDQ's confident-match threshold: at most 31 of 256 bits differ."""
PDQ_HEX_DIGITS = 64


@dataclass(frozen=True)
class Pdq:
    hex: str
    """64 lower-case hex digits."""
    quality: int
    """0-100: how much the image had to hash (flat or tiny images score low)."""

    @property
    def usable(self) -> bool:
        """Whether the hash is good enough to match near-duplicates with."""
        return self.quality >= PDQ_MIN_QUALITY


def pdq_of(pixels: npt.NDArray[np.uint8]) -> Pdq:
    """The PDQ hash of (H, W, 3) RGB pixels; reduced to at most PDQ_SIDE first."""
    # A box reduction by a whole factor: PDQ filters the image down to 64 x 64 itself, so a
    # resampling filter here would be paid for twice (it costs 9 ms at 1024 px, this 1 ms).
    factor = -(-max(pixels.shape[:2]) // PDQ_SIDE)
    if factor > 1:
        pixels = np.asarray(Image.fromarray(pixels).reduce(factor))
    bits, quality = pdqhash.compute(np.ascontiguousarray(pixels))
    return Pdq(hex=np.packbits(bits.astype(np.uint8)).tobytes().hex(), quality=int(quality))


def pdq_bytes(hex_digits: str) -> bytes:
    """The 32 bytes of a PDQ hex hash; ValueError unless it is 64 hex digits."""
    if len(hex_digits) != PDQ_HEX_DIGITS:
        raise ValueError(f"a PDQ hash is {PDQ_HEX_DIGITS} hex digits, not {len(hex_digits)}")
    return bytes.fromhex(hex_digits)


def pdq_distance(a: str, b: str) -> int:
    """Bits that differ between two PDQ hex hashes (Hamming distance, 0-256)."""
    return (int.from_bytes(pdq_bytes(a), "big") ^ int.from_bytes(pdq_bytes(b), "big")).bit_count()
