"""How components report their state to /readyz, gRPC health and `cdc health`."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Status(enum.Enum):
    OK = "ok"
    DEGRADED = "degraded"  # working, but something deserves attention; does not fail readiness
    ERROR = "error"  # not working; fails readiness


@dataclass(frozen=True, slots=True)
class ComponentHealth:
    name: str
    status: Status
    detail: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The status and the detail; an OK component carries no `error` (a component that
        recovered must not keep reporting the failure it recovered from)."""
        detail = self.detail
        if self.status is Status.OK and "error" in detail:
            detail = {k: v for k, v in detail.items() if k != "error"}
        return {"status": self.status.value, **detail}


def overall(components: list[ComponentHealth]) -> Status:
    if any(c.status is Status.ERROR for c in components):
        return Status.ERROR
    if any(c.status is Status.DEGRADED for c in components):
        return Status.DEGRADED
    return Status.OK
