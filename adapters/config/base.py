"""Shared model base and field types of the configuration models."""

from __future__ import annotations

import ipaddress
import re
import types
import typing
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# Ports 1..65535.
Port = Annotated[int, Field(ge=1, le=65535)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]

PG_NAME_MAX = 63  # NAMEDATALEN - 1
_SLOT_RE = re.compile(r"^[a-z0-9_]+$")
_IDENT_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_TOPIC_PART_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


def _check_slot_name(value: str) -> str:
    if not _SLOT_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid PostgreSQL replication slot name: use only lowercase "
            "letters, digits and '_'"
        )
    if len(value) > PG_NAME_MAX:
        raise ValueError(f"{value!r} is longer than {PG_NAME_MAX} characters")
    return value


def _check_identifier(value: str) -> str:
    if not _IDENT_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid PostgreSQL identifier here: start with a lowercase "
            "letter or '_', then lowercase letters, digits or '_'"
        )
    if len(value) > PG_NAME_MAX:
        raise ValueError(f"{value!r} is longer than {PG_NAME_MAX} characters")
    return value


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: start with a lowercase letter or digit, then use "
            "only lowercase letters, digits, '_' and '-'"
        )
    if len(value) > PG_NAME_MAX:
        raise ValueError(f"{value!r} is longer than {PG_NAME_MAX} characters")
    return value


def _check_topic_part(value: str) -> str:
    if not _TOPIC_PART_RE.match(value):
        raise ValueError(f"{value!r} may contain only letters, digits, '.', '_' and '-'")
    return value


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value


def _check_host_port_list(value: str) -> str:
    entries = [entry.strip() for entry in value.split(",")]
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(
                f"{entry!r} is not host:port (give a comma-separated list of host:port)"
            )
    return value


def check_listen_host(value: str) -> str:
    """An IPv4 address (``0.0.0.0``: every interface) or a host name to listen on."""
    try:
        ipaddress.IPv4Address(value)
        return value
    except ValueError:
        pass
    if ":" in value or not _HOSTNAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not an IPv4 address or host name to listen on "
            "(127.0.0.1: this machine only, 0.0.0.0: every interface)"
        )
    return value


SlotName = Annotated[str, AfterValidator(_check_slot_name)]
PgIdentifier = Annotated[str, AfterValidator(_check_identifier)]
ResourceName = Annotated[str, AfterValidator(_check_name)]
TopicPart = Annotated[str, AfterValidator(_check_topic_part)]
HttpUrl = Annotated[str, AfterValidator(_check_http_url)]
HostPortList = Annotated[str, AfterValidator(_check_host_port_list)]
ListenHost = Annotated[str, AfterValidator(check_listen_host)]


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def allows_none(annotation: Any) -> bool:
    tp = _strip(annotation)
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(arg is type(None) for arg in typing.get_args(tp))
    return False


def model_type(annotation: Any) -> type[BaseModel] | None:
    """The model class of a field typed ``M`` or ``M | None``, else None."""
    tp = _strip(annotation)
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) != 1:
            return None
        tp = _strip(args[0])
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    return None


class ConfigModel(BaseModel):
    """Base of every configuration model: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _normalise_empty_values(cls, data: Any) -> Any:
        """An empty section (``kafka:`` with nothing below) means "all defaults"; an empty
        string in an optional field (``${VAR:-}``) means "not set"."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is None:
                continue
            if value is None and model_type(field.annotation) is not None:
                out[name] = {}
            elif value == "" and allows_none(field.annotation):
                out[name] = None
        return out

    def explicitly_set(self, *names: str) -> list[str]:
        """The given field names that were given in the file (not left at their default)."""
        return [name for name in names if name in self.model_fields_set]
