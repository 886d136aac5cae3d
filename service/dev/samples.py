"""Sample events for the demo and the end-to-end tests: real photos, made images, bad input.

Each sample knows the outcome it should have: a (rating, category code) verdict or a
dead-letter code, and for the tenant samples the decision too. Photos come from scikit-image's
`skimage.data` (the `demo` extra). The tenant samples need the demo's rules (`RULES_DIR`:
its policies as GUARDSTREAM_POLICY_DIR, its tenants.toml as GUARDSTREAM_TENANT_FILE).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.client import encode_event, image_event
from service.core.hashing import pdq_of
from service.core.reviews import ReviewDecision


@dataclass(frozen=True)
class Sample:
    name: str
    value: bytes
    expect: str
    """'Safe/NA', 'Unsafe/O4', ... for a verdict; 'dead:<code>' for a dead letter."""
    event_id: str | None
    headers: tuple[tuple[str, bytes], ...] = ()
    """Besides `event-id`: `content-type: image/...` marks the raw form."""
    decision: str | None = None
    """The verdict's `decision_label` when the sample pins it ('review', 'allow (would block)')."""
    decided_by: str | None = None
    """The verdict's `decided_by` when the sample pins it ('bank', 'human', 'reuse')."""


RULES_DIR = Path(__file__).resolve().parent / "rules"
"""The demo's example rules: `policies/` and `tenants.toml`."""


def outcome_label(outcome: dict[str, Any]) -> str:
    """'Unsafe/O4' for a verdict, 'dead:<code>' for a dead letter (parsed JSON of either)."""
    if "error" in outcome:
        return f"dead:{outcome['error']['code']}"
    return f"{outcome['rating']}/{outcome['category_code']}"


def decision_label(verdict: dict[str, Any]) -> str:
    """'block', 'review', 'allow (would block)' under observe-only, '+ sampled' when sampled."""
    action, would = verdict.get("action"), verdict.get("would_action")
    label = str(action) if action == would else f"{action} (would {would})"
    sampled = verdict.get("review") and action != "review"
    return f"{label} + sampled" if sampled else label


# skimage.data photos we rate Safe, and the one NudeNet gets wrong: the colour wheel in
# color.png scores 0.83 as BUTTOCKS_EXPOSED, above the default O4 threshold of 0.5.
PHOTOS: dict[str, str] = {
    "astronaut.png": "Safe/NA",
    "chelsea.png": "Safe/NA",
    "coffee.png": "Safe/NA",
    "rocket.jpg": "Safe/NA",
    "camera.png": "Safe/NA",
    "hubble_deep_field.jpg": "Safe/NA",
    "color.png": "Unsafe/O4",
}


# Kafka's default record limit is 1 MB, and base64 adds a third: bigger photos are sent as
# JPEG, as upload services do (or they send a URL).
_INLINE_BUDGET = 600_000


def photo_bytes(name: str) -> bytes:
    """The file as shipped inside scikit-image (no download), re-encoded if too big to inline."""
    from importlib import resources

    data = (resources.files("skimage") / "data" / name).read_bytes()
    if len(data) <= _INLINE_BUDGET:
        return data
    return _encode(Image.open(io.BytesIO(data)).convert("RGB"), "JPEG", quality=90)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _gradient(width: int, height: int) -> npt.NDArray[np.uint8]:
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    channels: npt.NDArray[np.float32] = np.stack(
        [
            np.broadcast_to(x, (height, width)),
            np.broadcast_to(y, (height, width)),
            np.full((height, width), 128.0),
        ],
        axis=-1,
    )
    return channels.astype(np.uint8)


