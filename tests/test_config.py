"""Settings: defaults that work with the embedded stack, and combinations refused at start-up."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings


def test_exactly_once_refuses_a_producer_without_idempotence() -> None:
    with pytest.raises(ValidationError, match="exactly-once needs enable_idempotence"):
        Settings(delivery="exactly-once", enable_idempotence=False)
    assert not Settings(enable_idempotence=False).enable_idempotence


def test_settings_come_from_guardstream_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDSTREAM_DELIVERY", "exactly-once")
    monkeypatch.setenv("GUARDSTREAM_MAX_IN_FLIGHT", "7")
    settings = Settings()
    assert (settings.delivery, settings.max_in_flight) == ("exactly-once", 7)
    monkeypatch.setenv("GUARDSTREAM_DELIVERY", "at-most-once")
    with pytest.raises(ValidationError, match="delivery"):
        Settings()
