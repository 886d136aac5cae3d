"""Verdict reuse stores: the key and what makes two keys differ, the in-process LRU, and the
Redis store against a real redis-server that is killed, restarted, or never answers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from service.adapters.redis_store import KEY_PREFIX, RedisStore, client_from
from service.app import store_from
from service.config import Settings
from service.core.reuse import MemoryStore, ReuseKey
from service.ops.metrics import Metrics
from tests.support.redis import RedisServer
from tests.support.stack import free_port

KEY = ReuseKey(
    image_sha256="ab" * 32,
    policy_id="llavaguard-v1.2",
    policy_version="1.2.1+281cc87e3207",
    model_name="nudenet-320n-rules",
    model_version="3.4.2+rules.210d90c2",
)
VERDICT = b'{"schema_version":1,"event_id":"upload-1","rating":"Safe"}'
TIMEOUT_S = 0.2


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def errors(metrics: Metrics, operation: str) -> float:
    value = metrics.registry.get_sample_value(
        "guardstream_reuse_store_errors_total", {"operation": operation}
    )
    return value or 0.0


# --- The key -----------------------------------------------------------------------------------


def test_key_text_is_pinned_so_pods_of_every_release_share_entries() -> None:
    assert KEY.text() == f"v1:{'ab' * 32}:1d110dfda6ed5e560f273631c0e9f6ea"


@pytest.mark.parametrize(
    "field", ["image_sha256", "policy_id", "policy_version", "model_name", "model_version"]
)
def test_a_change_to_any_part_of_the_key_is_another_key(field: str) -> None:
    changed = dataclasses.replace(KEY, **{field: getattr(KEY, field) + "x"})
    assert changed.text() != KEY.text()


def test_names_cannot_collide_by_moving_a_separator_between_fields() -> None:
    one = dataclasses.replace(KEY, policy_id="a:b", policy_version="c")
    other = dataclasses.replace(KEY, policy_id="a", policy_version="b:c")
    assert one.text() != other.text()


# --- MemoryStore -------------------------------------------------------------------------------


async def test_memory_store_returns_what_was_put_and_none_for_an_unknown_key() -> None:
    store = MemoryStore(max_entries=10, ttl_s=60)
    await store.put(KEY, VERDICT)
    assert await store.get(KEY) == VERDICT
    assert await store.get(dataclasses.replace(KEY, image_sha256="cd" * 32)) is None


@pytest.mark.parametrize("field", ["policy_version", "model_version"])
async def test_memory_store_does_not_reuse_across_policy_or_model_versions(field: str) -> None:
    store = MemoryStore(max_entries=10, ttl_s=60)
    await store.put(KEY, VERDICT)
    assert await store.get(dataclasses.replace(KEY, **{field: "2"})) is None


async def test_memory_store_evicts_the_least_recently_used_entry() -> None:
    store = MemoryStore(max_entries=2, ttl_s=60)
    first, second, third = (dataclasses.replace(KEY, image_sha256=c * 64) for c in "123")
    await store.put(first, b"1")
    await store.put(second, b"2")
    assert await store.get(first) == b"1"  # now second is the least recently used
    await store.put(third, b"3")
    assert len(store) == 2
    assert await store.get(second) is None
    assert await store.get(first) == b"1"
    assert await store.get(third) == b"3"


async def test_memory_store_forgets_an_entry_once_its_time_to_live_has_passed() -> None:
    clock = FakeClock()
    store = MemoryStore(max_entries=10, ttl_s=60, clock=clock)
    await store.put(KEY, VERDICT)
    clock.advance(59.9)
    assert await store.get(KEY) == VERDICT
    clock.advance(0.1)
    assert await store.get(KEY) is None
    assert len(store) == 0


async def test_memory_store_put_again_starts_the_time_to_live_again() -> None:
    clock = FakeClock()
    store = MemoryStore(max_entries=10, ttl_s=60, clock=clock)
    await store.put(KEY, b"old")
    clock.advance(50)
    await store.put(KEY, b"new")
    clock.advance(50)
    assert await store.get(KEY) == b"new"


# --- Choosing the store ------------------------------------------------------------------------


async def test_the_reuse_setting_chooses_no_store_the_memory_store_or_redis() -> None:
    metrics = Metrics()
    assert store_from(Settings(reuse="off"), metrics) is None
    assert isinstance(store_from(Settings(reuse="memory"), metrics), MemoryStore)
    redis = store_from(Settings(reuse="redis", redis_url="redis://127.0.0.1:1/0"), metrics)
    assert isinstance(redis, RedisStore)  # connects on first use, not here
    await redis.close()


# --- RedisStore without a server: failures, back-off, warnings ---------------------------------


def unreachable_store(metrics: Metrics, clock: FakeClock, **backoff: float) -> RedisStore:
    """A store on a loopback port nobody listens on: every connection is refused at once."""
    settings = Settings(
        reuse="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=TIMEOUT_S
    )
    return RedisStore(
        client_from(settings),
        ttl_s=60,
        timeout_s=TIMEOUT_S,
        metrics=metrics,
        clock=clock,
        **backoff,
    )


async def test_an_unreachable_store_answers_nothing_and_counts_the_failure() -> None:
    metrics, clock = Metrics(), FakeClock()
    store = unreachable_store(metrics, clock)
    assert await store.get(KEY) is None
    assert errors(metrics, "get") == 1
    clock.advance(60)
    await store.put(KEY, VERDICT)  # does not raise
    assert errors(metrics, "put") == 1
    await store.close()


async def test_after_a_failure_the_store_is_skipped_for_a_doubling_back_off() -> None:
    metrics, clock = Metrics(), FakeClock()
    store = unreachable_store(metrics, clock)
    for backoff_s in (1, 2, 4, 8, 16, 30, 30):
        assert await store.get(KEY) is None
        failed = errors(metrics, "get")
        clock.advance(backoff_s - 0.01)
        assert await store.get(KEY) is None
        await store.put(KEY, VERDICT)
        assert errors(metrics, "get") == failed, f"asked during the {backoff_s} s back-off"
        assert errors(metrics, "put") == 0
        clock.advance(0.01)
    await store.close()


async def test_concurrent_requests_failing_together_step_the_back_off_once() -> None:
    metrics, clock = Metrics(), FakeClock()
    store = unreachable_store(metrics, clock)
    await asyncio.gather(*(store.get(KEY) for _ in range(20)))
    assert errors(metrics, "get") == 20
    clock.advance(1)  # the first back-off, not 2**19 s
    assert await store.get(KEY) is None
    assert errors(metrics, "get") == 21
    await store.close()


async def test_failures_are_warned_about_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="service.adapters.redis_store")
    metrics, clock = Metrics(), FakeClock()
    store = unreachable_store(metrics, clock, first_backoff_s=1, max_backoff_s=1)
    for _ in range(11):  # at 0, 3, ... 30 s
        await store.get(KEY)
        clock.advance(3)
    await store.close()
    assert errors(metrics, "get") == 11
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # at 0 s and at 30 s
    assert "reuse store get failed (ConnectionError: " in warnings[0]
    assert "(10 failed requests since the last warning)" in warnings[1]


# --- RedisStore on a real redis-server ---------------------------------------------------------


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client to look at what the store wrote."""
    plain = Redis.from_url(redis_server.url)
    yield plain
    await plain.aclose()


