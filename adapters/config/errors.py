"""ConfigError: every problem found in one configuration file, with its path and line."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Loc = tuple[str | int, ...]


def format_path(loc: Loc) -> str:
    """``("sinks", 0, "postgres", "port")`` -> ``"sinks[0].postgres.port"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem: ``path`` like ``sinks[0].postgres.port`` ("" for the whole file), ``line``
    1-based in the YAML file (None when the problem has no place in the file, e.g. a missing
    top-level field), and a human-readable ``message``."""

    path: str
    line: int | None
    message: str

    def format(self, file: str) -> str:
        where = file if self.line is None else f"{file}:{self.line}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A configuration file that cannot be used. ``str(err)`` is one line per problem::

    pipeline.yaml:12: sinks[0].postgres.port: Input should be a valid integer, got 'abc'
    """

    def __init__(self, file: str, problems: Iterable[ConfigProblem]) -> None:
        self.file = str(file)
        self.problems: list[ConfigProblem] = list(problems)
        super().__init__(self.file, self.problems)

    def __str__(self) -> str:
        return "\n".join(problem.format(self.file) for problem in self.problems)

    def __repr__(self) -> str:
        return f"ConfigError(file={self.file!r}, problems={self.problems!r})"


class FieldProblems(ValueError):
    """Raised inside model validators to report problems at precise sub-paths.

    Each entry is ``(loc relative to the model, message)``. The loader appends the loc to the
    model's own location, so a cross-field check can point at the offending field (and so at
    its line) instead of at the enclosing section.
    """

    def __init__(self, problems: Iterable[tuple[Loc, str]]) -> None:
        self.problems: list[tuple[Loc, str]] = list(problems)
        super().__init__("; ".join(f"{format_path(loc)}: {msg}" for loc, msg in self.problems))


def raise_if(problems: list[tuple[Loc, str]]) -> None:
    if problems:
        raise FieldProblems(problems)
