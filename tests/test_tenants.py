"""Tenant files: what a tenant may use, checked at load with the file and key named, and how an
event's tenant and policy id resolve to the policy it is judged by."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from service.core.errors import PolicyNotAllowed, UnknownPolicy, UnknownTenant
from service.core.pipeline import Outcome, Record
from service.core.policies import PolicyRegistry
from service.core.rules import Rules
from service.core.tenants import Tenant, Tenants, UnknownTenantRule
from service.core.verdicts import Verdict
from service.ops.metrics import Metrics
from tests.support.pipeline import (
    SAFE,
    ScriptedGuard,
    dead,
    event_record,
    jpeg,
    make_pipeline,
    policy_text,
    record,
)

POLICY_IDS = ("art-platform", "icm-assistant", "llavaguard-v1.2")
DEFAULT = "llavaguard-v1.2"

EXAMPLE = b"""
[tenants.acme-art]
default_policy = "art-platform"
allowed_policies = ["art-platform", "llavaguard-v1.2"]

[tenants.newsroom]
default_policy = "icm-assistant"

[tenants.plain]
"""


def tenants(raw: bytes = EXAMPLE, unknown_tenant: UnknownTenantRule = "default") -> Tenants:
    return Tenants.parse(
        raw,
        "tenants.toml",
        policy_ids=POLICY_IDS,
        default_policy=DEFAULT,
        unknown_tenant=unknown_tenant,
    )


# --- The file --------------------------------------------------------------------------------


def test_the_example_reads_with_defaults_filled_in() -> None:
    read = tenants()

    assert read.names() == ("acme-art", "newsroom", "plain")
    assert read.get("acme-art") == Tenant(
        "acme-art", "art-platform", ("art-platform", "llavaguard-v1.2")
    )
    assert read.get("newsroom") == Tenant("newsroom", "icm-assistant", ("icm-assistant",))
    assert read.get("plain") == Tenant("plain", DEFAULT, (DEFAULT,))


def test_an_empty_file_lists_no_tenant() -> None:
    assert tenants(b"").names() == ()


def test_allowed_policies_alone_keeps_the_service_default_when_it_is_allowed() -> None:
    read = tenants(b'[tenants.t]\nallowed_policies = ["icm-assistant", "llavaguard-v1.2"]\n')

    assert read.get("t") == Tenant("t", DEFAULT, ("icm-assistant", DEFAULT))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            b'[tenants.acme-art]\nalowed_policies = ["art-platform"]\n',
            "tenants.toml: tenants.acme-art.alowed_policies: unknown key "
            "(known: allowed_policies, default_policy)",
        ),
        (
            b'[tenant.acme]\ndefault_policy = "art-platform"\n',
            "tenants.toml: tenant: unknown key",
        ),
        (b'tenants = "acme"\n', "tenants.toml: tenants: must be a table"),
        (b"[tenants]\nacme = 3\n", "tenants.toml: tenants.acme: must be a table"),
        (
            b'[tenants.acme]\ndefault_policy = "art-platfrom"\n',
            "tenants.toml: tenants.acme.default_policy: tenant 'acme' names unknown policy "
            "'art-platfrom'; known policies: art-platform, icm-assistant, llavaguard-v1.2",
        ),
        (
            b'[tenants.acme]\nallowed_policies = ["llavaguard-v1.2", "nope"]\n',
            "tenants.toml: tenants.acme.allowed_policies[1]: tenant 'acme' names unknown "
            "policy 'nope'",
        ),
        (
            b"[tenants.acme]\ndefault_policy = 7\n",
            "tenants.toml: tenants.acme.default_policy: must be a string (a policy id), not int",
        ),
        (
            b'[tenants.acme]\nallowed_policies = ["llavaguard-v1.2", true]\n',
            "tenants.toml: tenants.acme.allowed_policies[1]: must be a string",
        ),
        (
            b'[tenants.acme]\nallowed_policies = "llavaguard-v1.2"\n',
            "tenants.toml: tenants.acme.allowed_policies: must be a non-empty array",
        ),
        (
            b"[tenants.acme]\nallowed_policies = []\n",
            "tenants.toml: tenants.acme.allowed_policies: must be a non-empty array",
        ),
        (
            b'[tenants.acme]\ndefault_policy = "icm-assistant"\n'
            b'allowed_policies = ["art-platform"]\n',
            "tenants.toml: tenants.acme.default_policy: 'icm-assistant' is not in allowed_policies",
        ),
        (
            b'[tenants.acme]\nallowed_policies = ["art-platform"]\n',
            "tenants.toml: tenants.acme.allowed_policies: lacks the service default policy "
            "'llavaguard-v1.2'",
        ),
        (
            b'[tenants."acme art"]\n',
            'tenants.toml: tenants."acme art": a tenant name must be 1-64 of',
        ),
        (b'[tenants."a.b/c"]\n', 'tenants.toml: tenants."a.b/c": a tenant name must be'),
        (b"[tenants." + b"t" * 65 + b"]\n", f"tenants.toml: tenants.{'t' * 65}: a tenant name"),
        (b"[tenants.unknown]\n", "tenants.toml: tenants.unknown: 'unknown' is reserved"),
        (b"[tenants.none]\n", "tenants.toml: tenants.none: 'none' is reserved"),
        (b"[tenants.acme\n", "tenants.toml: "),
        (b"\xff\xfe", "tenants.toml: "),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else None,
)
def test_a_bad_file_is_refused_naming_the_file_and_the_key(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        tenants(raw)


def test_load_reads_a_path_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_bytes(b"[tenants.acme]\nalowed = 1\n")

    with pytest.raises(ValueError, match=re.escape(f"{path}: tenants.acme.alowed: unknown key")):
        Tenants.load(path, policy_ids=POLICY_IDS, default_policy=DEFAULT)
    with pytest.raises(ValueError, match="cannot read the tenant file"):
        Tenants.load(tmp_path / "missing.toml", policy_ids=POLICY_IDS, default_policy=DEFAULT)


# --- Resolution --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "policy_id", "policy"),
    [
        (None, None, DEFAULT),
        (None, "icm-assistant", "icm-assistant"),
        (None, "not-loaded", "not-loaded"),  # the registry refuses it: unknown_policy
        ("acme-art", None, "art-platform"),
        ("acme-art", "art-platform", "art-platform"),
        ("acme-art", "llavaguard-v1.2", "llavaguard-v1.2"),
        ("newsroom", None, "icm-assistant"),
        ("plain", "llavaguard-v1.2", DEFAULT),
        ("stranger", None, DEFAULT),
        ("stranger", "icm-assistant", "icm-assistant"),
    ],
)
def test_resolution_gives_the_policy_of_the_table(
    tenant: str | None, policy_id: str | None, policy: str
) -> None:
    assert tenants().resolve(tenant, policy_id) == policy


@pytest.mark.parametrize(
    ("tenant", "policy_id"),
    [("acme-art", "icm-assistant"), ("newsroom", "llavaguard-v1.2"), ("plain", "not-loaded")],
)
def test_a_policy_the_tenant_may_not_use_is_not_allowed(tenant: str, policy_id: str) -> None:
    with pytest.raises(PolicyNotAllowed, match=f"tenant {tenant!r} may not use policy") as raised:
        tenants().resolve(tenant, policy_id)

    assert (raised.value.code, raised.value.retriable) == ("policy_not_allowed", False)


@pytest.mark.parametrize("policy_id", [None, "llavaguard-v1.2"])
def test_an_unknown_tenant_is_dead_lettered_when_the_setting_says_so(
    policy_id: str | None,
) -> None:
    strict = tenants(unknown_tenant="dead-letter")

    with pytest.raises(UnknownTenant, match="unknown tenant 'stranger'; known tenants: ") as raised:
        strict.resolve("stranger", policy_id)

    assert (raised.value.code, raised.value.retriable) == ("unknown_tenant", False)
    assert strict.resolve(None, policy_id) == (policy_id or DEFAULT)
    assert strict.resolve("acme-art", None) == "art-platform"


def test_labels_are_names_from_the_file_only() -> None:
    read = tenants()
    names = ("acme-art", "stranger", None)

    assert [read.label(t) for t in names] == ["acme-art", "unknown", "none"]
    assert [read.known(t) for t in names] == ["acme-art", None, None]


# --- Rules: policies and tenants together ------------------------------------------------------


def test_rules_without_a_tenant_file_behave_as_before_and_echo_the_tenant() -> None:
    rules = Rules(PolicyRegistry.load(), DEFAULT)

    assert rules.policy_for("anyone", None).id == DEFAULT
    assert rules.policy_for("anyone", "icm-assistant").id == "icm-assistant"
    assert rules.verdict_tenant("anyone") == "anyone"
    assert [rules.tenant_label(t) for t in ("anyone", None)] == ["unknown", "none"]
    with pytest.raises(UnknownPolicy):
        rules.policy_for(None, "not-loaded")


def test_rules_with_a_tenant_file_name_only_known_tenants_in_verdicts() -> None:
    registry = PolicyRegistry.load()
    raw = b'[tenants.news]\ndefault_policy = "icm-assistant"\n'
    read = Tenants.parse(raw, "t.toml", policy_ids=registry.ids(), default_policy=DEFAULT)
    rules = Rules(registry, DEFAULT, read)

    assert rules.policy_for("news", None).id == "icm-assistant"
    assert rules.policy_for("stranger", None).id == DEFAULT
    assert (rules.verdict_tenant("news"), rules.verdict_tenant("stranger")) == ("news", None)
    with pytest.raises(PolicyNotAllowed):
        rules.policy_for("news", DEFAULT)


def test_rules_need_their_default_policy() -> None:
    with pytest.raises(ValueError, match="the default policy 'gone' is not among the policies"):
        Rules(PolicyRegistry.load(), "gone")


# --- In the pipeline ---------------------------------------------------------------------------


@pytest.fixture
def tenant_settings(tmp_path: Path) -> dict[str, Any]:
    """A policy directory with art-platform, and the example tenant file naming it."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "art.toml").write_text(policy_text("art-platform"))
    (tmp_path / "tenants.toml").write_bytes(EXAMPLE)
    return {"policy_dir": tmp_path / "policies", "tenant_file": tmp_path / "tenants.toml"}


