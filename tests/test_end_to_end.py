"""The whole pipeline against the real broker and the real Triton with the CPU guard.

One run publishes a mix of real photos, made images and every kind of bad event, serves it
with the service in this process (so spans land in the in-memory exporter), and then checks
each outcome, its record key and headers, its trace, and the committed offsets.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service.app import serve
from service.client import ImageEventProducer
from service.dev import stack
from service.dev.samples import (
    PHOTOS,
    RULES_DIR,
    Sample,
    all_samples,
    decision_label,
    event_sample,
    photo_bytes,
    tenant_samples,
)
from tests.support.outputs import collect, committed_offsets, outcome_label, read_topic
from tests.support.stack import Topics

pytestmark = pytest.mark.stack

# A policy whose taxonomy has no nudity category: the CPU guard still answers with LlavaGuard's
# O4 for the colour wheel, an answer this policy cannot hold.
WEAPONS_ONLY_POLICY = """\
id = "weapons-only"
version = "0.1.0"
answer_format = "llavaguard-json"
safe_category = "NA"
categories = [
  { code = "O6", label = "O6: Weapons or Substance Abuse" },
  { code = "NA", label = "NA: None applying" },
]
prompt = '''Say whether the image shows weapons. Answer as JSON with rating, category, rationale.'''
"""


TENANTS = """\
[tenants.e2e-shop]
default_policy = "llavaguard-v1.2"
"""


POLICY_BY_TENANT = {
    "forum": "forum-nudity-review",
    "gallery": "art-platform",
    "newsroom": "news-observe",
}


def extra_samples(prefix: str) -> list[Sample]:
    """Events beyond the demo's mix, to reach every code and a few more shapes of bad input."""
    color = photo_bytes("color.png")

    return [
        event_sample(
            "weapons-only",
            "dead:unparseable_model_output",
            f"{prefix}weapons-only",
            image=color,
            policy_id="weapons-only",
        ),
        event_sample(
            "chelsea-with-metadata",
            "Safe/NA",
            f"{prefix}chelsea-with-metadata",
            image=photo_bytes("chelsea.png"),
            metadata={"user": "u-1", "tags": ["cat", "pet"], "nested": {"n": 1.5}},
        ),
        event_sample(
            "tenant",
            "Safe/NA",
            f"{prefix}tenant",
            image=photo_bytes("chelsea.png"),
            tenant="e2e-shop",
        ),
        event_sample(
            "policy the tenant may not use",
            "dead:policy_not_allowed",
            f"{prefix}not-allowed",
            image=color,
            tenant="e2e-shop",
            policy_id="weapons-only",
        ),
        event_sample(
            "unknown tenant", "dead:unknown_tenant", f"{prefix}stranger", image=color, tenant="x"
        ),
        Sample("array", b"[1, 2, 3]", "dead:invalid_event", None),
        Sample("empty value", b"", "dead:invalid_json", None),
        Sample(
            "huge record",
            orjson.dumps({"event_id": f"{prefix}huge", "pad": "x" * 900_000}),
            "dead:event_too_large",
            f"{prefix}huge",
        ),
        Sample(
            "extra field",
            orjson.dumps({"event_id": f"{prefix}extra", "image": {"data": "AAAA"}, "pic": 1}),
            "dead:invalid_event",
            f"{prefix}extra",
        ),
        Sample(
            "both sources",
            orjson.dumps(
                {
                    "event_id": f"{prefix}both",
                    "image": {"data": "AAAA", "url": "https://x.test/a.png"},
                }
            ),
            "dead:invalid_event",
            f"{prefix}both",
        ),
        Sample(
            "metadata too big",
            orjson.dumps(
                {
                    "event_id": f"{prefix}meta",
                    "image": {"data": base64.b64encode(color).decode()},
                    "metadata": {"blob": "m" * 5000},
                }
            ),
            "dead:invalid_event",
            f"{prefix}meta",
        ),
        Sample(
            "zero-byte image",
            orjson.dumps({"event_id": f"{prefix}zero", "image": {"data": "===="}}),
            "dead:invalid_event",
            f"{prefix}zero",
        ),
    ]


@dataclass
class Published:
    sample: Sample
    key: bytes
    trace_id: int
    partition: int
    offset: int


@dataclass
class Run:
    published: dict[bytes, Published]
    outcomes: dict[bytes, list[tuple[str, Any, dict[str, bytes]]]]
    """Outcome records by key: (topic, parsed value, headers)."""
    committed: dict[int, int | None]
    end_offsets: dict[int, int]
    spans: list[ReadableSpan]
    topics: Topics
    reviewed: list[tuple[bytes | None, dict[str, Any]]]
    """The review topic's records (key, parsed value), read_committed."""


