"""Hot reload of the policy files and the tenant file: new content is used for new records, a
record in flight keeps the rules it started with, a broken file keeps the rules in force."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from service.adapters.rules_source import InvalidRules, RulesFiles, RulesSource
from service.core.guard import GuardReply
from service.core.verdicts import Verdict
from service.ops.metrics import Metrics
from tests.support.pipeline import SAFE, ScriptedGuard, event_record, make_pipeline, policy_text
from tests.support.waiting import eventually

DEFAULT = "llavaguard-v1.2"


def tenants_text(acme_policy: str) -> str:
    return f'[tenants.acme]\ndefault_policy = "{acme_policy}"\n'


@pytest.fixture
def files(tmp_path: Path) -> RulesFiles:
    """Policies art-v1 and art-v2 in a policy directory; tenant acme uses art-v1."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "art-v1.toml").write_text(policy_text("art-v1"))
    (policies / "art-v2.toml").write_text(policy_text("art-v2"))
    (tmp_path / "tenants.toml").write_text(tenants_text("art-v1"))
    return RulesFiles(policies, tmp_path / "tenants.toml", DEFAULT)


def source(files: RulesFiles, interval_s: float = 0.0) -> tuple[RulesSource, Metrics]:
    metrics = Metrics()
    return RulesSource(files, metrics, interval_s=interval_s), metrics


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


class GatedGuard(ScriptedGuard):
    """Answers Safe once `release` is set; `asked` is set when a question arrives."""

    def __init__(self) -> None:
        super().__init__(SAFE)
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def ask(
        self,
        prompt: str,
        pixels: npt.NDArray[np.uint8],
        headers: Mapping[str, str] | None = None,
    ) -> GuardReply:
        self.asked.set()
        await self.release.wait()
        return await super().ask(prompt, pixels, headers)


# --- What counts as a change -------------------------------------------------------------------