async def judged(
    rec: Record, metrics: Metrics | None = None, **settings: Any
) -> tuple[Outcome, ScriptedGuard]:
    guard = ScriptedGuard(SAFE)
    with ThreadPoolExecutor(1) as pool:
        outcome = await make_pipeline(guard, pool, metrics=metrics, **settings).judge(rec)
    return outcome, guard


def counted(metrics: Metrics, tenant: str, outcome: str) -> float | None:
    return metrics.registry.get_sample_value(
        "guardstream_tenant_outcomes_total", {"tenant": tenant, "outcome": outcome}
    )


@pytest.mark.parametrize(
    ("fields", "policy", "tenant", "label"),
    [
        ({"tenant": "acme-art"}, "art-platform", "acme-art", "acme-art"),
        ({"tenant": "acme-art", "policy_id": DEFAULT}, DEFAULT, "acme-art", "acme-art"),
        ({"tenant": "plain"}, DEFAULT, "plain", "plain"),
        ({"tenant": "stranger"}, DEFAULT, None, "unknown"),
        ({"tenant": "stranger", "policy_id": "art-platform"}, "art-platform", None, "unknown"),
        ({}, DEFAULT, None, "none"),
        ({"policy_id": "art-platform"}, "art-platform", None, "none"),
    ],
)
async def test_an_event_is_judged_by_its_tenants_policy_and_the_verdict_names_known_tenants(
    tenant_settings: dict[str, Any],
    fields: dict[str, str],
    policy: str,
    tenant: str | None,
    label: str,
) -> None:
    metrics = Metrics()
    outcome, _ = await judged(event_record(**fields), metrics, **tenant_settings)

    assert isinstance(outcome, Verdict), outcome
    assert (outcome.policy_id, outcome.tenant) == (policy, tenant)
    assert counted(metrics, label, "Safe") == 1


