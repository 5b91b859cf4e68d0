"""The hexagonal import rule, enforced on the source with ast (nothing is imported).

- `domain` imports only the standard library, itself and pyarrow as a value library (arrays
  and compute; not its file systems, files, IPC or Flight), and nothing that does I/O.
- `adapters` import `domain` and third-party packages, never `services` or `cdc_proto`.
- only `services` (where the entry points live) and `tests` import `services`.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {"build", "dist", "node_modules", "__pycache__"}

# Standard-library modules that do I/O (files, processes, network, event loops, logging
# handlers) or reach the operating system: the pure core has no business with them.
DOMAIN_FORBIDDEN_STDLIB = frozenset(
    {
        "os",
        "io",
        "socket",
        "subprocess",
        "asyncio",
        "pathlib",
        "shutil",
        "tempfile",
        "glob",
        "select",
        "selectors",
        "ssl",
        "http",
        "urllib",
        "ftplib",
        "smtplib",
        "sqlite3",
        "multiprocessing",
        "signal",
        "mmap",
        "fcntl",
        "ctypes",
        "logging",
        "builtins",
        "importlib",
    }
)
# Third-party libraries the domain may use as value libraries, and their parts that do I/O.
DOMAIN_VALUE_LIBRARIES = frozenset({"pyarrow"})
DOMAIN_FORBIDDEN_VALUE_MODULES = frozenset(
    {
        "pyarrow.fs",
        "pyarrow.ipc",
        "pyarrow.csv",
        "pyarrow.json",
        "pyarrow.parquet",
        "pyarrow.feather",
        "pyarrow.orc",
        "pyarrow.dataset",
        "pyarrow.flight",
        "pyarrow.cuda",
        "pyarrow.substrait",
        "pyarrow.acero",
    }
)
DOMAIN_FORBIDDEN_CALLS = frozenset({"open", "print", "input", "exec", "eval", "__import__"})


@dataclass(frozen=True)
class Import:
    file: str  # relative to the scanned root, POSIX form
    line: int
    module: str

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.module}"


def python_files(root: Path) -> Iterator[Path]:
    """Every .py file of the project, pruning hidden folders (.venv, .git) and build output."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(folder, name)


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every module a file imports, anywhere in it (also inside functions and try blocks),
    with relative imports resolved and literal importlib.import_module/__import__ calls."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    file = path.relative_to(root).as_posix()
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(file, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                rel = path.relative_to(root).with_suffix("").parts
                package = list(rel[:-1])  # a module's package; __init__'s is its folder too
                base = package[: len(package) - (node.level - 1)]
            else:
                base = []
            if node.module:
                found.append(Import(file, node.lineno, ".".join([*base, node.module])))
            else:  # `from .. import name`: each name is a module of that package
                found += [
                    Import(file, node.lineno, ".".join([*base, alias.name])) for alias in node.names
                ]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if (
                name in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                found.append(Import(file, node.lineno, first.value))
    return found


def calls_to_names(path: Path, root: Path, names: frozenset[str]) -> list[str]:
    tree = ast.parse(path.read_bytes(), filename=str(path))
    return [
        f"{path.relative_to(root).as_posix()}:{node.lineno} calls {node.func.id}()"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names
    ]


def files_under(root: Path, package: str) -> list[Path]:
    return [p for p in python_files(root) if p.relative_to(root).parts[0] == package]


# --- the rule checks, parameterised by root so they can be tested on synthetic trees ---------


def domain_violations(root: Path) -> list[str]:
    problems: list[str] = []
    for path in files_under(root, "domain"):
        for imp in imports_of(path, root):
            if imp.top == "domain":
                continue
            if imp.top in DOMAIN_VALUE_LIBRARIES:
                parts = imp.module.split(".")
                prefixes = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
                if prefixes & DOMAIN_FORBIDDEN_VALUE_MODULES:
                    problems.append(f"{imp} (I/O in the pure core)")
                continue
            if imp.top not in sys.stdlib_module_names:
                problems.append(f"{imp} (not standard library)")
            elif imp.top in DOMAIN_FORBIDDEN_STDLIB:
                problems.append(f"{imp} (I/O in the pure core)")
    return problems


def adapters_violations(root: Path) -> list[str]:
    return [
        str(imp)
        for path in files_under(root, "adapters")
        for imp in imports_of(path, root)
        if imp.top in ("services", "cdc_proto", "tests")
    ]


def sides_violations(root: Path) -> list[str]:
    """An adapter folder with a source and a sink side (`adapters/<system>/source/`,
    `adapters/<system>/sink/`): neither side imports the other; what both need lives in
    the system's folder above them (or in `domain`)."""
    problems = []
    for path in files_under(root, "adapters"):
        parts = path.relative_to(root).parts
        if len(parts) < 4 or parts[2] not in SIDES:
            continue
        other = SIDES[parts[2]]
        for imp in imports_of(path, root):
            if imp.module.split(".")[:3] == ["adapters", parts[1], other]:
                problems.append(str(imp))
    return problems


SIDES = {"source": "sink", "sink": "source"}


def services_importers(root: Path) -> list[str]:
    return [
        str(imp)
        for path in python_files(root)
        # bench/ is outside the product like tests/: it drives the stages it measures.
        if path.relative_to(root).parts[0] not in ("services", "tests", "bench")
        for imp in imports_of(path, root)
        if imp.top == "services"
    ]


# --- the real tree -------------------------------------------------------------------------


def test_the_layers_exist_and_are_scanned() -> None:
    assert len(files_under(ROOT, "domain")) >= 5
    assert len(files_under(ROOT, "adapters")) >= 3
    assert len(files_under(ROOT, "services")) >= 1
    assert all(".venv" not in p.parts for p in python_files(ROOT))


def test_domain_imports_only_standard_library_and_itself() -> None:
    assert domain_violations(ROOT) == []


def test_domain_makes_no_io_calls() -> None:
    problems = [
        problem
        for path in files_under(ROOT, "domain")
        for problem in calls_to_names(path, ROOT, DOMAIN_FORBIDDEN_CALLS)
    ]
    assert problems == []


def test_adapters_never_import_services_or_generated_wire_code() -> None:
    assert adapters_violations(ROOT) == []


def test_source_and_sink_sides_of_an_adapter_do_not_import_each_other() -> None:
    assert any(p.parts[-2] == "source" for p in files_under(ROOT, "adapters"))
    assert any(p.parts[-2] == "sink" for p in files_under(ROOT, "adapters"))
    assert sides_violations(ROOT) == []


def test_checker_flags_one_side_importing_the_other(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "adapters/__init__.py": "",
            "adapters/pg/__init__.py": "",
            "adapters/pg/common.py": "",
            "adapters/pg/source/__init__.py": "",
            "adapters/pg/source/reader.py": "from adapters.pg.common import x\n",
            "adapters/pg/sink/__init__.py": "",
            "adapters/pg/sink/writer.py": "from ..source import reader\n",
            "adapters/pg/sink/other.py": "import adapters.pg.source.reader\n",
        },
    )
    problems = sides_violations(root)
    assert sorted(p.split(":")[0] for p in problems) == [
        "adapters/pg/sink/other.py",
        "adapters/pg/sink/writer.py",
    ]


def test_only_services_tests_and_bench_import_services() -> None:
    assert services_importers(ROOT) == []


def test_production_code_never_imports_tests() -> None:
    problems = [
        str(imp)
        for package in ("domain", "adapters", "services", "cdc_proto")
        for path in files_under(ROOT, package)
        for imp in imports_of(path, ROOT)
        if imp.top == "tests"
    ]
    assert problems == []


def test_console_entry_points_live_in_services() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})
    assert scripts, "no console scripts declared"
    for name, target in scripts.items():
        module = target.split(":")[0]
        assert module.split(".")[0] == "services", (name, target)
        assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file() or (
            ROOT / Path(*module.split(".")) / "__init__.py"
        ).is_file(), (name, target)