def store_on(
    server: RedisServer, metrics: Metrics, clock: FakeClock | None = None, **settings: object
) -> RedisStore:
    values: dict[str, object] = {
        "reuse": "redis",
        "redis_url": server.url,
        "redis_timeout_s": TIMEOUT_S,
        "reuse_ttl_s": 3600,
        **settings,
    }
    parsed = Settings(**values)  # type: ignore[arg-type]
    if clock is None:
        return RedisStore.from_settings(parsed, metrics)
    return RedisStore(
        client_from(parsed), ttl_s=3600, timeout_s=TIMEOUT_S, metrics=metrics, clock=clock
    )


async def test_a_verdict_put_is_read_back_under_the_prefixed_key_with_its_ttl(
    redis_server: RedisServer, client: Redis
) -> None:
    metrics = Metrics()
    store = store_on(redis_server, metrics)
    assert await store.get(KEY) is None
    await store.put(KEY, VERDICT)
    assert await store.get(KEY) == VERDICT
    assert await store.get(dataclasses.replace(KEY, model_version="2")) is None
    name = KEY_PREFIX + KEY.text()
    assert store.name(KEY) == name
    assert await client.get(name) == VERDICT
    assert 3590 <= await client.ttl(name) <= 3600
    assert errors(metrics, "get") == errors(metrics, "put") == 0
    await store.close()