def made_images() -> dict[str, bytes]:
    """Images built here, one per decoding path worth showing."""
    rng = np.random.default_rng(7)
    gradient = Image.fromarray(_gradient(640, 360))
    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF "rotate 90° clockwise": a phone photo held upright
    rgba = Image.fromarray(np.dstack([_gradient(300, 200), np.full((200, 300), 96, np.uint8)]))
    deep = (np.linspace(0, 65535, 256 * 256).reshape(256, 256)).astype(np.uint16)
    frames = [Image.fromarray(_gradient(120, 80)).rotate(a) for a in (0, 30, 60)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "gradient.webp": _encode(gradient, "WEBP", quality=80),
        "cmyk-rotated.jpg": _encode(gradient.convert("CMYK"), "JPEG", exif=rotated),
        "alpha.png": _encode(rgba, "PNG"),
        "grey16.png": _encode(Image.fromarray(deep), "PNG"),
        "animated.gif": animated.getvalue(),
        "noise.bmp": _encode(Image.fromarray(rng.integers(0, 255, (64, 96, 3), np.uint8)), "BMP"),
        "large.tiff": _encode(
            Image.fromarray(_gradient(2400, 1600)), "TIFF", compression="tiff_adobe_deflate"
        ),
    }


def event_sample(
    name: str, expect: str, event_id: str, *, image: bytes | None = None, **fields: Any
) -> Sample:
    return Sample(
        name, encode_event(image_event(event_id, image=image, **fields)), expect, event_id
    )


