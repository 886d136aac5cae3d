"""Shadow mode on the real broker and Triton (CPU guard): the default policy as the candidate
beside the demo tenants' milder ones, in the service running in this process.

The colour wheel is Unsafe/O4 for the CPU guard: blocked under the default policy, sent to
review for the forum, allowed for the gallery (nudity is an exception there). With the default
policy shadowing, the forum's and the gallery's verdicts have a stricter shadow, a Safe photo an
agreeing one, and the live verdicts stay what the tenants' policies say.
"""

from __future__ import annotations

import asyncio

import pytest

from service.app import serve
from service.client import ImageEventProducer
from service.dev import stack
from service.dev.samples import RULES_DIR, photo_bytes
from service.ops.metrics import Metrics
from service.shadow import ShadowSettings
from tests.support.outputs import collect, read_topic
from tests.support.stack import Topics

pytestmark = pytest.mark.stack

EVENTS = {  # event id: (photo, tenant, live action, shadow agreement)
    "wheel-forum": ("color.png", "forum", "review", "stricter"),
    "wheel-gallery": ("color.png", "gallery", "allow", "stricter"),
    "wheel-none": ("color.png", None, "block", "agree"),
    "coffee-gallery": ("coffee.png", "gallery", "allow", "agree"),
}


async def test_the_candidate_policy_judges_beside_the_live_one_and_its_disagreement_is_counted(
    embedded_stack: stack.StackState, topics: Topics
) -> None:
    shadow_topic = f"{topics.verdicts}.shadow"
    await stack.create_topics(embedded_stack.bootstrap_servers, [shadow_topic], 3)
    async with ImageEventProducer(embedded_stack.bootstrap_servers, topics.input) as producer:
        for event_id, (photo, tenant, _, _) in EVENTS.items():
            await producer.send_image(
                photo_bytes(photo), event_id, content_type="image/png", tenant=tenant
            )
    settings = topics.settings(
        embedded_stack,
        policy_dir=RULES_DIR / "policies",
        tenant_file=RULES_DIR / "tenants.toml",
    )
    shadow = ShadowSettings(policy="llavaguard-v1.2", topic=shadow_topic)
    metrics, stop = Metrics(), asyncio.Event()
    service = asyncio.create_task(serve(settings, stop, metrics=metrics, shadow_settings=shadow))
    try:
        found = await collect(embedded_stack.bootstrap_servers, topics, len(EVENTS))
        shadowed = await shadow_records(embedded_stack.bootstrap_servers, shadow_topic)
    finally:
        stop.set()
        await asyncio.wait_for(service, 60)

    live = {key.decode(): records[0][1] for key, records in found.items()}
    assert {event_id: verdict["action"] for event_id, verdict in live.items()} == {
        event_id: action for event_id, (_, _, action, _) in EVENTS.items()
    }
    assert all(verdict["shadow"] is None for verdict in live.values())
    assert {event_id: value["shadow"]["agreement"] for event_id, value in shadowed.items()} == {
        event_id: agreement for event_id, (_, _, _, agreement) in EVENTS.items()
    }
    gallery = shadowed["wheel-gallery"]
    assert (gallery["policy_id"], gallery["action"], gallery["rating"]) == (
        "llavaguard-v1.2",
        "block",
        "Unsafe",
    )
    assert gallery["shadow"]["live_policy_version"] == live["wheel-gallery"]["policy_version"]
    stricter = metrics.registry.get_sample_value(
        "guardstream_shadow_verdicts_total",
        {"agreement": "stricter", "live_category": "O4", "category": "O4"},
    )
    assert stricter == 2


async def shadow_records(bootstrap: str, topic: str) -> dict[str, dict[str, object]]:
    """The shadow topic once it holds a verdict for every event (the shadow runs behind)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        records = {value["event_id"]: value for _, value in await read_topic(bootstrap, topic)}
        if len(records) >= len(EVENTS) or loop.time() > deadline:
            return records
        await asyncio.sleep(0.3)