def test_the_digest_follows_content_not_modification_times(files: RulesFiles) -> None:
    assert files.tenant_file is not None
    before = files.digest()
    stat = files.tenant_file.stat()

    files.tenant_file.write_text(tenants_text("art-v1"))
    assert files.digest() == before  # rewritten as it was: no change
    files.tenant_file.write_text(tenants_text("art-v2"))
    os.utime(files.tenant_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert files.digest() != before  # same time, other content: a change


def test_a_policy_file_added_or_removed_is_a_change(files: RulesFiles) -> None:
    assert files.policy_dir is not None
    before = files.digest()
    (files.policy_dir / "art-v3.toml").write_text(policy_text("art-v3"))
    assert files.digest() != before
    (files.policy_dir / "art-v3.toml").unlink()
    assert files.digest() == before


async def test_a_configmap_symlink_swap_is_reloaded(tmp_path: Path) -> None:
    # How Kubernetes updates a mounted ConfigMap: new files in a new directory, then `..data`
    # re-pointed at it in one rename; the visible names are links through `..data`.
    mount = tmp_path / "mount"
    for version in ("v1", "v2"):
        (mount / f"..{version}").mkdir(parents=True)
        (mount / f"..{version}" / "art.toml").write_text(policy_text("art", f"{version[1]}.0.0"))
    (mount / "..data").symlink_to("..v1")
    (mount / "art.toml").symlink_to("..data/art.toml")
    rules, _ = source(RulesFiles(mount, None, DEFAULT))
    assert rules.current().policies.get("art").version.startswith("1.0.0")

    (mount / "..data_tmp").symlink_to("..v2")
    (mount / "..data_tmp").rename(mount / "..data")

    assert await rules.reload()
    assert rules.current().policies.get("art").version.startswith("2.0.0")


# --- Reloading ---------------------------------------------------------------------------------


async def test_new_records_are_judged_under_the_reloaded_rules(files: RulesFiles) -> None:
    assert files.tenant_file is not None
    rules, metrics = source(files)
    first = rules.current()
    with ThreadPoolExecutor(1) as pool:
        pipeline = make_pipeline(ScriptedGuard(SAFE), pool, rules=rules.current)
        before = await pipeline.judge(event_record(tenant="acme"))

        assert not await rules.reload()  # nothing changed
        assert rules.current() is first
        files.tenant_file.write_text(tenants_text("art-v2"))
        assert await rules.reload()
        after = await pipeline.judge(event_record(tenant="acme"))

    assert isinstance(before, Verdict)
    assert isinstance(after, Verdict)
    assert (before.policy_id, after.policy_id) == ("art-v1", "art-v2")
    assert rules.current().digest != first.digest
    assert sample(metrics, "guardstream_rules_loaded_timestamp_seconds") == (
        rules.current().loaded_at
    )


async def test_a_record_in_flight_keeps_the_rules_it_started_with(files: RulesFiles) -> None:
    assert files.tenant_file is not None
    rules, _ = source(files)
    guard = GatedGuard()
    with ThreadPoolExecutor(1) as pool:
        pipeline = make_pipeline(guard, pool, rules=rules.current)
        in_flight = asyncio.create_task(pipeline.judge(event_record(tenant="acme")))
        await guard.asked.wait()  # judging has begun, under art-v1

        files.tenant_file.write_text(tenants_text("art-v2"))
        assert await rules.reload()
        later = asyncio.create_task(pipeline.judge(event_record(tenant="acme")))
        guard.release.set()
        started_before, started_after = await in_flight, await later

    assert isinstance(started_before, Verdict)
    assert isinstance(started_after, Verdict)
    assert (started_before.policy_id, started_after.policy_id) == ("art-v1", "art-v2")


async def test_a_broken_file_keeps_the_rules_in_force_and_counts_the_failure_once(
    files: RulesFiles, caplog: pytest.LogCaptureFixture
) -> None:
    assert files.tenant_file is not None
    rules, metrics = source(files)
    in_force = rules.current()
    assert sample(metrics, "guardstream_rules_reload_ok") == 1

    files.tenant_file.write_text('[tenants.acme]\ndefault_policy = "art-v2"\nalowed = 1\n')
    with caplog.at_level(logging.ERROR, "service.adapters.rules_source"):
        assert not await rules.reload()
        assert not await rules.reload()  # the same content again: not retried, not recounted

    assert rules.current() is in_force
    assert sample(metrics, "guardstream_rules_reload_ok") == 0
    assert sample(metrics, "guardstream_rules_reload_failures_total") == 1
    [logged] = caplog.records
    assert f"{files.tenant_file}: tenants.acme.alowed: unknown key" in logged.getMessage()

    files.tenant_file.write_text(tenants_text("art-v2"))  # fixed
    assert await rules.reload()
    assert rules.current().policy_for("acme", None).id == "art-v2"
    assert sample(metrics, "guardstream_rules_reload_ok") == 1


async def test_a_reload_that_would_drop_a_policy_in_use_is_refused(files: RulesFiles) -> None:
    assert files.policy_dir is not None
    rules, metrics = source(files)

    (files.policy_dir / "art-v1.toml").unlink()  # the tenant file still names it

    assert not await rules.reload()
    assert rules.current().policy_for("acme", None).id == "art-v1"
    assert sample(metrics, "guardstream_rules_reload_failures_total") == 1


async def test_a_policy_directory_that_disappears_keeps_the_rules_in_force(
    files: RulesFiles,
) -> None:
    assert files.policy_dir is not None
    rules, metrics = source(files)
    shutil.rmtree(files.policy_dir)

    assert not await rules.reload()
    assert rules.current().policy_for("acme", None).id == "art-v1"
    assert sample(metrics, "guardstream_rules_reload_ok") == 0


async def test_a_reload_that_would_drop_the_default_policy_is_refused(tmp_path: Path) -> None:
    (tmp_path / "house.toml").write_text(policy_text("house"))
    rules, _ = source(RulesFiles(tmp_path, None, "house"))

    (tmp_path / "house.toml").rename(tmp_path / "house.toml.off")

    assert not await rules.reload()
    assert rules.current().policy_for(None, None).id == "house"


async def test_files_going_back_to_the_rules_in_force_clear_the_failure(
    files: RulesFiles,
) -> None:
    assert files.tenant_file is not None
    rules, metrics = source(files)
    files.tenant_file.write_text("[tenants.acme\n")
    assert not await rules.reload()

    files.tenant_file.write_text(tenants_text("art-v1"))  # the rules in force, as they were
    assert not await rules.reload()

    assert sample(metrics, "guardstream_rules_reload_ok") == 1


# --- Triggers ----------------------------------------------------------------------------------


async def test_polling_reloads_changed_content(files: RulesFiles) -> None:
    assert files.tenant_file is not None
    rules, _ = source(files, interval_s=0.02)
    rules.start_watching()
    try:
        files.tenant_file.write_text(tenants_text("art-v2"))
        await eventually(lambda: rules.current().policy_for("acme", None).id == "art-v2")
    finally:
        await rules.stop_watching()


async def test_sighup_reloads_and_without_polling_nothing_else_does(files: RulesFiles) -> None:
    assert files.tenant_file is not None
    rules, _ = source(files, interval_s=0)
    first = rules.current()
    rules.start_watching()
    try:
        files.tenant_file.write_text(tenants_text("art-v2"))
        await asyncio.sleep(0.1)
        assert rules.current() is first  # interval 0: no polling

        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: rules.current() is not first)
        assert rules.current().policy_for("acme", None).id == "art-v2"

        second = rules.current()
        os.kill(os.getpid(), signal.SIGHUP)  # unchanged: SIGHUP reloads all the same
        await eventually(lambda: rules.current() is not second)
    finally:
        await rules.stop_watching()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # handed back


# --- Start-up ----------------------------------------------------------------------------------


def test_bad_files_refuse_to_start_naming_file_and_key(files: RulesFiles) -> None:
    assert files.tenant_file is not None
    files.tenant_file.write_text('[tenants.acme]\ndefault_policy = "art-v9"\n')

    with pytest.raises(InvalidRules, match=r"tenants\.acme\.default_policy: tenant 'acme' names"):
        source(files)
    with pytest.raises(InvalidRules, match=r"missing\.toml: cannot read"):
        source(RulesFiles(None, files.tenant_file.parent / "missing.toml", DEFAULT))


def test_the_metrics_say_when_the_rules_in_force_were_loaded(files: RulesFiles) -> None:
    _, metrics = source(files)

    assert sample(metrics, "guardstream_rules_reload_ok") == 1
    loaded = sample(metrics, "guardstream_rules_loaded_timestamp_seconds")
    assert loaded is not None
    assert abs(loaded - time.time()) < 60


def test_run_refuses_to_start_with_a_bad_tenant_file(tmp_path: Path) -> None:
    bad = tmp_path / "tenants.toml"
    bad.write_text('[tenants.acme]\nalowed_policies = ["llavaguard-v1.2"]\n')

    result = subprocess.run(
        [sys.executable, "-m", "service", "run"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "GUARDSTREAM_TENANT_FILE": str(bad),
            "GUARDSTREAM_HEALTH_PORT": "0",
            "GUARDSTREAM_LOG_FORMAT": "text",
        },
        timeout=60,
        check=False,
    )

    assert result.returncode == 1, result.stderr
    assert f"refusing to start: {bad}: tenants.acme.alowed_policies: unknown key" in result.stderr
