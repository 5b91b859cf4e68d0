"""load_pipeline / load_platform: read, substitute, validate, and report every problem at once."""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .base import _strip, model_type
from .errors import ConfigError, ConfigProblem, FieldProblems, Loc, format_path
from .pipeline import PipelineConfig, compatibility_problems
from .platform import PlatformConfig
from .yaml_source import ParsedDocument, YamlSyntaxError, build_document, parse_yaml

M = TypeVar("M", bound=BaseModel)

# Values of these fields are never echoed in error messages.
_SECRET_RE = re.compile(r"(password|secret|token|dsn|headers|api_?key|access_key)", re.I)

_TYPE_MESSAGES = {
    "int_parsing": "Input should be a valid integer",
    "int_type": "Input should be a valid integer",
    "int_from_float": "Input should be a valid integer",
    "float_parsing": "Input should be a valid number",
    "float_type": "Input should be a valid number",
    "bool_parsing": "Input should be a valid boolean (true or false)",
    "bool_type": "Input should be a valid boolean (true or false)",
    "finite_number": "Input should be a finite number",
}


def load_pipeline(
    path: str | Path,
    env: Mapping[str, str] | None = None,
    *,
    platform: PlatformConfig | None = None,
) -> PipelineConfig:
    """Load and validate a pipeline.yaml. With ``platform``, also check that the pipeline can
    run on that platform (e.g. a non-PostgreSQL source needs the kafka transport)."""
    text = _read(path)
    return loads_pipeline(text, file=str(path), env=env, platform=platform)


def load_platform(path: str | Path | None, env: Mapping[str, str] | None = None) -> PlatformConfig:
    """Load and validate a platform.yaml; ``None`` gives every built-in default."""
    if path is None:
        return PlatformConfig()
    text = _read(path)
    return loads_platform(text, file=str(path), env=env)


def loads_pipeline(
    text: str,
    *,
    file: str = "pipeline.yaml",
    env: Mapping[str, str] | None = None,
    platform: PlatformConfig | None = None,
) -> PipelineConfig:
    """:func:`load_pipeline` from a string; ``file`` is the name used in error messages."""
    doc = _document(text, file, env, "pipeline_id, source and sinks")
    config = _validate(PipelineConfig, doc, file)
    if platform is not None:
        problems = [
            ConfigProblem(format_path(loc), doc.line_of(loc), msg)
            for loc, msg in compatibility_problems(config, platform)
        ]
        if problems:
            raise ConfigError(file, problems)
    return config


def loads_platform(
    text: str, *, file: str = "platform.yaml", env: Mapping[str, str] | None = None
) -> PlatformConfig:
    """:func:`load_platform` from a string; ``file`` is the name used in error messages."""
    doc = _document(
        text, file, env, "transport_mode and the sections it needs; {} for all defaults"
    )
    return _validate(PlatformConfig, doc, file)


def config_error(
    path: str | Path | None,
    problems: Sequence[tuple[Loc, str]],
    env: Mapping[str, str] | None = None,
    *,
    default_file: str = "platform.yaml",
) -> ConfigError:
    """A ConfigError for problems found after loading (e.g. by the adapter registry:
    services/registry.py), each with the line of its path in the file. ``path`` None: the
    built-in defaults (no lines)."""
    if path is None:
        return ConfigError(
            f"{default_file} (built-in defaults)",
            [ConfigProblem(format_path(loc), None, msg) for loc, msg in problems],
        )
    try:
        doc: ParsedDocument | None = _document(_read(path), str(path), env, "")
    except ConfigError:
        doc = None
    return ConfigError(
        str(path),
        _sorted(
            [
                ConfigProblem(format_path(loc), doc.line_of(loc) if doc else None, msg)
                for loc, msg in problems
            ]
        ),
    )


def _read(path: str | Path) -> str:
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(file, [ConfigProblem("", None, "file not found")]) from None
    except IsADirectoryError:
        raise ConfigError(file, [ConfigProblem("", None, "is a directory, not a file")]) from None
    except OSError as exc:
        raise ConfigError(
            file, [ConfigProblem("", None, f"cannot read: {exc.strerror or exc}")]
        ) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(file, [ConfigProblem("", line, "not valid UTF-8 text")]) from None


