"""Where the time goes: py-spy attached to `cdc ingest` and `cdc sink` during a backlog drain,
summarised as the functions with the most samples (self, and inclusive)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def attach(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy record on a running process until it exits; None if py-spy is missing."""
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    return subprocess.Popen(
        [
            exe,
            "record",
            "-p",
            str(pid),
            "--format",
            "raw",
            "-r",
            "200",
            "-o",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def summarise(raw: Path, top: int = 12) -> list[str]:
    """Collapsed stacks ("a;b;c N") -> the `top` functions by self and inclusive share."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_counts[frames[-1]] += n
        for name in set(frames):
            incl_counts[name] += n
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples; self time:"]
    lines += [f"  {c / total:6.1%}  {name}" for name, c in self_counts.most_common(top)]
    lines.append("inclusive (function and what it calls):")
    lines += [f"  {c / total:6.1%}  {name}" for name, c in incl_counts.most_common(top + 8)]
    return lines
