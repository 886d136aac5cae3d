"""Judged items for the metrics and report tests: one line per item, defaults for the rest."""

from __future__ import annotations

from service.core.evaluation import Judged, Rating


def judged(
    id: str,
    expected: Rating,
    rating: Rating | None,
    *,
    expected_category: str | None = None,
    category: str | None = None,
    confidence: float | None = None,
    action: str | None = None,
    error: str | None = None,
    exceptions: tuple[str, ...] = (),
    latency_ms: float = 10.0,
) -> Judged:
    return Judged(
        id=id,
        line=1,
        expected_rating=expected,
        expected_category=expected_category,
        policy="llavaguard",
        exceptions=exceptions,
        tags={},
        rating=rating,
        category=category if rating is not None else None,
        confidence=confidence,
        action=action,
        error=error if rating is None else None,
        message=None,
        latency_ms=latency_ms,
    )


def dead_letter(
    id: str,
    expected: Rating,
    error: str,
    *,
    expected_category: str | None = None,
    latency_ms: float = 10.0,
) -> Judged:
    return judged(
        id,
        expected,
        None,
        error=error,
        expected_category=expected_category,
        latency_ms=latency_ms,
    )