def bad_events(prefix: str) -> list[Sample]:
    """One event per dead-letter code a producer can cause."""
    jpeg = _encode(Image.fromarray(_gradient(400, 300)), "JPEG")
    huge = _encode(Image.new("1", (7000, 7000)), "PNG")  # 49 Mpx declared, 6 KB on the wire
    pdf = b"%PDF-1.7\n1 0 obj\n<< >>\nendobj\n"
    bad_base64 = b'{"event_id": "%sbad-base64", "image": {"data": "@@not base64@@"}}'
    return [
        Sample("not JSON", b"\x89 this is not json {", "dead:invalid_json", None),
        Sample("no event_id", b'{"image": {"data": "AAAA"}}', "dead:invalid_event", None),
        Sample(
            "bad base64",
            bad_base64 % prefix.encode(),
            "dead:invalid_event",
            f"{prefix}bad-base64",
        ),
        event_sample(
            "truncated JPEG",
            "dead:image_decode_failed",
            f"{prefix}truncated",
            image=jpeg[: len(jpeg) // 2],
        ),
        event_sample("PDF file", "dead:unsupported_image_format", f"{prefix}pdf", image=pdf),
        event_sample("49 Mpx PNG", "dead:image_too_large", f"{prefix}huge", image=huge),
        event_sample(
            "cloud metadata URL",
            "dead:url_forbidden",
            f"{prefix}url",
            url="http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        ),
        event_sample(
            "unknown policy",
            "dead:unknown_policy",
            f"{prefix}policy",
            image=jpeg,
            policy_id="no-such-policy",
        ),
    ]


def tenant_samples(prefix: str) -> list[Sample]:
    """The colour wheel the CPU guard rates Unsafe/O4, sent by each demo tenant: the same answer
    decided three ways, and a policy a tenant may not use."""
    color = photo_bytes("color.png")

    def sample(name: str, expect: str, decision: str | None, **fields: Any) -> Sample:
        sent = event_sample(name, expect, f"{prefix}{name}", image=color, **fields)
        return Sample(sent.name, sent.value, expect, sent.event_id, decision=decision)

    return [
        sample("color.png, no tenant", "Unsafe/O4", "block"),
        sample("color.png, forum", "Unsafe/O4", "review", tenant="forum"),
        sample("color.png, gallery", "Safe/O4", "allow", tenant="gallery"),
        sample("color.png, newsroom", "Unsafe/O4", "allow (would block)", tenant="newsroom"),
        sample(
            "gallery asks icm", "dead:policy_not_allowed", None, tenant="gallery",
            policy_id="icm-assistant",
        ),
    ]  # fmt: skip


def all_samples(prefix: str) -> list[Sample]:
    """Photos, made images and bad events, with event ids starting with `prefix`."""
    photos = [
        event_sample(
            name,
            expect,
            f"{prefix}{name}",
            image=photo_bytes(name),
            metadata={"file": name, "source": "skimage.data"},
        )
        for name, expect in PHOTOS.items()
    ]
    made = [
        event_sample(name, "Safe/NA", f"{prefix}{name}", image=data, metadata={"file": name})
        for name, data in made_images().items()
    ]
    raw = Sample(
        "rocket.jpg (raw record)",
        photo_bytes("rocket.jpg"),
        PHOTOS["rocket.jpg"],
        f"{prefix}raw-rocket.jpg",
        (("content-type", b"image/jpeg"),),
    )
    return [*photos, raw, *made, *tenant_samples(prefix), *bad_events(prefix)]


@dataclass(frozen=True)
class KnownContentSetup:
    """What the known-content samples need known before they are judged."""

    banks_toml: str
    """A banks file naming `bank.csv` beside it (GUARDSTREAM_BANKS_FILE)."""
    bank_csv: str
    decisions: tuple[ReviewDecision, ...]
    """To publish to the decisions topic before the service starts."""

    def write_banks(self, directory: Path) -> Path:
        """Write the banks file and its CSV into `directory`; the banks file's path."""
        (directory / "bank.csv").write_text(self.bank_csv)
        banks = directory / "banks.toml"
        banks.write_text(self.banks_toml)
        return banks


def known_samples(prefix: str) -> tuple[list[Sample], KnownContentSetup]:
    """An image a bank knows (sent as a near-duplicate: re-encoded and resized), an image a
    reviewer decided, and a photo sent twice; all under the default policy."""
    banked = Image.open(io.BytesIO(photo_bytes("ihc.png"))).convert("RGB")
    near = banked.resize((banked.width * 3 // 4, banked.height * 3 // 4))
    decided = photo_bytes("coins.png")
    twice = photo_bytes("moon.png")
    setup = KnownContentSetup(
        banks_toml=(
            '[[bank]]\nname = "demo-known-bad"\naction = "block"\ncategory = "O2"\n'
            'description = "images the demo declares known-bad"\n'
            'files = [{ path = "bank.csv", format = "csv" }]\n'
        ),
        bank_csv=f"kind,value,entry_id,note\npdq,{pdq_of(np.asarray(banked)).hex},kb-1,"
        "the original of a re-encoded copy\n",
        decisions=(
            ReviewDecision(
                event_id=f"{prefix}earlier-coins",
                image_sha256=hashlib.sha256(decided).hexdigest(),
                policy_id="llavaguard-v1.2",
                policy_version="1.2.0+demo",
                model_action="review",
                sampled=False,
                action="block",
                rating="Unsafe",
                category_code="O5",
                reviewer="reviewer-17",
                note="sold as counterfeit in an earlier listing",
                decided_at=datetime(2026, 12, 1, tzinfo=UTC),
            ),
        ),
    )

    def sample(name: str, image: bytes, expect: str, decided_by: str | None) -> Sample:
        sent = event_sample(name, expect, f"{prefix}{name}", image=image)
        return replace(sent, decided_by=decided_by)

    # The two moons are judged at once, in either order: one by the model, one by reuse.
    samples = [
        sample("ihc, re-encoded (bank)", _encode(near, "JPEG", quality=70), "Unsafe/O2", "bank"),
        sample("coins.png (reviewer)", decided, "Unsafe/O5", "human"),
        sample("moon.png", twice, "Safe/NA", None),
        sample("moon.png, sent again", twice, "Safe/NA", None),
    ]
    return samples, setup


def write_eval_samples(folder: Path) -> Path:
    """The sample photos and a labelled manifest of them, for trying `eval` on the embedded
    stack. The labels are a person's reading: every photo is Safe (the colour wheel too, which
    the CPU guard takes for nudity: a false positive the report shows), and the colour wheel
    once more with nudity declared an exception (O4), as an art platform's policy would."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for name in PHOTOS:
        (folder / name).write_bytes(photo_bytes(name))
        rows.append({"id": name, "image": name, "expected_rating": "Safe", "split": "samples"})
    rows.append(
        {"id": "color.png+O4", "image": "color.png", "expected_rating": "Safe"}
        | {"expected_category": "O4", "exceptions": ["O4"], "split": "samples"}
    )
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest
