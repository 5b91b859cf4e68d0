"""`cdc dlq list` and `cdc dlq replay`: the dead letters of a pipeline's sinks, wherever they
are kept (the transport's store, or a sink's own table), listed, and delivered again to their
sink once the cause is fixed (docs/operations.md "Dead letters and cdc dlq")."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from domain.events import Position, SourceEvent
from domain.ports import DeadLetterStore, Guarantee, SinkBatch, StoredDeadLetter

EXIT_CONFIG = 2
# A sink that skips changes at or below its stored position (exactly-once effect) gets a
# replayed change under this lane, at a position past every earlier replay.
REPLAY_LANE = "dlq-replay"


def register(
    sub: Any, with_configs: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    dlq = sub.add_parser("dlq", help="list and replay dead letters")
    actions = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = with_configs(actions.add_parser("list", help="list the dead letters"))
    listing.add_argument("--sink-id", default=None, help="only this sink's")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--limit", type=int, default=None)
    listing.set_defaults(func=cmd_dlq_list)
    replay = with_configs(
        actions.add_parser("replay", help="deliver dead letters to their sink again")
    )
    replay.add_argument("--sink-id", default=None, help="only this sink's")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", action="append", dest="ids", metavar="ID", help="repeatable")
    which.add_argument("--all", action="store_true", help="every dead letter (of --sink-id)")
    replay.set_defaults(func=cmd_dlq_replay)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from adapters.config import load_pipeline, load_platform

    platform = load_platform(args.platform_config)
    return load_pipeline(args.pipeline, platform=platform), platform


def _check_sink(pipeline: Any, sink_id: str | None) -> str | None:
    if sink_id is None or any(s.sink_id == sink_id for s in pipeline.sinks):
        return None
    known = ", ".join(s.sink_id for s in pipeline.sinks) or "none"
    return f"--sink-id {sink_id}: no such sink in pipeline '{pipeline.pipeline_id}' ({known})"


def letter_json(letter: StoredDeadLetter) -> dict[str, Any]:
    from adapters.webhook.payload import event_id, event_json

    event = letter.event
    doc = event_json(event_id(letter.pipeline_id, letter.lane, event), event, lenient=True)
    return {
        "id": letter.id,
        "sink_id": letter.sink_id,
        "table": event.table.qualified_name,
        "key": doc["key"],
        "op": event.operation.value if letter.replayable else None,
        "position": str(event.position),
        "lane": letter.lane,
        "event_id": doc["id"],
        "error_class": letter.error_class,
        "error": letter.error,
        "attempts": letter.attempts,
        "created_at": None if letter.created_at is None else letter.created_at.isoformat(),
        "location": letter.location,
        "replayable": letter.replayable,
        "before": doc["before"],
        "after": doc["after"],
    }


async def _list(
    pipeline: Any, platform: Any, sink_id: str | None, limit: int | None
) -> list[StoredDeadLetter]:
    from services import registry

    out: list[StoredDeadLetter] = []
    for _, store in registry.dead_letter_stores(pipeline, platform, sink_id):
        try:
            out.extend(await store.list(sink_id, limit))
        finally:
            await store.close()
    return out


def cmd_dlq_list(args: argparse.Namespace) -> int:
    pipeline, platform = _load(args)
    problem = _check_sink(pipeline, args.sink_id)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        letters = asyncio.run(_list(pipeline, platform, args.sink_id, args.limit))
    except Exception as exc:
        print(f"error: cannot read the dead letters: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for letter in letters:
            print(json.dumps(letter_json(letter), default=str))
        return 0
    if not letters:
        print(f"no dead letters for pipeline '{pipeline.pipeline_id}'")
        return 0
    print(f"{'ID':>8}  {'SINK':<12} {'TABLE':<24} {'OP':<2} {'KEY':<24} ERROR")
    for letter in letters:
        doc = letter_json(letter)
        key = json.dumps(doc["key"], default=str)
        error = letter.error.replace("\n", " ")[:80]
        print(
            f"{letter.id:>8}  {letter.sink_id:<12} {doc['table']:<24} {doc['op'] or '?':<2}"
            f" {key:<24} {error}"
        )
    print(f"{len(letters)} dead letter(s)")
    return 0


def _replay_sink_config(sink: Any) -> Any:
    """A webhook sink sends a replayed change at once (no linger)."""
    if sink.sink_type == "webhook" and sink.webhook is not None:
        return sink.model_copy(update={"webhook": sink.webhook.model_copy(update={"linger_ms": 0})})
    return sink


async def _replay_one(
    writer: Any, pipeline_id: str, letter: StoredDeadLetter, replay_position: Position
) -> bool:
    """Deliver one dead letter; True when the sink took it (not dead-lettered again)."""
    event = letter.event
    lane = letter.lane
    if writer.guarantee is Guarantee.EXACTLY_ONCE_EFFECT:
        lane = REPLAY_LANE
        event = SourceEvent(
            event.operation,
            event.table,
            replay_position,
            event.before,
            event.after,
            event.commit_time_us,
            event.transaction_id,
            event.source_database,
        )
    batch = SinkBatch(pipeline_id, lane, 0, [event], lanes=[lane])
    result = await writer.write(batch)
    await writer.flush()
    return bool(result.dead_lettered == 0)


async def _replay(
    pipeline: Any, platform: Any, sink_id: str | None, ids: Sequence[str] | None
) -> tuple[int, int, list[str]]:
    from services import registry

    replayed = failed = 0
    notes: list[str] = []
    stores = registry.dead_letter_stores(pipeline, platform, sink_id)
    # Past every position an earlier replay used (microseconds since the epoch).
    major = time.time_ns() // 1000
    for _, store in stores:
        try:
            letters = list(await store.fetch(ids) if ids else await store.list(sink_id))
            undecoded = [x for x in letters if not x.replayable]
            if undecoded:
                notes.append(
                    f"{len(undecoded)} dead letter(s) hold no decodable change (e.g."
                    f" {undecoded[0].id}): they cannot be replayed and stay"
                )
                if ids:  # asked for by id: not delivered
                    failed += len(undecoded)
            letters = [x for x in letters if x.replayable]
            known = {s.sink_id for s in pipeline.sinks}
            for gone in sorted({x.sink_id for x in letters} - known):
                notes.append(f"sink '{gone}' is not in the pipeline: its dead letters stay")
            letters = [x for x in letters if x.sink_id in known]
            for sid in dict.fromkeys(x.sink_id for x in letters):
                r, f = await _replay_sink(pipeline, platform, store, sid, letters, major)
                major += 1
                replayed, failed = replayed + r, failed + f
        finally:
            await store.close()
    return replayed, failed, notes


async def _replay_sink(
    pipeline: Any,
    platform: Any,
    store: DeadLetterStore,
    sink_id: str,
    letters: list[StoredDeadLetter],
    major: int,
) -> tuple[int, int]:
    from services import registry

    sink = _replay_sink_config(pipeline.sink(sink_id))
    adapter = registry.SINKS[sink.sink_type]
    assert adapter.writer is not None
    writer = adapter.writer(pipeline, sink, platform)
    own_store = adapter.dead_letter_store is not None
    await writer.start()
    replayed = failed = 0
    try:
        for minor, letter in enumerate(x for x in letters if x.sink_id == sink_id):
            try:
                ok = await _replay_one(writer, pipeline.pipeline_id, letter, Position(major, minor))
            except Exception as exc:
                print(
                    f"replay {letter.id}: not delivered ({type(exc).__name__}: {exc});"
                    " it stays a dead letter",
                    file=sys.stderr,
                )
                failed += 1
                continue
            if ok:
                await store.remove([letter.id])
                replayed += 1
            else:
                # Dead-lettered again: the transport's store updated this letter, unless it
                # only appends (Kafka: `updates_in_place` false); a sink's own table got a
                # new one. Where a new one was written, the old one goes.
                if own_store or not getattr(store, "updates_in_place", True):
                    await store.remove([letter.id])
                failed += 1
    finally:
        await writer.stop()
    return replayed, failed


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    pipeline, platform = _load(args)
    problem = _check_sink(pipeline, args.sink_id)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    ids = None if args.all else list(args.ids)
    try:
        replayed, failed, notes = asyncio.run(_replay(pipeline, platform, args.sink_id, ids))
    except Exception as exc:
        print(f"error: replay stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"replayed {replayed} dead letter(s); {failed} not delivered (still dead letters)")
    return 0 if failed == 0 else 1
