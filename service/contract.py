"""The published contract as JSON Schema files, for producers and consumers in any language.

The files in `service/schemas/` are generated from the pydantic models and the packaged
policies, and committed; a test fails when either changes and the files were not regenerated
(`python -m service schemas`). Besides the event contract, each packaged policy that expects a
JSON answer gets `answer.<policy id>.json`: the schema of that answer, which the TensorRT-LLM
guard uses for guided decoding, so that the model can only write answers this service reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from service.core.events import ImageEvent
from service.core.policies import Policy, PolicyRegistry
from service.core.reviews import ReviewDecision
from service.core.verdicts import DeadLetter, Verdict

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
_BASE_ID = "https://guardstream.dev/schemas/"

SCHEMAS: dict[str, tuple[type[BaseModel], Literal["validation", "serialization"]]] = {
    "image-event.v1.json": (ImageEvent, "validation"),
    "verdict.v1.json": (Verdict, "serialization"),
    "dead-letter.v1.json": (DeadLetter, "serialization"),
    "decisions.v1.json": (ReviewDecision, "validation"),
}


def answer_schema(policy: Policy) -> dict[str, Any]:
    """The JSON Schema of a LlavaGuard-style answer to `policy`, keys in the prompt's order."""
    labels = [category.label for category in policy.categories]
    return {
        "title": f"Answer to policy {policy.id} {policy.version}",
        "type": "object",
        "properties": {
            "rating": {"type": "string", "enum": ["Unsafe", "Safe"]},
            "category": {"type": "string", "enum": labels},
            "rationale": {"type": "string"},
        },
        "required": ["rating", "category", "rationale"],
        "additionalProperties": False,
    }


def _answer_schemas() -> dict[str, dict[str, Any]]:
    registry = PolicyRegistry.load()
    policies = (registry.get(policy_id) for policy_id in registry.ids())
    return {
        f"answer.{policy.id}.json": answer_schema(policy)
        for policy in policies
        if policy.answer_format == "llavaguard-json"
    }


def names() -> list[str]:
    return [*SCHEMAS, *_answer_schemas()]


def render(name: str) -> str:
    if name in SCHEMAS:
        model, mode = SCHEMAS[name]
        body = model.model_json_schema(mode=mode)
    else:
        body = _answer_schemas()[name]
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": _BASE_ID + name,
        **body,
    }
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names():
        path = directory / name
        path.write_text(render(name))
        written.append(path)
    return written


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that differ from what the models and policies generate now."""
    return [
        name
        for name in names()
        if not (directory / name).exists() or (directory / name).read_text() != render(name)
    ]