@pytest.fixture(scope="module", params=["at-least-once", "exactly-once"])
async def run(
    request: pytest.FixtureRequest,
    embedded_stack: stack.StackState,
    spans: InMemorySpanExporter,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Run]:
    tag = uuid.uuid4().hex[:8]
    topics = await Topics.create(embedded_stack.bootstrap_servers, tag)
    policy_dir = tmp_path_factory.mktemp("policies")
    (policy_dir / "weapons-only.toml").write_text(WEAPONS_ONLY_POLICY)
    for demo_policy in (RULES_DIR / "policies").glob("*.toml"):  # the tenant samples use them
        shutil.copy(demo_policy, policy_dir)
    tenant_file = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    tenant_file.write_text(TENANTS + (RULES_DIR / "tenants.toml").read_text())
    settings = topics.settings(
        embedded_stack,
        policy_dir=policy_dir,
        tenant_file=tenant_file,
        unknown_tenant="dead-letter",
        max_event_bytes=800_000,
        max_in_flight=16,
        delivery=request.param,
        transactional_id=f"e2e-{tag}",
    )
    prefix = f"e2e-{tag}-"
    samples = all_samples(prefix) + extra_samples(prefix)
    assert len(samples) >= 30

    tracer = trace.get_tracer("tests")
    published: dict[bytes, Published] = {}
    async with ImageEventProducer(
        embedded_stack.bootstrap_servers, topics.input, max_request_size=2_000_000
    ) as producer:
        for i, sample in enumerate(samples):
            key = f"key-{i}".encode()
            with tracer.start_as_current_span(f"upload {sample.name}") as upload:
                sent = await producer.send_raw(
                    sample.value, key=key, event_id=sample.event_id, headers=list(sample.headers)
                )
            published[key] = Published(
                sample, key, upload.get_span_context().trace_id, sent.partition, sent.offset
            )

    stop = asyncio.Event()
    service = asyncio.create_task(serve(settings, stop))
    try:
        outcomes = await collect(embedded_stack.bootstrap_servers, topics, len(samples))
    finally:
        stop.set()
        await asyncio.wait_for(service, 60)
    committed, ends = await committed_offsets(embedded_stack.bootstrap_servers, topics)
    reviewed = await read_topic(embedded_stack.bootstrap_servers, topics.review)
    return Run(
        published, outcomes, committed, ends, list(spans.get_finished_spans()), topics, reviewed
    )


def test_every_event_ends_as_exactly_one_expected_outcome(run: Run) -> None:
    wrong = {}
    for key, sent in run.published.items():
        got = run.outcomes.get(key, [])
        labels = [outcome_label(topic, value, run.topics) for topic, value, _ in got]
        if labels != [sent.sample.expect]:
            wrong[sent.sample.name] = labels
    assert wrong == {}
    assert set(run.outcomes) == set(run.published)


def test_every_dead_letter_code_is_exercised(run: Run) -> None:
    codes = {
        value["error"]["code"]
        for got in run.outcomes.values()
        for topic, value, _ in got
        if topic == run.topics.dead_letters
    }
    assert codes >= {
        "invalid_json",
        "invalid_event",
        "event_too_large",
        "image_decode_failed",
        "image_too_large",
        "unsupported_image_format",
        "url_forbidden",
        "unparseable_model_output",
        "unknown_policy",
        "policy_not_allowed",
        "unknown_tenant",
    }


def test_a_tenants_verdict_names_the_tenant(run: Run) -> None:
    tenants = {"tenant": "e2e-shop", "color.png, forum": "forum", "color.png, gallery": "gallery"}
    tenants["color.png, newsroom"] = "newsroom"
    for sent in run.published.values():
        topic, value, _ = run.outcomes[sent.key][0]
        if topic == run.topics.verdicts:
            assert value["tenant"] == tenants.get(sent.sample.name)


def test_one_answer_is_decided_by_each_tenants_policy(run: Run) -> None:
    """The colour wheel, which the CPU guard rates Unsafe/O4: blocked by default, reviewed by the
    forum, Safe under the gallery's exception policy (the guard read the exception from the
    prompt), allowed but counted as a would-be block by the observe-only newsroom."""
    decided = {
        sent.sample.name: decision_label(run.outcomes[sent.key][0][1])
        for sent in run.published.values()
        if sent.sample.decision is not None
    }
    assert decided == {s.name: s.decision for s in tenant_samples("x-") if s.decision is not None}
    by_name = {p.sample.name: run.outcomes[p.key][0][1] for p in run.published.values()}
    assert by_name["color.png, no tenant"]["reasons"] == ["category:O4", "no_confidence"]
    assert by_name["color.png, forum"]["reasons"] == ["category:O4"]
    assert "declares O4: Nudity Content non-violating" in by_name["color.png, gallery"]["rationale"]
    assert by_name["color.png, gallery"]["policy_id"] == "art-platform"
    assert by_name["color.png, newsroom"]["reasons"][-1] == "observe_only"


def test_the_review_topic_holds_exactly_the_verdicts_marked_for_review(run: Run) -> None:
    marked = {
        key: value
        for key, got in run.outcomes.items()
        for topic, value, _ in got
        if topic == run.topics.verdicts and value["review"]
    }
    assert {run.published[key].sample.name for key in marked} >= {"color.png, forum"}
    assert sorted(key for key, _ in run.reviewed if key is not None) == sorted(marked)
    assert all(value == marked[key] for key, value in run.reviewed if key is not None)


