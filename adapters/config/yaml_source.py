"""YAML text -> plain data with the line of every node, and ${VAR} substitution.

The document is composed (``yaml.compose`` with the safe loader) rather than loaded, so every
value keeps its position. Scalars are handed to the models as the strings written in the file
(pydantic coerces ``"5432"`` to an int), except a plain ``null`` / ``~`` / empty value, which is
None. So ``password: 0123`` stays ``"0123"`` and ``password: yes`` stays ``"yes"``, and a value
from an environment variable is treated exactly like one typed in the file.

Substitution runs on the parsed scalars, so a variable's value is never parsed as YAML.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import Loc

_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STANDARD_TAG_PREFIX = "tag:yaml.org,2002:"

# "$${" is an escaped "${"; "${...}" a reference; a lone "${" is unterminated.
_TOKEN_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_REFERENCE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.DOTALL)


@dataclass
class SourceProblem:
    loc: Loc
    line: int | None
    message: str


@dataclass
class ParsedDocument:
    """The data, the line of each path (``()`` is the document), and problems found while
    building it (duplicate keys, unset variables...). ``poisoned`` holds the paths whose
    value is unknown because of such a problem; validation errors there are not reported."""

    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    problems: list[SourceProblem] = field(default_factory=list)
    poisoned: set[Loc] = field(default_factory=set)

    def line_of(self, loc: Loc) -> int | None:
        """Line of ``loc`` or of its nearest ancestor written in the file."""
        probe = tuple(part for part in loc if part != "[key]")
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            probe = probe[:-1]
        return None


class YamlSyntaxError(Exception):
    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def parse_yaml(text: str) -> Node | None:
    """Compose one YAML document; None when the stream holds no document."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        parts = [p for p in (exc.context, exc.problem) if p]
        message = "YAML syntax error: " + ", ".join(parts)
        if mark is not None:
            message += f" (column {mark.column + 1})"
        raise YamlSyntaxError(line, message) from exc
    except yaml.YAMLError as exc:  # pragma: no cover - unmarked errors are rare
        raise YamlSyntaxError(None, f"YAML syntax error: {exc}") from exc


class _Builder:
    def __init__(self, env: Mapping[str, str], doc: ParsedDocument) -> None:
        self.env = env
        self.doc = doc
        self.active: set[int] = set()  # nodes being built (alias cycles)

    def problem(self, loc: Loc, node: Node | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else self.doc.line_of(loc)
        self.doc.problems.append(SourceProblem(loc, line, message))
        self.doc.poisoned.add(loc)

    def build(self, node: Node, loc: Loc) -> Any:
        if id(node) in self.active:
            self.problem(loc, node, "recursive YAML alias")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self.mapping(node, loc)
            if isinstance(node, SequenceNode):
                return self.sequence(node, loc)
            assert isinstance(node, ScalarNode)
            return self.scalar(node, loc)
        finally:
            self.active.discard(id(node))

    def check_tag(self, node: Node, loc: Loc) -> None:
        if not node.tag.startswith(_STANDARD_TAG_PREFIX):
            self.problem(loc, node, f"unsupported YAML tag {node.tag!r}")

    def mapping(self, node: MappingNode, loc: Loc) -> dict[str, Any]:
        self.check_tag(node, loc)
        # Merge keys first, so the lines of the mapping's own keys win.
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                for source in self.merge_sources(value_node, loc):
                    built = self.build(source, loc)
                    for key, value in (built or {}).items():
                        merged.setdefault(key, value)
        own: dict[str, Any] = {}
        own_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, ScalarNode):
                self.problem(loc, key_node, "mapping keys must be plain strings")
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in own:
                self.problem(
                    (*loc, key), key_node, f"duplicate key {key!r} (first at line {own_lines[key]})"
                )
                continue
            own_lines[key] = line
            self.doc.lines[(*loc, key)] = line
            own[key] = self.build(value_node, (*loc, key))
        return {**merged, **own}

    def merge_sources(self, node: Node, loc: Loc) -> list[MappingNode]:
        if isinstance(node, MappingNode):
            return [node]
        if isinstance(node, SequenceNode) and all(isinstance(n, MappingNode) for n in node.value):
            return [n for n in node.value if isinstance(n, MappingNode)]
        self.problem(loc, node, "'<<' (merge key) needs a mapping or a list of mappings")
        return []

    def sequence(self, node: SequenceNode, loc: Loc) -> list[Any]:
        self.check_tag(node, loc)
        out: list[Any] = []
        for index, item in enumerate(node.value):
            self.doc.lines[(*loc, index)] = item.start_mark.line + 1
            out.append(self.build(item, (*loc, index)))
        return out

    def scalar(self, node: ScalarNode, loc: Loc) -> str | None:
        self.check_tag(node, loc)
        if node.tag == _NULL_TAG and node.style is None:
            return None
        return self.substitute(node.value, node, loc)

    def substitute(self, text: str, node: Node, loc: Loc) -> str:
        if "${" not in text:
            return text
        out: list[str] = []
        pos = 0
        for match in _TOKEN_RE.finditer(text):
            out.append(text[pos : match.start()])
            pos = match.end()
            token = match.group(0)
            if token == "$${":
                out.append("${")
                continue
            if token == "${":
                self.problem(loc, node, "unterminated '${' (write '$${' for a literal '${')")
                continue
            inner = match.group(1)
            ref = _REFERENCE_RE.match(inner)
            if ref is None:
                self.problem(
                    loc,
                    node,
                    f"invalid variable reference '${{{inner}}}': "
                    "use ${NAME} or ${NAME:-default} (write '$${' for a literal '${')",
                )
                continue
            name, default = ref.group(1), ref.group(2)
            if default is not None and "${" in default:
                self.problem(
                    loc, node, f"nested reference in the default of ${{{name}}} is not supported"
                )
                continue
            value = self.env.get(name)
            if default is not None:
                out.append(value if value else default)
            elif value is None:
                self.problem(
                    loc,
                    node,
                    f"environment variable {name} is not set and ${{{name}}} has no default "
                    f"(set it, or write ${{{name}:-default}})",
                )
            else:
                out.append(value)
        out.append(text[pos:])
        return "".join(out)


def build_document(root: Node, env: Mapping[str, str]) -> ParsedDocument:
    """Plain data from a composed YAML node, variables substituted, lines recorded."""
    doc = ParsedDocument(data=None)
    doc.data = _Builder(env, doc).build(root, ())
    return doc
