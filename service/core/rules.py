"""The rules a record is judged under: policies, tenants and the default policy, one snapshot.

A reload (`service.adapters.rules_source`) builds a new `Rules` and swaps it in whole. The
pipeline takes the snapshot in force when it starts judging a record and keeps it to the end, so
an event in flight finishes under the version it began with, and no record ever sees the policies
of one version with the tenants of another.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.core.policies import Policy, PolicyRegistry
from service.core.tenants import NO_TENANT_LABEL, UNKNOWN_TENANT_LABEL, Tenants


@dataclass(frozen=True)
class Rules:
    policies: PolicyRegistry
    default_policy: str
    """For events that name no policy (and no tenant that has its own default)."""
    tenants: Tenants | None = None
    """None without a tenant file: tenants are then only echoed in verdicts."""
    loaded_at: float = 0.0
    """When the files were read (Unix time)."""
    digest: str = ""
    """A hash of the files' content, to tell whether they changed since."""
    only_policy: str | None = None
    """Judge every event under this policy, whatever it names: a replay or a shadow run
    measuring a candidate policy on the events as they came."""

    def __post_init__(self) -> None:
        if self.default_policy not in self.policies.ids():
            known = ", ".join(self.policies.ids()) or "none"
            raise ValueError(
                f"the default policy {self.default_policy!r} is not among the policies loaded: "
                f"{known}"
            )
        if self.tenants is not None and self.tenants.default_policy != self.default_policy:
            raise ValueError("the tenants were read for another default policy")
        if self.only_policy is not None:
            self.policies.get(self.only_policy)  # UnknownPolicy names the policies there are

    def policy_for(self, tenant: str | None, policy_id: str | None) -> Policy:
        """The policy for an event naming `tenant` and `policy_id` (see `Tenants.resolve`);
        UnknownPolicy, PolicyNotAllowed or UnknownTenant when there is none."""
        if self.only_policy is not None:
            return self.policies.get(self.only_policy)
        if self.tenants is None:
            return self.policies.get(policy_id or self.default_policy)
        return self.policies.get(self.tenants.resolve(tenant, policy_id))

    def verdict_tenant(self, tenant: str | None) -> str | None:
        """The tenant a verdict names: as the event named it without a tenant file; with one,
        only a tenant it lists (an unknown tenant is judged as if none were named)."""
        return tenant if self.tenants is None else self.tenants.known(tenant)

    def tenant_label(self, tenant: str | None) -> str:
        """The metric label for an event's tenant: a name from the tenant file, "unknown" for
        any other name (every name, without a file), "none" when the event named none."""
        if self.tenants is None:
            return NO_TENANT_LABEL if tenant is None else UNKNOWN_TENANT_LABEL
        return self.tenants.label(tenant)
