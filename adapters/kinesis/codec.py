"""How changes become record data and back. The adapters do not know the wire format (the
services do: services/wire.py); the registry hands them a codec."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from domain.events import SourceEvent


class RecordCodec(Protocol):
    def encode(self, lane: str, events: Sequence[SourceEvent]) -> bytes: ...

    def decode(self, data: bytes) -> list[SourceEvent]:
        """Raises ValueError (or a subclass) for data that is not a batch of changes."""
        ...