def _document(text: str, file: str, env: Mapping[str, str] | None, expected: str) -> ParsedDocument:
    try:
        root = parse_yaml(text)
    except YamlSyntaxError as exc:
        raise ConfigError(file, [ConfigProblem("", exc.line, exc.message)]) from None
    if root is None or (root.tag == "tag:yaml.org,2002:null" and not getattr(root, "value", "")):
        raise ConfigError(
            file, [ConfigProblem("", None, f"file is empty; expected a mapping with {expected}")]
        )
    doc = build_document(root, os.environ if env is None else env)
    if not isinstance(doc.data, dict):
        kind = _kind(doc.data)
        raise ConfigError(
            file,
            [
                ConfigProblem(
                    "", root.start_mark.line + 1, f"top level must be a mapping of keys, got {kind}"
                )
            ],
        )
    return doc


def _validate(model: type[M], doc: ParsedDocument, file: str) -> M:
    problems = [ConfigProblem(format_path(p.loc), p.line, p.message) for p in doc.problems]
    try:
        config = model.model_validate(doc.data)
    except ValidationError as exc:
        for loc, message in _flatten(exc):
            if any(loc[: len(bad)] == bad for bad in doc.poisoned):
                continue  # the value is unknown; its problem is already reported
            problems.append(
                ConfigProblem(format_path(loc), doc.line_of(loc), _describe(model, loc, message))
            )
        raise ConfigError(file, _sorted(problems)) from None
    if problems:
        raise ConfigError(file, _sorted(problems))
    return config


def _sorted(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.line is not None, p.line or 0))


class _Raw:
    """A pydantic error, kept for _describe."""

    def __init__(self, error: Any) -> None:
        self.error = error


def _flatten(exc: ValidationError) -> list[tuple[Loc, Any]]:
    out: list[tuple[Loc, Any]] = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, FieldProblems):
            out.extend(((*loc, *sub), msg) for sub, msg in cause.problems)
        else:
            out.append((loc, _Raw(error)))
    return out


def _describe(model: type[BaseModel], loc: Loc, item: Any) -> str:
    if not isinstance(item, _Raw):
        return str(item)
    error = item.error
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(model, loc)
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        cause = (error.get("ctx") or {}).get("error")
        return str(cause) if cause is not None else str(error["msg"])
    message = _TYPE_MESSAGES.get(kind, str(error["msg"]))
    if kind in ("too_short", "too_long"):  # the message already says what is wrong
        return message
    secret = any(isinstance(p, str) and _SECRET_RE.search(p) for p in loc)
    got = "<hidden>" if secret and isinstance(value, str) else _show(value)
    message = f"{message}, got {got}"
    if kind == "literal_error" and isinstance(value, str):
        allowed = re.findall(r"'([^']*)'", str((error.get("ctx") or {}).get("expected", "")))
        close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6)
        if not close:
            close = [a for a in allowed if a.lower() == value.lower()]
        if close:
            message += f" (did you mean {close[0]!r}?)"
    return message


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "an empty value"
    return _kind(value)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


def _unknown_key(root: type[BaseModel], loc: Loc) -> str:
    key = str(loc[-1])
    parent = _model_at(root, loc[:-1])
    message = f"unknown key {key!r}"
    if parent is None:
        return message
    fields = list(parent.model_fields)
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.75)
    if close:
        return f"{message} (did you mean {close[0]!r}?)"
    # A known key at the wrong level?
    for name, info in parent.model_fields.items():
        child = model_type(info.annotation)
        if child is not None and key in child.model_fields:
            return f"{message} (it belongs under '{name}:')"
    grandparent = _model_at(root, _strip_indices(loc[:-1])[:-1]) if loc[:-1] else None
    if grandparent is not None and key in grandparent.model_fields:
        return f"{message} (it belongs one level up)"
    return f"{message}; allowed keys: {', '.join(fields)}"


def _strip_indices(loc: Loc) -> Loc:
    """Drop trailing list indices: the model of ``sinks[0]`` sits at ``sinks`` minus the index."""
    out = list(loc)
    while out and isinstance(out[-1], int):
        out.pop()
    return tuple(out)


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model class at ``loc`` (walking fields, list items and dict values), if any."""
    current: Any = root
    for part in loc:
        current = _strip(current)
        model = model_type(current)
        if model is not None and isinstance(part, str):
            info = model.model_fields.get(part)
            if info is None:
                return None
            current = info.annotation
            continue
        current = _container_item(current, part)
        if current is None:
            return None
    return model_type(current)


def _container_item(tp: Any, part: str | int) -> Any:
    tp = _strip(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin is not None and origin not in (list, dict) and len(args) == 1:
        # X | None
        return _container_item(args[0], part)
    if origin is list and isinstance(part, int):
        return args[0]
    if origin is dict and isinstance(part, str):
        return args[1]
    return None
