"""services.net.find_free_port: a picked port is kept from other processes' picks for a while
(parallel test workers, several `cdc run`s on one machine), and expired notes are pruned."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services import net

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def reservations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "ports"
    monkeypatch.setenv(net.RESERVATIONS_ENV, str(directory))
    return directory


def test_a_port_picked_by_another_process_is_not_handed_out_here(reservations: Path) -> None:
    picked = subprocess.run(
        [sys.executable, "-c", "from services.net import find_free_port; print(find_free_port())"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=True,
    )
    other = int(picked.stdout)
    assert (reservations / str(other)).is_file()
    with net._reservations() as reserve:
        assert reserve(other) is False
        assert reserve(other + 1) is True  # and now noted for this process
    assert (reservations / str(other + 1)).is_file()


def test_picks_are_distinct_and_noted(reservations: Path) -> None:
    ports = {net.find_free_port() for _ in range(20)}
    assert len(ports) == 20
    assert {int(p.name) for p in reservations.iterdir() if p.name.isdigit()} >= ports


def test_expired_reservations_are_reused_and_pruned(reservations: Path) -> None:
    reservations.mkdir()
    old = time.time() - net.RESERVATION_SECONDS - 1
    for port in (40001, 40002):
        (reservations / str(port)).write_text("1\n")
        os.utime(reservations / str(port), (old, old))
    with net._reservations() as reserve:
        assert not (reservations / "40002").exists()  # pruned
        assert reserve(40002) is True


def test_an_unusable_directory_falls_back_to_this_process_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv(net.RESERVATIONS_ENV, str(not_a_dir))
    first, second = net.find_free_port(), net.find_free_port()
    assert first != second
