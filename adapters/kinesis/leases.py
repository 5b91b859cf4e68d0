"""Shard leases and checkpoints in one DynamoDB table (`kinesis.checkpoint_table_name`).

One item per (pipeline, stream, shard): `lease_key` = `<pipeline>/<stream>/<shard>`, the
owner (an ingest replica's worker id), `expires_at` (epoch seconds), `checkpoint` (the
sequence number up to which every record is durable at every sink) and `finished` (the shard
was read to its end and all of it is durable: its children may be read). Every write is
conditional on the owner, so a replica that lost its lease cannot move a checkpoint, and two
replicas never hold one shard: taking a lease succeeds only when nobody holds it or its
holder let it expire. Replicas announce themselves with `<pipeline>/#worker/<id>` items
(same expiry) so each can take its fair share. `cdc dlq` keeps its "removed" markers here
too (`<pipeline>/#dlq-removed/...`, adapters/kinesis/dead_letters.py).

Expiry compares the clocks of the replicas (epoch seconds): keep them in sync (NTP) well
within `lease_seconds`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from adapters.kinesis.settings import error_code

KEY = "lease_key"
SHARD_END = "SHARD_END"


@dataclass(frozen=True, slots=True)
class Lease:
    key: str
    stream: str
    shard_id: str
    owner: str | None
    expires_at: float
    checkpoint: str | None
    finished: bool
    millis_behind: int | None = None

    def live(self, now: float) -> bool:
        return self.owner is not None and self.expires_at > now


def lease_key(pipeline_id: str, stream: str, shard_id: str) -> str:
    return f"{pipeline_id}/{stream}/{shard_id}"


def _lease(item: dict[str, Any]) -> Lease:
    def s(name: str) -> str | None:
        v = item.get(name)
        return v["S"] if v and "S" in v else None

    def n(name: str) -> float | None:
        v = item.get(name)
        return float(v["N"]) if v and "N" in v else None

    millis = n("millis_behind")
    return Lease(
        key=item[KEY]["S"],
        stream=s("stream") or "",
        shard_id=s("shard_id") or "",
        owner=s("owner"),
        expires_at=n("expires_at") or 0.0,
        checkpoint=s("checkpoint"),
        finished=bool(item.get("finished", {}).get("BOOL", False)),
        millis_behind=int(millis) if millis is not None else None,
    )


def _conditional_failed(exc: BaseException) -> bool:
    return error_code(exc) == "ConditionalCheckFailedException"


class LeaseTable:
    """Blocking DynamoDB calls (the source runs them in a thread)."""

    def __init__(self, dynamodb: Any, table: str, pipeline_id: str) -> None:
        self._db = dynamodb
        self.table = table
        self.pipeline_id = pipeline_id

    def _scan(self, prefix: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "ConsistentRead": True,
            "FilterExpression": "begins_with(#k, :p)",
            "ExpressionAttributeNames": {"#k": KEY},
            "ExpressionAttributeValues": {":p": {"S": prefix}},
        }
        while True:
            page = self._db.scan(**kwargs)
            items += page.get("Items", [])
            last = page.get("LastEvaluatedKey")
            if not last:
                return items
            kwargs["ExclusiveStartKey"] = last

    def leases(self) -> list[Lease]:
        return [
            _lease(item)
            for item in self._scan(f"{self.pipeline_id}/")
            # not the replicas' `#worker` items, nor `cdc dlq`'s `#dlq-removed` markers
            if "/#" not in item[KEY]["S"]
        ]

    def live_workers(self, now: float) -> set[str]:
        items = self._scan(f"{self.pipeline_id}/#worker/")
        return {
            item[KEY]["S"].rsplit("/", 1)[1]
            for item in items
            if float(item.get("expires_at", {}).get("N", "0")) > now
        }

    def heartbeat(self, worker: str, expires_at: float) -> None:
        self._db.put_item(
            TableName=self.table,
            Item={
                KEY: {"S": f"{self.pipeline_id}/#worker/{worker}"},
                "expires_at": {"N": repr(expires_at)},
            },
        )

    def forget_worker(self, worker: str) -> None:
        self._db.delete_item(
            TableName=self.table, Key={KEY: {"S": f"{self.pipeline_id}/#worker/{worker}"}}
        )

    def acquire(
        self, stream: str, shard_id: str, worker: str, lease_seconds: float
    ) -> Lease | None:
        """Take the shard's lease if nobody holds it, its holder let it expire, or it is ours
        already. Returns the lease (with its checkpoint), or None when someone else holds it."""
        now = time.time()
        try:
            response = self._db.update_item(
                TableName=self.table,
                Key={KEY: {"S": lease_key(self.pipeline_id, stream, shard_id)}},
                UpdateExpression=(
                    "SET #o = :me, #e = :exp, #st = :st, #sh = :sh, #p = :p ADD #c :one"
                ),
                ConditionExpression=(
                    "attribute_not_exists(#k) OR attribute_not_exists(#o) OR #o = :me OR #e < :now"
                ),
                ExpressionAttributeNames={
                    "#o": "owner",
                    "#k": KEY,
                    "#e": "expires_at",
                    "#st": "stream",
                    "#sh": "shard_id",
                    "#p": "pipeline",
                    "#c": "lease_counter",
                },
                ExpressionAttributeValues={
                    ":me": {"S": worker},
                    ":exp": {"N": repr(now + lease_seconds)},
                    ":now": {"N": repr(now)},
                    ":st": {"S": stream},
                    ":sh": {"S": shard_id},
                    ":p": {"S": self.pipeline_id},
                    ":one": {"N": "1"},
                },
                ReturnValues="ALL_NEW",
            )
        except Exception as exc:
            if _conditional_failed(exc):
                return None
            raise
        return _lease(response["Attributes"])

    def renew(
        self,
        stream: str,
        shard_id: str,
        worker: str,
        lease_seconds: float,
        checkpoint: str | None = None,
        finished: bool = False,
        millis_behind: int | None = None,
    ) -> float | None:
        """Extend our lease (and move the checkpoint, when given). Returns the new expiry, or
        None when the lease is no longer ours."""
        expires = time.time() + lease_seconds
        sets = ["#e = :exp"]
        names = {"#o": "owner", "#e": "expires_at"}
        values: dict[str, Any] = {":me": {"S": worker}, ":exp": {"N": repr(expires)}}
        if checkpoint is not None:
            sets.append("#cp = :cp")
            names["#cp"] = "checkpoint"
            values[":cp"] = {"S": checkpoint}
        if finished:
            sets.append("#f = :t")
            names["#f"] = "finished"
            values[":t"] = {"BOOL": True}
        if millis_behind is not None:
            sets.append("#mb = :mb")
            names["#mb"] = "millis_behind"
            values[":mb"] = {"N": str(millis_behind)}
        try:
            self._db.update_item(
                TableName=self.table,
                Key={KEY: {"S": lease_key(self.pipeline_id, stream, shard_id)}},
                UpdateExpression="SET " + ", ".join(sets),
                ConditionExpression="#o = :me",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except Exception as exc:
            if _conditional_failed(exc):
                return None
            raise
        return expires

    def release(self, stream: str, shard_id: str, worker: str) -> None:
        """Give the lease up (graceful stop, rebalance, a finished shard): another replica
        may take it at once."""
        try:
            self._db.update_item(
                TableName=self.table,
                Key={KEY: {"S": lease_key(self.pipeline_id, stream, shard_id)}},
                UpdateExpression="REMOVE #o SET #e = :zero",
                ConditionExpression="#o = :me",
                ExpressionAttributeNames={"#o": "owner", "#e": "expires_at"},
                ExpressionAttributeValues={":me": {"S": worker}, ":zero": {"N": "0"}},
            )
        except Exception as exc:
            if not _conditional_failed(exc):
                raise

    def delete_pipeline(self) -> int:
        """Remove every item of this pipeline (undeploy); returns how many."""
        items = self._scan(f"{self.pipeline_id}/")
        for item in items:
            self._db.delete_item(TableName=self.table, Key={KEY: item[KEY]})
        return len(items)
