"""The tables: printed by the harness and written into docs/benchmarks.md."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from bench.runners import Measurement

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"


@dataclass
class Results:
    mode: str
    workload: str
    steady: str
    machine: list[str]
    throughput: dict[str, Measurement] = field(default_factory=dict)
    latency: dict[str, Measurement] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    profile: list[str] = field(default_factory=list)
    started: str = ""
    took_s: float = 0.0


def _ratio(m: Measurement, ref: Measurement | None) -> str:
    return f"{m.rows_per_s / ref.rows_per_s:.2f}x" if ref is not None else "n/a"


def _procs(m: Measurement, start: float, end: float) -> tuple[str, str]:
    rss = "; ".join(f"{p.name} {p.peak_rss_mb:.0f}" for p in m.processes.values() if p.peak_rss_mb)
    cpu = "; ".join(
        f"{p.name} {p.cpu_between(start, end):.1f} ({p.cpu_total_s:.1f})"
        for p in m.processes.values()
    )
    return rss, cpu


def throughput_table(r: Results) -> list[str]:
    limit = r.throughput.get("limit")
    peer = r.throughput.get("peer")
    lines = [
        "| consumer | changes | seconds | rows/s | vs limit | vs peer | peak RSS MB "
        "| CPU s in window (whole life) |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for key, m in r.throughput.items():
        rss, cpu = _procs(m, m.first, m.last)
        peer_ratio = "1.00x" if key == "peer" else _ratio(m, peer)
        lines.append(
            f"| {m.name} | {m.changes:,} | {m.seconds:.2f} | {m.rows_per_s:,.0f} "
            f"| {_ratio(m, limit)} | {peer_ratio} | {rss} | {cpu} |"
        )
    for key, why in r.unavailable.items():
        lines.append(f"| {key} | not measured: {why} | | | | | | |")
    return lines


def latency_table(r: Results) -> list[str]:
    lines = [
        "| consumer | offered changes/s | p50 ms | p95 ms | p99 ms | max ms | rows | peak RSS MB "
        "| measured as |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for m in r.latency.values():
        lat = m.latency_ms or {}
        rss, _ = _procs(m, m.first, m.last)
        lines.append(
            f"| {m.name} | {m.offered_rate:,.0f} | {lat.get('p50', 0):.1f} | "
            f"{lat.get('p95', 0):.1f} | {lat.get('p99', 0):.1f} | {lat.get('max', 0):.1f} | "
            f"{int(lat.get('count', 0)):,} | {rss} | {m.latency_how} |"
        )
    return lines


def targets(r: Results) -> list[str]:
    out: list[str] = []
    ours = r.throughput.get("ours_pg")
    limit, peer = r.throughput.get("limit"), r.throughput.get("peer")

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    if ours and limit:
        ratio = ours.rows_per_s / limit.rows_per_s
        out.append(
            f"- ours -> PostgreSQL sink >= 0.5x pg_recvlogical: {ratio:.2f}x, "
            f"{verdict(ratio >= 0.5)}"
        )
    if ours and peer:
        ratio = ours.rows_per_s / peer.rows_per_s
        out.append(
            f"- ours -> PostgreSQL sink >= 1.0x Debezium embedded: {ratio:.2f}x, "
            f"{verdict(ratio >= 1.0)}"
        )
    steady = r.latency.get("ours_pg")
    if steady and steady.latency_ms:
        p99 = steady.latency_ms["p99"]
        out.append(
            f"- p99 < 250 ms at {steady.offered_rate:,.0f} changes/s: {p99:.0f} ms, "
            f"{verdict(p99 < 250)}"
        )
    peaks = [
        sum(p.peak_rss_mb for n, p in m.processes.items() if n in ("ingest", "sink"))
        for m in (ours, steady)
        if m is not None
    ]
    if peaks:
        peak = max(peaks)
        out.append(f"- ingest + sink peak RSS < 300 MB: {peak:.0f} MB, {verdict(peak < 300)}")
    return out


def render(r: Results) -> str:
    lines = [
        f"Run of {r.started} (`{r.mode}`, {r.took_s:.0f} s in all).",
        "",
        "Machine:",
        *(f"- {line}" for line in r.machine),
        "",
        f"Throughput workload (each consumer on its own fresh database and slot): {r.workload}",
        "",
        *throughput_table(r),
        "",
        f"Latency workload: {r.steady}",
        "",
        *latency_table(r),
        "",
        "Targets:",
        *targets(r),
    ]
    if r.profile:
        lines += ["", "Profile (py-spy, 200 Hz, share of samples):", "", "```", *r.profile, "```"]
    if r.failures:
        lines += ["", "Failed measurements:", *(f"- {k}: {v}" for k, v in r.failures.items())]
    return "\n".join(lines)


def write_docs(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Results\n\n" + block + "\n"
    path.write_text(text)