def test_ordinary_photos_are_safe_and_the_colour_wheel_is_the_known_false_positive(
    run: Run,
) -> None:
    by_name = {p.sample.name: run.outcomes[p.key][0][1] for p in run.published.values()}
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
        assert (by_name[name]["rating"], by_name[name]["category"]) == (
            "Safe",
            "NA: None applying",
        )
    wheel = by_name["color.png"]
    assert (wheel["rating"], wheel["category_code"]) == ("Unsafe", "O4")
    assert "BUTTOCKS_EXPOSED 0.83" in wheel["rationale"]
    assert PHOTOS["color.png"] == "Unsafe/O4"


def test_verdicts_carry_provenance_key_and_headers(run: Run) -> None:
    for key, sent in run.published.items():
        topic, value, headers = run.outcomes[key][0]
        assert value["source"] == {
            "topic": run.topics.input,
            "partition": sent.partition,
            "offset": sent.offset,
        }
        assert value["event_id"] == sent.sample.event_id
        assert value["trace_id"] == f"{sent.trace_id:032x}"
        assert headers["traceparent"].decode().split("-")[1] == f"{sent.trace_id:032x}"
        if sent.sample.event_id is not None:
            assert headers["event-id"] == sent.sample.event_id.encode()
        if topic == run.topics.verdicts:
            assert value["policy_id"] == POLICY_BY_TENANT.get(value["tenant"], "llavaguard-v1.2")
            assert value["policy_version"]
            assert value["model"]["name"] == "nudenet-320n-rules"
            assert value["model"]["triton_model"] == "guard"
            assert len(value["image_sha256"]) == 64
            assert value["timings"]["total_ms"] >= value["timings"]["guard_ms"] > 0
        else:
            assert headers["error-code"] == value["error"]["code"].encode()


def test_metadata_is_echoed_and_the_image_hash_is_of_the_uploaded_bytes(run: Run) -> None:
    import hashlib

    sent = next(p for p in run.published.values() if p.sample.name == "chelsea-with-metadata")
    verdict = run.outcomes[sent.key][0][1]
    assert verdict["metadata"] == {"user": "u-1", "tags": ["cat", "pet"], "nested": {"n": 1.5}}
    assert verdict["image_sha256"] == hashlib.sha256(photo_bytes("chelsea.png")).hexdigest()


def test_unparseable_answers_are_dead_lettered_with_the_raw_answer(run: Run) -> None:
    sent = next(p for p in run.published.values() if p.sample.name == "weapons-only")
    letter = run.outcomes[sent.key][0][1]
    assert "O4" in letter["error"]["message"]
    assert '"rating": "Unsafe"' in letter["error"]["model_output"]


def test_dead_letters_keep_the_original_record(run: Run) -> None:
    for key, sent in run.published.items():
        topic, value, _ = run.outcomes[key][0]
        if topic != run.topics.dead_letters:
            continue
        original = base64.b64decode(value["original"] or "")
        assert value["original_size"] == len(sent.sample.value)
        assert original == sent.sample.value[: len(original)]
        assert value["original_truncated"] == (len(sent.sample.value) > 65_536)
        assert any(h["key"] == "traceparent" for h in value["original_headers"])


def test_committed_offsets_reach_the_end_of_every_partition(run: Run) -> None:
    assert run.committed == run.end_offsets
    assert sum(run.end_offsets.values()) == len(run.published)


def test_each_event_has_a_process_span_under_the_producer_with_step_children(run: Run) -> None:
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in run.spans:
        by_trace.setdefault(span.context.trace_id, []).append(span)
    for key, sent in run.published.items():
        topic, value, headers = run.outcomes[key][0]
        spans = by_trace[sent.trace_id]
        publish = one(spans, f"{run.topics.input} publish", SpanKind.PRODUCER)
        process = one(spans, f"{run.topics.input} process", SpanKind.CONSUMER)
        assert process.parent is not None
        assert process.parent.span_id == publish.context.span_id
        attributes = dict(process.attributes or {})
        assert attributes["messaging.destination.name"] == run.topics.input
        assert attributes["messaging.destination.partition.id"] == str(sent.partition)
        assert attributes["messaging.kafka.offset"] == sent.offset
        assert attributes["messaging.consumer.group.name"] == run.topics.group
        children = {
            s.name for s in spans if s.parent and s.parent.span_id == process.context.span_id
        }
        out = one(spans, f"{topic} publish", SpanKind.PRODUCER)
        assert headers["traceparent"].decode().split("-")[2] == f"{out.context.span_id:016x}"
        if topic == run.topics.verdicts:
            review = {f"{run.topics.review} publish"} if value["review"] else set()
            # A verdict known content decided (reuse, here) asked no model.
            model = {"guard infer"} if value["decided_by"] == "model" else set()
            steps = {"decode image", "known content", f"{topic} publish", *review, *model}
            assert children == steps
            assert attributes["messaging.message.id"] == sent.sample.event_id
        else:
            assert f"{topic} publish" in children
            assert attributes["error.type"] == value["error"]["code"]


def one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    matching = [s for s in spans if s.name == name and s.kind == kind]
    assert len(matching) == 1, f"{name}: {[s.name for s in spans]}"
    return matching[0]