async def test_a_policy_the_tenant_may_not_use_is_dead_lettered_before_the_guard_is_asked(
    tenant_settings: dict[str, Any],
) -> None:
    metrics = Metrics()
    rec = event_record(tenant="newsroom", policy_id=DEFAULT)
    outcome, guard = await judged(rec, metrics, **tenant_settings)

    letter = dead(outcome)
    assert letter.error.code == "policy_not_allowed"
    assert letter.error.message.startswith("tenant 'newsroom' may not use policy")
    assert guard.calls == []
    assert counted(metrics, "newsroom", "policy_not_allowed") == 1


async def test_an_unknown_tenant_is_dead_lettered_when_set_to(
    tenant_settings: dict[str, Any],
) -> None:
    metrics = Metrics()
    rec = event_record(tenant="stranger")
    outcome, guard = await judged(rec, metrics, unknown_tenant="dead-letter", **tenant_settings)

    assert dead(outcome).error.code == "unknown_tenant"
    assert guard.calls == []
    assert counted(metrics, "unknown", "unknown_tenant") == 1


async def test_a_raw_record_names_its_tenant_in_a_header(
    tenant_settings: dict[str, Any],
) -> None:
    headers = (("content-type", b"image/jpeg"), ("event-id", b"raw-1"), ("tenant", b"acme-art"))
    outcome, _ = await judged(record(jpeg(), headers), **tenant_settings)

    assert isinstance(outcome, Verdict), outcome
    assert (outcome.tenant, outcome.policy_id) == ("acme-art", "art-platform")


