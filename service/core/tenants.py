"""Tenants: which policies each customer of the service may use, from one TOML file.

```toml
[tenants.acme-art]
default_policy = "art-platform"                          # optional: the service's default
allowed_policies = ["art-platform", "llavaguard-v1.2"]   # optional: [default_policy]

[tenants.newsroom]
default_policy = "llavaguard-v1.2"
```

A tenant's name is 1-64 of A-Z a-z 0-9 . _ - (as events write it), except `none` and `unknown`,
which are metric label values. Every policy id must be one the policy registry knows, and the
default policy must be among the allowed ones. The file is checked whole when it is loaded: a
problem raises ValueError naming the file and the key (`tenants.acme-art.alowed_policies`), never
an event later.

How an event's tenant and policy id become the policy it is judged by (`Tenants.resolve`):

| tenant named     | policy_id named       | policy                                          |
|------------------|-----------------------|-------------------------------------------------|
| none             | any or none           | policy_id, else the service default             |
| in the file      | none                  | the tenant's default_policy                     |
| in the file      | in allowed_policies   | policy_id                                       |
| in the file      | any other             | PolicyNotAllowed (dead letter policy_not_allowed) |
| not in the file  | any or none           | unknown_tenant "default": as if none named;     |
|                  |                       | "dead-letter": UnknownTenant (unknown_tenant)   |
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from service.core.errors import PolicyNotAllowed, UnknownTenant

UnknownTenantRule = Literal["default", "dead-letter"]
"""What an event naming a tenant the file does not list gets: the service default, or a dead
letter."""

NO_TENANT_LABEL = "none"
UNKNOWN_TENANT_LABEL = "unknown"

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TENANT_KEYS = ("allowed_policies", "default_policy")


@dataclass(frozen=True)
class Tenant:
    name: str
    default_policy: str
    allowed_policies: tuple[str, ...]


class Tenants:
    """The tenants of one tenant file, with the rule for tenants it does not list."""

    def __init__(
        self,
        tenants: Iterable[Tenant],
        *,
        default_policy: str,
        unknown_tenant: UnknownTenantRule = "default",
    ) -> None:
        self._tenants = {tenant.name: tenant for tenant in tenants}
        self.default_policy = default_policy
        """The service's default policy: for events that name no tenant, or an unknown one."""
        self.unknown_tenant: UnknownTenantRule = unknown_tenant

    @classmethod
    def parse(
        cls,
        raw: bytes,
        source: str,
        *,
        policy_ids: Collection[str],
        default_policy: str,
        unknown_tenant: UnknownTenantRule = "default",
    ) -> Tenants:
        """The tenants of a file's bytes; ValueError naming `source` and the key if invalid.

        `policy_ids` are the policies the registry knows: a tenant may name no other.
        """
        try:
            data = tomllib.loads(raw.decode("utf-8"))
            tenants = _tenants_from(data, frozenset(policy_ids), default_policy)
        except ValueError as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors too
            raise ValueError(f"{source}: {exc}") from exc
        return cls(tenants, default_policy=default_policy, unknown_tenant=unknown_tenant)

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        policy_ids: Collection[str],
        default_policy: str,
        unknown_tenant: UnknownTenantRule = "default",
    ) -> Tenants:
        """The tenants of the file at `path` (see `parse`)."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the tenant file: {exc.strerror}") from exc
        return cls.parse(
            raw,
            str(path),
            policy_ids=policy_ids,
            default_policy=default_policy,
            unknown_tenant=unknown_tenant,
        )

    def names(self) -> tuple[str, ...]:
        """Every tenant's name, sorted."""
        return tuple(sorted(self._tenants))

    def get(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def resolve(self, tenant: str | None, policy_id: str | None) -> str:
        """The id of the policy an event is judged by (the table in the module docstring).

        Raises PolicyNotAllowed, or UnknownTenant where unknown tenants are dead-lettered. An id
        returned for an event without a (known) tenant may still be unknown to the registry.
        """
        if tenant is None:
            return policy_id or self.default_policy
        entry = self._tenants.get(tenant)
        if entry is None:
            if self.unknown_tenant == "dead-letter":
                known = ", ".join(self.names()) or "none"
                raise UnknownTenant(f"unknown tenant {tenant!r}; known tenants: {known}")
            return policy_id or self.default_policy
        if policy_id is None:
            return entry.default_policy
        if policy_id not in entry.allowed_policies:
            allowed = ", ".join(entry.allowed_policies)
            raise PolicyNotAllowed(
                f"tenant {tenant!r} may not use policy {policy_id!r}; its policies: {allowed}"
            )
        return policy_id

    def known(self, tenant: str | None) -> str | None:
        """`tenant` if the file lists it, else None."""
        return tenant if tenant is not None and tenant in self._tenants else None

    def label(self, tenant: str | None) -> str:
        """`tenant` as a metric label, bounded by the file: its name when the file lists it,
        "unknown" for any other name, "none" when the event named no tenant."""
        if tenant is None:
            return NO_TENANT_LABEL
        return tenant if tenant in self._tenants else UNKNOWN_TENANT_LABEL


# --- Reading -------------------------------------------------------------------------------------


def _tenants_from(
    data: dict[str, Any], policy_ids: frozenset[str], default_policy: str
) -> list[Tenant]:
    unknown = sorted(set(data) - {"tenants"})
    if unknown:
        raise ValueError(f"{_path(unknown[0])}: unknown key (the file holds [tenants.<name>])")
    tables = data.get("tenants", {})
    if not isinstance(tables, dict):
        raise ValueError("tenants: must be a table of tenants ([tenants.<name>])")
    return [
        _tenant(name, table, policy_ids, default_policy) for name, table in sorted(tables.items())
    ]


def _tenant(name: str, table: object, policy_ids: frozenset[str], default_policy: str) -> Tenant:
    where = _path("tenants", name)
    if not _NAME.fullmatch(name):
        raise ValueError(f"{where}: a tenant name must be 1-64 of A-Z a-z 0-9 . _ -")
    if name in (NO_TENANT_LABEL, UNKNOWN_TENANT_LABEL):
        raise ValueError(f"{where}: {name!r} is reserved (a metric label value)")
    if not isinstance(table, dict):
        raise ValueError(f"{where}: must be a table (default_policy, allowed_policies)")
    unknown = sorted(set(table) - set(_TENANT_KEYS))
    if unknown:
        known = ", ".join(_TENANT_KEYS)
        raise ValueError(f"{_path('tenants', name, unknown[0])}: unknown key (known: {known})")
    default = _policy_id(table, name, "default_policy", policy_ids)
    if "allowed_policies" not in table:
        return Tenant(name, default or default_policy, (default or default_policy,))
    allowed = _allowed(table["allowed_policies"], name, policy_ids)
    if default is None:
        if default_policy not in allowed:
            raise ValueError(
                f"{_path('tenants', name, 'allowed_policies')}: lacks the service default "
                f"policy {default_policy!r}, which the tenant's events get when they name no "
                "policy: set default_policy"
            )
        default = default_policy
    elif default not in allowed:
        raise ValueError(
            f"{_path('tenants', name, 'default_policy')}: {default!r} is not in allowed_policies"
        )
    return Tenant(name, default, allowed)


def _policy_id(
    table: dict[str, Any], tenant: str, key: str, policy_ids: frozenset[str]
) -> str | None:
    if key not in table:
        return None
    return _known_policy(table[key], tenant, _path("tenants", tenant, key), policy_ids)


def _allowed(value: object, tenant: str, policy_ids: frozenset[str]) -> tuple[str, ...]:
    where = _path("tenants", tenant, "allowed_policies")
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: must be a non-empty array of policy ids")
    ids = [
        _known_policy(item, tenant, f"{where}[{index}]", policy_ids)
        for index, item in enumerate(value)
    ]
    return tuple(dict.fromkeys(ids))


def _known_policy(value: object, tenant: str, where: str, policy_ids: frozenset[str]) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: must be a string (a policy id), not {type(value).__name__}")
    if value not in policy_ids:
        known = ", ".join(sorted(policy_ids)) or "none"
        raise ValueError(
            f"{where}: tenant {tenant!r} names unknown policy {value!r}; known policies: {known}"
        )
    return value


def _path(*keys: str) -> str:
    """A TOML key path as written in the file: `tenants.acme-art`, `tenants."a.b"`."""
    return ".".join(key if _BARE_KEY.fullmatch(key) else json.dumps(key) for key in keys)