# --- the checks themselves catch violations -------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, source in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return tmp_path


def test_checker_flags_domain_violations(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "domain/__init__.py": "",
            "domain/ok.py": """
                from __future__ import annotations
                import json
                from collections.abc import Iterable
                from domain.events import X
                from . import events
                from .events import Y
            """,
            "domain/bad.py": """
                import os.path
                def f():
                    import yaml
                try:
                    import socket
                except ImportError:
                    pass
                from adapters.config import load
                from .. import services
                __import__("psycopg")
                import pyarrow.parquet
            """,
            "domain/values.py": """
                import pyarrow as pa
                import pyarrow.compute as pc
            """,
        },
    )
    problems = domain_violations(root)
    assert len(problems) == 7, problems
    assert all(p.startswith("domain/bad.py:") for p in problems)
    for needle in (
        "os.path",
        "yaml",
        "socket",
        "adapters.config",
        "services",
        "psycopg",
        "pyarrow.parquet",
    ):
        assert any(needle in p for p in problems), (needle, problems)
    assert not any("ok.py" in p for p in problems)


def test_checker_flags_io_calls(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {"domain/x.py": "def f(p):\n    return open(p).read()\nprint(1)\nlen([])\n"},
    )
    problems = calls_to_names(root / "domain" / "x.py", root, DOMAIN_FORBIDDEN_CALLS)
    assert sorted(problems) == ["domain/x.py:2 calls open()", "domain/x.py:3 calls print()"]


