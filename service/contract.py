"""The published contract as JSON Schema files, for producers and consumers in any language.

The files in `service/schemas/` are generated from the pydantic models and committed; a test
fails when a model changes and the files were not regenerated (`python -m service schemas`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from service.events import ImageEvent
from service.verdicts import DeadLetter, Verdict

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
_BASE_ID = "https://guardstream.dev/schemas/"

SCHEMAS: dict[str, tuple[type[BaseModel], Literal["validation", "serialization"]]] = {
    "image-event.v1.json": (ImageEvent, "validation"),
    "verdict.v1.json": (Verdict, "serialization"),
    "dead-letter.v1.json": (DeadLetter, "serialization"),
}


def render(name: str) -> str:
    model, mode = SCHEMAS[name]
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": _BASE_ID + name,
        **model.model_json_schema(mode=mode),
    }
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCHEMAS:
        path = directory / name
        path.write_text(render(name))
        written.append(path)
    return written


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that differ from what the models generate now."""
    return [
        name
        for name in SCHEMAS
        if not (directory / name).exists() or (directory / name).read_text() != render(name)
    ]