async def test_redis_forgets_the_verdict_when_the_ttl_runs_out(redis_server: RedisServer) -> None:
    store = store_on(redis_server, Metrics(), reuse_ttl_s=0.05)
    await store.put(KEY, VERDICT)
    assert await store.get(KEY) == VERDICT
    await asyncio.sleep(0.15)
    assert await store.get(KEY) is None
    await store.close()


async def test_a_killed_server_costs_no_wait_and_a_restarted_one_is_used_after_the_back_off(
    redis_server: RedisServer,
) -> None:
    metrics, clock = Metrics(), FakeClock()
    store = store_on(redis_server, metrics, clock)
    await store.put(KEY, VERDICT)
    assert await store.get(KEY) == VERDICT

    redis_server.kill()
    started = time.monotonic()
    assert await store.get(KEY) is None
    assert time.monotonic() - started < 2
    assert errors(metrics, "get") == 1

    assert await store.get(KEY) is None  # skipped: a refused connection would count
    await store.put(KEY, VERDICT)
    assert errors(metrics, "get") == 1
    assert errors(metrics, "put") == 0

    redis_server.restart()  # empty: Redis keeps nothing across a restart here
    assert await store.get(KEY) is None  # still in the back-off
    clock.advance(1)
    await store.put(KEY, VERDICT)
    assert await store.get(KEY) == VERDICT
    assert errors(metrics, "get") == 1
    assert errors(metrics, "put") == 0
    await store.close()


async def test_the_password_setting_authenticates_and_a_missing_one_is_a_counted_failure(
    redis_server: RedisServer, client: Redis
) -> None:
    await client.config_set("requirepass", "s3cret")
    metrics = Metrics()
    with_password = store_on(redis_server, metrics, redis_password="s3cret")
    await with_password.put(KEY, VERDICT)
    assert await with_password.get(KEY) == VERDICT
    without = store_on(redis_server, metrics)
    assert await without.get(KEY) is None
    assert errors(metrics, "get") == 1
    await with_password.close()
    await without.close()


async def test_an_acl_user_allowed_only_get_and_set_on_the_prefix_suffices(
    redis_server: RedisServer, client: Redis
) -> None:
    """The least privilege deploy/README.md recommends is enough for the store."""
    await client.acl_setuser(
        "guardstream",
        enabled=True,
        passwords=["+s3cret"],
        keys=[f"{KEY_PREFIX}*"],
        commands=["+get", "+set"],
    )
    metrics = Metrics()
    url = redis_server.url.replace("redis://", "redis://guardstream@")
    store = RedisStore.from_settings(
        Settings(reuse="redis", redis_url=url, redis_password="s3cret"), metrics
    )
    await store.put(KEY, VERDICT)
    assert await store.get(KEY) == VERDICT
    assert errors(metrics, "get") == errors(metrics, "put") == 0
    await store.close()


# --- RedisStore on a server that never answers -------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback port that takes connections and never answers a byte: the kernel completes
    the handshakes into the listen backlog, and nothing ever reads them."""
    with socket.create_server(("127.0.0.1", 0), backlog=128) as listener:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


async def test_a_server_that_never_answers_costs_at_most_the_timeout(silent_server: str) -> None:
    metrics = Metrics()
    store = RedisStore.from_settings(
        Settings(reuse="redis", redis_url=silent_server, redis_timeout_s=TIMEOUT_S), metrics
    )
    started = time.monotonic()
    assert await store.get(KEY) is None
    waited_s = time.monotonic() - started
    assert TIMEOUT_S * 0.9 <= waited_s < 2
    assert errors(metrics, "get") == 1
    await store.close()


async def test_concurrent_requests_to_a_silent_server_all_return_within_the_timeout(
    silent_server: str,
) -> None:
    metrics = Metrics()
    store = RedisStore.from_settings(
        Settings(reuse="redis", redis_url=silent_server, redis_timeout_s=TIMEOUT_S), metrics
    )
    started = time.monotonic()
    results = await asyncio.gather(
        *(store.get(dataclasses.replace(KEY, image_sha256=f"{i:064x}")) for i in range(32)),
        *(
            store.put(dataclasses.replace(KEY, image_sha256=f"{i:064x}"), VERDICT)
            for i in range(32)
        ),
    )
    assert time.monotonic() - started < 2
    assert results[:32] == [None] * 32
    assert errors(metrics, "get") + errors(metrics, "put") == 64
    await store.close()