def test_checker_flags_adapter_and_services_violations(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "adapters/__init__.py": "",
            "adapters/kafka/consumer.py": """
                import confluent_kafka
                from domain.events import SourceEvent
                from cdc_proto.v1 import events_pb2
                import importlib
                mod = importlib.import_module("services.ingest")
            """,
            "adapters/kafka/__init__.py": "from ...services import wire\n",
            "services/cli/main.py": "from services.ingest import main\n",
            "tests/unit/test_x.py": "import services.cli.main\n",
            "tools/run.py": "from services.ingest.service import IngestService\n",
        },
    )
    adapter_problems = adapters_violations(root)
    assert len(adapter_problems) == 3, adapter_problems
    assert any("cdc_proto.v1" in p for p in adapter_problems)
    assert any("services.ingest" in p for p in adapter_problems)
    assert any("__init__" in p and "services" in p for p in adapter_problems)

    importers = services_importers(root)
    assert sorted(p.split(":")[0] for p in importers) == [
        "adapters/kafka/__init__.py",
        "adapters/kafka/consumer.py",
        "tools/run.py",
    ]


@pytest.mark.parametrize(
    ("rel", "level", "module", "expected"),
    [
        ("domain/rows.py", 1, "events", "domain.events"),
        ("domain/rows.py", 1, None, "domain.x"),
        ("domain/rows.py", 2, None, "x"),
        ("domain/__init__.py", 1, "events", "domain.events"),
        ("adapters/postgres/source/reader.py", 1, "pgoutput", "adapters.postgres.source.pgoutput"),
        ("adapters/postgres/source/reader.py", 3, "config", "adapters.config"),
        ("adapters/postgres/source/reader.py", 4, "services", "services"),
    ],
)
def test_relative_imports_resolve(
    tmp_path: Path, rel: str, level: int, module: str | None, expected: str
) -> None:
    names = "x"
    source = f"from {'.' * level}{module or ''} import {names}\n"
    root = _tree(tmp_path, {rel: source})
    (imp,) = imports_of(root / rel, root)
    assert imp.module == expected


# --- production stages never reach the local-platform launchers (services.stack) ------------

# `cdc run` and the stages it starts: none of them may import services.stack (the development
# PostgreSQL launcher of the tests, `make demo` and `make bench`), at import time or later.
PRODUCTION_ENTRY_MODULES = ("services.supervisor", "services.cli.main")
PRODUCTION_PACKAGES = ("services.ingest", "services.sink")
LOCAL_PLATFORM_PACKAGE = "services.stack"
# `cdc stack` (services/cli/stack.py) is local-platform tooling registered in the same `cdc`
# parser: it may import services.stack inside its command functions, never at module level
# (test_importing_the_production_stages_loads_no_local_platform_module builds the parser).
LOCAL_PLATFORM_CLI = frozenset({"services.cli.stack"})
FIRST_PARTY = ("domain", "adapters", "services", "cdc_proto")


