"""The rules in force (policy files, tenant file), reloaded while the service runs.

`RulesSource.current()` is what the pipeline asks at the start of each record: one immutable
`Rules` snapshot, replaced whole by a reload, so a record judged while files change finishes
under the version it started with. A reload happens when

- the content changed: every `reload_interval_s` the bytes of every ``*.toml`` in the policy
  directory and of the tenant file are hashed (content, not modification times: a Kubernetes
  ConfigMap update swaps a `..data` symlink and leaves the files' own times alone); or
- SIGHUP arrives (always reloads, changed or not).

A reload that fails (a file that does not parse or check, a tenant naming a policy that is gone,
the default policy gone) keeps the rules in force, logs why at ERROR and sets
`guardstream_rules_reload_ok` to 0; the same broken content is not retried until it changes again
or SIGHUP asks. At start-up the same failure refuses to start (`InvalidRules`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from service.config import Settings
from service.core.policies import PolicyRegistry
from service.core.rules import Rules
from service.core.tenants import Tenants, UnknownTenantRule
from service.ops.metrics import Metrics

log = logging.getLogger(__name__)


class InvalidRules(ValueError):
    """The policy files or the tenant file cannot be loaded: the message names file and key."""


@dataclass(frozen=True)
class RulesFiles:
    """Where the rules come from, and the settings that go with them."""

    policy_dir: Path | None
    tenant_file: Path | None
    default_policy: str
    unknown_tenant: UnknownTenantRule = "default"

    @classmethod
    def from_settings(cls, settings: Settings) -> RulesFiles:
        return cls(
            policy_dir=settings.policy_dir,
            tenant_file=settings.tenant_file,
            default_policy=settings.default_policy,
            unknown_tenant=settings.unknown_tenant,
        )

    def digest(self) -> str:
        """A hash of the names and bytes of every file the rules are read from."""
        content = hashlib.sha256()
        path = self.policy_dir
        try:
            for path in self._paths():
                raw = path.read_bytes()
                content.update(f"{path}\0{len(raw)}\0".encode())
                content.update(raw)
        except OSError as exc:
            raise InvalidRules(f"{path}: cannot read: {exc.strerror}") from exc
        return content.hexdigest()

    def load(self) -> Rules:
        """The rules the files hold now; InvalidRules naming the file and the problem if none."""
        digest = self.digest()  # first: a change while loading is seen by the next check
        try:
            policies = PolicyRegistry.load(self.policy_dir)
            tenants = (
                None
                if self.tenant_file is None
                else Tenants.load(
                    self.tenant_file,
                    policy_ids=policies.ids(),
                    default_policy=self.default_policy,
                    unknown_tenant=self.unknown_tenant,
                )
            )
            return Rules(policies, self.default_policy, tenants, time.time(), digest)
        except ValueError as exc:
            raise InvalidRules(str(exc)) from exc
        except OSError as exc:  # a file gone between listing and reading it
            raise InvalidRules(f"{exc.filename}: cannot read: {exc.strerror}") from exc

    def _paths(self) -> list[Path]:
        paths = []
        if self.policy_dir is not None and self.policy_dir.is_dir():
            # Names sorted, as the registry reads them; a missing directory fails in load().
            toml_files = (p for p in self.policy_dir.iterdir() if p.name.endswith(".toml"))
            paths += sorted((p for p in toml_files if p.is_file()), key=lambda p: p.name)
        if self.tenant_file is not None:
            paths.append(self.tenant_file)
        return paths


class RulesSource:
    """The current `Rules`, and the watch that reloads them (`start_watching`)."""

    def __init__(self, files: RulesFiles, metrics: Metrics, *, interval_s: float) -> None:
        """Loads the rules now: InvalidRules (the service refuses to start) if they are bad."""
        self._files = files
        self._metrics = metrics
        self._interval_s = interval_s
        self._rules = files.load()
        self._failure: str | None = None
        """What the last failed reload failed on (a digest, or the error when unreadable)."""
        self._wanted = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._on_sighup = False
        self._loaded(self._rules)

    def current(self) -> Rules:
        """The rules in force: take them once per record and keep them for its whole judging."""
        return self._rules

    def request_reload(self) -> None:
        """Reload soon, whether or not the files changed (what SIGHUP does)."""
        self._wanted.set()

    async def reload(self, *, force: bool = False) -> bool:
        """Load the files again if their content changed (or `force`); True if new rules are
        now in force. A failure keeps the rules in force and is logged and counted."""
        try:
            digest = await asyncio.to_thread(self._files.digest)
        except InvalidRules as exc:
            return self._failed(exc, f"unreadable: {exc}", force)
        if not force and digest == self._rules.digest:
            if self._failure is not None:  # the files went back to the rules in force
                self._failure = None
                self._metrics.rules_reload_ok.set(1)
            return False
        if not force and digest == self._failure:
            return False
        try:
            rules = await asyncio.to_thread(self._files.load)
        except InvalidRules as exc:
            return self._failed(exc, digest, force)
        self._rules = rules
        self._failure = None
        self._loaded(rules)
        return True

    async def watch(self) -> None:
        """Check for changes every interval (never if 0) and reload on request, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s or None):
                    await self._wanted.wait()
            forced = self._wanted.is_set()
            self._wanted.clear()
            try:
                await self.reload(force=forced)
            except Exception:  # a bug of ours must not end the watch; the rules stay in force
                log.exception("reloading the rules failed")

    def start_watching(self) -> None:
        """Run `watch` in the background, and reload on SIGHUP (where signals can be handled:
        the main thread of a Unix process), until `stop_watching`."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            self._on_sighup = True
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            log.warning("SIGHUP will not reload the rules: %s", exc)
        self._watch = asyncio.create_task(self.watch(), name="rules reload")

    async def stop_watching(self) -> None:
        if self._on_sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._on_sighup = False
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    def _failed(self, exc: InvalidRules, failure: str, force: bool) -> bool:
        if failure == self._failure and not force:
            return False  # the failure of last time, logged and counted then
        self._failure = failure
        self._metrics.rules_reload_failures.inc()
        self._metrics.rules_reload_ok.set(0)
        log.error(
            "reloading the rules failed; the rules loaded at %s stay in force: %s",
            _when(self._rules.loaded_at),
            exc,
        )
        return False

    def _loaded(self, rules: Rules) -> None:
        self._metrics.rules_reload_ok.set(1)
        self._metrics.rules_loaded.set(rules.loaded_at)
        tenants = "no tenant file" if rules.tenants is None else f"{len(rules.tenants.names())}"
        log.info(
            "rules loaded: %d policies (%s), tenants: %s, digest %s",
            len(rules.policies.ids()),
            ", ".join(rules.policies.ids()),
            tenants,
            rules.digest[:12],
        )


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
