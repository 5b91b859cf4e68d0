"""Peak RSS and CPU seconds of the processes under test, sampled with psutil."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class ProcessStats:
    name: str
    peak_rss_mb: float = 0.0
    cpu_total_s: float = 0.0  # whole life of the process (start-up included)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (wall time, cpu s)

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds spent in [start, end] (wall-clock epoch seconds), interpolated."""
        return max(0.0, self._cpu_at(end) - self._cpu_at(start))

    def _cpu_at(self, when: float) -> float:
        points = self.samples
        if not points:
            return 0.0
        if when <= points[0][0]:
            return points[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(points):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * ((when - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return points[-1][1]


class Sampler:
    """Polls the given pids every `interval` seconds in a thread until stopped."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._procs: dict[str, psutil.Process] = {}
        self._groups: dict[str, tuple[psutil.Process, dict[int, float]]] = {}
        self.stats: dict[str, ProcessStats] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self._procs[name] = psutil.Process(pid)
            self.stats[name] = ProcessStats(name)
        self._sample_one(name)

    def watch_tree(self, name: str, pid: int) -> None:
        """CPU of a process and all its children (e.g. the postmaster and its backends);
        children that exit keep the CPU they had at their last sample. No RSS (shared
        memory would be counted once per backend)."""
        with self._lock:
            self._groups[name] = (psutil.Process(pid), {})
            self.stats[name] = ProcessStats(name)
        self._sample_tree(name)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def sample_now(self) -> None:
        with self._lock:
            names = list(self._procs)
        for name in names:
            self._sample_one(name)
        with self._lock:
            groups = list(self._groups)
        for name in groups:
            self._sample_tree(name)

    def _sample_tree(self, name: str) -> None:
        root, seen = self._groups[name]
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            seen[proc.pid] = times.user + times.system
        stats = self.stats[name]
        stats.cpu_total_s = sum(seen.values())
        stats.samples.append((time.time(), stats.cpu_total_s))

    def stop(self) -> dict[str, ProcessStats]:
        self.sample_now()
        self._stop.set()
        self._thread.join(5)
        return self.stats

    def _sample_one(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is None:
            return
        try:
            with proc.oneshot():
                rss = proc.memory_info().rss / 2**20
                times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return
        cpu = times.user + times.system
        stats = self.stats[name]
        stats.peak_rss_mb = max(stats.peak_rss_mb, rss)
        stats.cpu_total_s = cpu
        stats.samples.append((time.time(), cpu))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample_now()