def module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def first_party_imports(path: Path, root: Path) -> set[str]:
    """The project modules a file imports anywhere in it (module level or inside functions):
    `from pkg import name` counts as `pkg.name` when that is a module, else as `pkg`; the
    packages above each module count too (importing a module runs their __init__)."""
    found: set[str] = set()
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for imp in imports_of(path, root):
        if imp.top not in FIRST_PARTY:
            continue
        found.add(imp.module)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if candidate.split(".")[0] in FIRST_PARTY and module_file(root, candidate):
                    found.add(candidate)
    with_parents = set(found)
    for module in found:
        parts = module.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return {m for m in with_parents if module_file(root, m) is not None}


def import_closure(
    root: Path, start: list[str], stop_at: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Every project module reachable from `start`, each with the module that imports it (the
    imports of modules in `stop_at` are not followed)."""
    seen: dict[str, str] = {m: "" for m in start}
    todo = list(start)
    while todo:
        module = todo.pop()
        path = module_file(root, module)
        if path is None or module in stop_at:
            continue
        for dep in sorted(first_party_imports(path, root)):
            if dep not in seen:
                seen[dep] = module
                todo.append(dep)
    return seen


def production_modules(root: Path) -> list[str]:
    modules = list(PRODUCTION_ENTRY_MODULES)
    for package in PRODUCTION_PACKAGES:
        folder = root.joinpath(*package.split("."))
        modules += [
            f"{package}.{p.stem}" if p.stem != "__init__" else package
            for p in sorted(folder.glob("*.py"))
        ]
    return [m for m in modules if module_file(root, m) is not None]


def local_platform_reached(root: Path, start: list[str]) -> list[str]:
    """`a <- b <- c` chains from a production module to services.stack, if any."""
    closure = import_closure(root, start, LOCAL_PLATFORM_CLI)
    chains: list[str] = []
    for module in sorted(closure):
        if module == LOCAL_PLATFORM_PACKAGE or module.startswith(LOCAL_PLATFORM_PACKAGE + "."):
            chain = [module]
            while closure[chain[-1]]:
                chain.append(closure[chain[-1]])
            chains.append(" <- ".join(chain))
    return chains


def test_production_stages_never_import_the_local_platform_launchers() -> None:
    start = production_modules(ROOT)
    assert "services.supervisor" in start and "services.ingest.service" in start
    assert "services.sink.server" in start and "services.cli.main" in start
    assert local_platform_reached(ROOT, start) == []


def test_importing_the_production_stages_loads_no_local_platform_module() -> None:
    """The same at run time: import every production module in a fresh interpreter."""
    modules = production_modules(ROOT)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "importlib.import_module('services.cli.main').build_parser()\n"
        f"print(sorted(m for m in sys.modules if m.startswith({LOCAL_PLATFORM_PACKAGE!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_checker_follows_imports_inside_functions_to_the_local_platform(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "services/__init__.py": "",
            "services/net.py": "import socket\n",
            "services/stack/__init__.py": "from services.stack.postgres import Server\n",
            "services/stack/postgres.py": "from services.net import find_free_port\n",
            "services/cli/__init__.py": "",
            "services/cli/main.py": "def run():\n    from services import supervisor\n",
            "services/supervisor.py": "from services.stack import postgres\n",
            "services/clean.py": "from services import net\n",
        },
    )
    chains = local_platform_reached(root, ["services.cli.main"])
    assert chains == [
        "services.stack <- services.supervisor <- services.cli.main",
        "services.stack.postgres <- services.supervisor <- services.cli.main",
    ]
    assert local_platform_reached(root, ["services.clean"]) == []
