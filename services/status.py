"""`cdc status PIPELINE`: a live view of a running pipeline, from its stages' HTTP endpoints.

Where the endpoints are: the ingest serves `/readyz` and `/metrics` on `health_port` at its
`listen_host` (platform.yaml; `--ingest-url` overrides). Its `/readyz` body lists where each
sink serves its own (`sink_http_endpoints`: `cdc run` starts every sink with `--http-port`
and tells the ingest with `--sink-http-endpoint`; elsewhere give the ingest
`--sink-http-endpoint` or `CDC_SINK_HTTP_ENDPOINTS`). So one address, known from the config
files, finds everything, and nothing is left behind on disk when the pipeline stops.

Rates come from two scrapes `--interval` seconds apart; latency percentiles are
interpolated from the histogram buckets (as PromQL's histogram_quantile does) over that
interval, or over the process lifetime when nothing was observed in it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

QUANTILES = (0.5, 0.9, 0.99)
_TIMEOUT = 3.0

Labels = tuple[tuple[str, str], ...]


class Unreachable(Exception):
    pass


@dataclass
class Scrape:
    """One stage's /readyz and /metrics at one moment."""

    url: str
    at: float
    ready_code: int | None = None
    ready: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)
    error: str | None = None

    def values(self, name: str, **match: str) -> dict[Labels, float]:
        return {
            labels: value
            for labels, value in self.samples.get(name, {}).items()
            if all(dict(labels).get(k) == v for k, v in match.items())
        }

    def total(self, name: str, **match: str) -> float:
        return sum(self.values(name, **match).values())

    def by(self, name: str, label: str, **match: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in self.values(name, **match).items():
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + value
        return out


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:  # 503 from /readyz still has the JSON body
        return int(exc.code), exc.read()


def scrape(url: str) -> Scrape:
    """Raises Unreachable when nothing answers at `url`."""
    result = Scrape(url=url, at=time.monotonic())
    try:
        result.ready_code, body = _get(f"{url}/readyz")
        metrics_code, text = _get(f"{url}/metrics")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise Unreachable(f"no answer from {url}: {getattr(exc, 'reason', exc)}") from exc
    try:
        result.ready = dict(json.loads(body))
    except ValueError:
        result.ready = {}
    if metrics_code == 200:
        result.samples = parse_metrics(text.decode())
    return result


def parse_metrics(text: str) -> dict[str, dict[Labels, float]]:
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = float(sample.value)
    return samples


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """histogram_quantile over cumulative (upper bound, count) pairs; None without data."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower  # above the largest finite bucket: its bound, as PromQL does
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _buckets(s: Scrape, name: str, **match: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for labels, value in s.values(f"{name}_bucket", **match).items():
        bound = float(dict(labels)["le"])
        out[bound] = out.get(bound, 0.0) + value
    return out


def latency(prev: Scrape | None, cur: Scrape, name: str, **match: str) -> dict[str, Any]:
    now = _buckets(cur, name, **match)
    window = "interval"
    buckets = dict(now)
    if prev is not None:
        before = _buckets(prev, name, **match)
        buckets = {b: v - before.get(b, 0.0) for b, v in now.items()}
    if not buckets or max(buckets.values(), default=0.0) <= 0:
        buckets, window = now, "lifetime"
    count = max(buckets.values(), default=0.0)
    out: dict[str, Any] = {"window": window, "count": int(count)}
    for q in QUANTILES:
        value = quantile(q, buckets.items())
        out[f"p{round(q * 100)}"] = None if value is None else round(value, 4)
    return out


def _rate(prev: Scrape | None, cur: Scrape, prev_v: float, cur_v: float) -> float | None:
    if prev is None or cur.at <= prev.at:
        return None
    return round(max(0.0, cur_v - prev_v) / (cur.at - prev.at), 1)


def _readiness(s: Scrape) -> dict[str, Any]:
    if s.error is not None:
        return {"status": "unreachable", "ready": False, "error": s.error}
    return {"status": s.ready.get("status", "unknown"), "ready": s.ready_code == 200}


def build_view(
    pipeline_id: str,
    prev: Mapping[str, Scrape] | None,
    cur: Mapping[str, Scrape],
) -> dict[str, Any]:
    """The status as data: `cur` / `prev` map "ingest" and "sink:<id>" to scrapes."""
    p = prev or {}
    ingest, ingest_prev = cur["ingest"], p.get("ingest")

    def prev_by(s: Scrape | None, name: str, label: str, **match: str) -> dict[str, float]:
        return {} if s is None else s.by(name, label, **match)

    read_now = ingest.by("cdc_ingest_events_read_total", "table")
    read_before = prev_by(ingest_prev, "cdc_ingest_events_read_total", "table")
    tables = [
        {
            "table": table,
            "events_read": int(total),
            "read_per_second": _rate(ingest_prev, ingest, read_before.get(table, 0.0), total),
        }
        for table, total in sorted(read_now.items())
    ]
    slot_lag = ingest.values("cdc_source_slot_lag_bytes")
    view: dict[str, Any] = {
        "pipeline": pipeline_id,
        "ingest": {
            "url": ingest.url,
            **_readiness(ingest),
            "components": {
                name: c.get("status")
                for name, c in dict(ingest.ready.get("components") or {}).items()
            },
            "slot_lag_bytes": int(sum(slot_lag.values())) if slot_lag else None,
            "events_read": int(ingest.total("cdc_ingest_events_read_total")),
            "read_per_second": _rate(
                ingest_prev,
                ingest,
                0.0 if ingest_prev is None else ingest_prev.total("cdc_ingest_events_read_total"),
                ingest.total("cdc_ingest_events_read_total"),
            ),
        },
        "tables": tables,
        "sinks": [],
    }
    sink_ids = sorted(
        set(ingest.by("cdc_ingest_batches_sent_total", "sink"))
        | {key.split(":", 1)[1] for key in cur if key.startswith("sink:")}
    )
    for sink_id in sink_ids:
        s, s_prev = cur.get(f"sink:{sink_id}"), p.get(f"sink:{sink_id}")
        unacked = ingest.values("cdc_ingest_unacked_batches", sink=sink_id)
        entry: dict[str, Any] = {
            "sink": sink_id,
            "unacked_batches": int(sum(unacked.values())) if unacked else 0,
            "acked_from_ingest": int(ingest.total("cdc_ingest_events_acked_total", sink=sink_id)),
        }
        if s is None:
            entry.update(url=None, status="unknown", ready=False)
            entry["error"] = "the ingest does not list this sink's HTTP endpoint"
        else:
            entry.update(url=s.url, **_readiness(s))
        if s is not None and s.error is None:
            events_now = s.by("cdc_sink_events_total", "table")
            events_before = prev_by(s_prev, "cdc_sink_events_total", "table")
            entry.update(
                events=int(sum(events_now.values())),
                events_per_second=_rate(
                    s_prev, s, sum(events_before.values()), sum(events_now.values())
                ),
                dead_letters=int(s.total("cdc_sink_dead_letters_total")),
                retries=int(s.total("cdc_sink_write_retries_total")),
                rejected_batches=int(s.total("cdc_sink_batches_total", result="rejected")),
                in_flight_batches=int(s.total("cdc_sink_in_flight_batches")),
                latency_seconds=latency(s_prev, s, "cdc_sink_end_to_end_latency_seconds"),
                tables=[
                    {
                        "table": table,
                        "events": int(total),
                        "per_second": _rate(s_prev, s, events_before.get(table, 0.0), total),
                    }
                    for table, total in sorted(events_now.items())
                ],
            )
        view["sinks"].append(entry)
    return view


def collect(ingest_url: str, sink_urls: Mapping[str, str] | None = None) -> dict[str, Scrape]:
    """Scrape the ingest, then every sink it lists (`sink_urls` overrides or adds sinks'
    base URLs). Raises Unreachable for the ingest."""
    out = {"ingest": scrape(ingest_url)}
    endpoints = dict(out["ingest"].ready.get("sink_http_endpoints") or {})
    urls: dict[str, str] = {}
    for sink_id, target in endpoints.items():
        host, _, port = str(target).rpartition(":")
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        urls[str(sink_id)] = f"http://{host}:{port}"
    urls.update(sink_urls or {})
    for sink_id, url in sorted(urls.items()):
        try:
            out[f"sink:{sink_id}"] = scrape(url)
        except Unreachable as exc:
            out[f"sink:{sink_id}"] = Scrape(url=url, at=time.monotonic(), error=str(exc))
    return out


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def _ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f} ms"


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value} B"


def render(view: Mapping[str, Any]) -> Any:
    """The view as rich renderables."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    colours = {"ok": "green", "degraded": "yellow", "error": "red", "unreachable": "red"}

    def status(value: str) -> Text:
        return Text(value, style=colours.get(value, "bold"))

    ingest = view["ingest"]
    head = Table(title=f"pipeline {view['pipeline']}", title_justify="left", expand=False)
    for column in ("stage", "health", "read/s", "slot lag", "detail"):
        head.add_column(column)
    components = ", ".join(f"{k}={v}" for k, v in ingest.get("components", {}).items())
    head.add_row(
        "ingest",
        status(ingest["status"]),
        _fmt(ingest["read_per_second"]),
        _bytes(ingest["slot_lag_bytes"]),
        components,
    )
    tables = Table(title="source tables (ingest)", title_justify="left")
    for column in ("table", "events read", "read/s"):
        tables.add_column(column)
    for t in view["tables"]:
        tables.add_row(t["table"], _fmt(t["events_read"]), _fmt(t["read_per_second"]))
    sinks = Table(title="sinks", title_justify="left")
    for column in (
        "sink",
        "health",
        "events/s",
        "p50",
        "p99",
        "dead letters",
        "retries",
        "unacked",
    ):
        sinks.add_column(column)
    per_table = Table(title="per table and sink", title_justify="left")
    for column in ("sink", "table", "events", "events/s"):
        per_table.add_column(column)
    for s in view["sinks"]:
        lat = s.get("latency_seconds") or {}
        sinks.add_row(
            s["sink"],
            status(s["status"]),
            _fmt(s.get("events_per_second")),
            _ms(lat.get("p50")),
            _ms(lat.get("p99")),
            _fmt(s.get("dead_letters")),
            _fmt(s.get("retries")),
            _fmt(s.get("unacked_batches")),
        )
        for t in s.get("tables", []):
            per_table.add_row(s["sink"], t["table"], _fmt(t["events"]), _fmt(t["per_second"]))
    return Group(head, tables, sinks, per_table)


def run_status(args: argparse.Namespace) -> int:
    from adapters.config import load_pipeline, load_platform

    platform = load_platform(args.platform_config)
    pipeline = load_pipeline(args.pipeline, platform=platform)
    pipeline_id = pipeline.pipeline_id
    if args.ingest_url:
        url = str(args.ingest_url).rstrip("/")
    elif not platform.health_enabled:
        print(
            f"error: pipeline '{pipeline_id}': health_enabled is false in platform.yaml, so"
            " the ingest serves no HTTP endpoint; give --ingest-url",
            file=sys.stderr,
        )
        return 1
    else:
        from services import security

        # Where the ingest listens (platform listen_host / CDC_LISTEN_HOST), seen from here.
        host = security.connect_host(security.listen_host(platform))
        host = f"[{host}]" if ":" in host else host
        url = f"http://{host}:{platform.health_port}"
    interval = max(0.1, float(args.interval))
    sink_urls: dict[str, str] = {}
    for item in args.sink_url or []:
        sink_id, sep, sink_url = str(item).partition("=")
        if not sep or not sink_id or not sink_url.startswith(("http://", "https://")):
            print(
                f"error: bad --sink-url {item!r}, expected SINK_ID=http://HOST:PORT",
                file=sys.stderr,
            )
            return 2
        sink_urls[sink_id] = sink_url.rstrip("/")
    try:
        prev = collect(url, sink_urls)
        if args.once:
            time.sleep(interval)
            view = build_view(pipeline_id, prev, collect(url, sink_urls))
            if args.json:
                print(json.dumps(view, indent=2))
            else:
                from rich.console import Console

                Console().print(render(view))
            return 0
        return _live(pipeline_id, url, sink_urls, prev, interval, as_json=args.json)
    except Unreachable as exc:
        print(
            f"error: pipeline '{pipeline_id}' is not reachable: {exc}"
            " (is it running? `cdc run` serves the ingest on health_port)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 0


def _live(
    pipeline_id: str,
    url: str,
    sink_urls: Mapping[str, str],
    prev: dict[str, Scrape],
    interval: float,
    as_json: bool,
) -> int:
    if as_json:  # one JSON document per line, for piping
        while True:
            time.sleep(interval)
            cur = collect(url, sink_urls)
            print(json.dumps(build_view(pipeline_id, prev, cur)), flush=True)
            prev = cur
    from rich.live import Live

    time.sleep(interval)
    cur = collect(url, sink_urls)
    with Live(render(build_view(pipeline_id, prev, cur)), auto_refresh=False) as live:
        while True:
            prev = cur
            time.sleep(interval)
            try:
                cur = collect(url, sink_urls)
            except Unreachable as exc:
                from rich.text import Text

                live.update(Text(f"pipeline '{pipeline_id}' not reachable: {exc}", "red"))
                live.refresh()
                continue
            live.update(render(build_view(pipeline_id, prev, cur)))
            live.refresh()