async def test_without_a_tenant_file_the_tenant_is_only_echoed() -> None:
    metrics = Metrics()
    outcome, _ = await judged(event_record(tenant="anyone", policy_id="icm-assistant"), metrics)

    # As before tenants: the event's own policy (whose yes/no reader cannot read this answer).
    assert dead(outcome).error.code == "unparseable_model_output"
    outcome, _ = await judged(event_record(tenant="anyone"), metrics)
    assert isinstance(outcome, Verdict), outcome
    assert (outcome.tenant, outcome.policy_id) == ("anyone", DEFAULT)
    assert counted(metrics, "unknown", "Safe") == 1  # the label is never the event's string


async def test_a_dead_letter_of_a_known_tenant_is_counted_under_it(
    tenant_settings: dict[str, Any],
) -> None:
    metrics = Metrics()
    rec = event_record(tenant="acme-art", image=b"not an image")
    outcome, _ = await judged(rec, metrics, **tenant_settings)

    assert dead(outcome).error.code == "image_decode_failed"
    assert counted(metrics, "acme-art", "image_decode_failed") == 1


async def test_an_event_past_its_deadline_is_still_counted_under_its_tenant(
    tenant_settings: dict[str, Any],
) -> None:
    metrics = Metrics()
    with ThreadPoolExecutor(1) as pool:
        pipeline = make_pipeline(
            ScriptedGuard(5.0), pool, deadline_s=0.1, metrics=metrics, **tenant_settings
        )
        outcome = await pipeline.judge(event_record(tenant="acme-art"))

    assert dead(outcome).error.code == "deadline_exceeded"
    assert counted(metrics, "acme-art", "deadline_exceeded") == 1
