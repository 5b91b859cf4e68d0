"""Creates what a Kinesis pipeline needs, waits until it is usable, and removes it again.

- one stream per captured table (`<topic_prefix>-<schema>-<table>`) with `shard_count`
  shards, and its DLQ stream (`<stream>-<dlq.topic_suffix>`, one shard, 7 days' retention)
  unless dlq is off;
- the DynamoDB lease/checkpoint table (on-demand billing), shared by the pipelines that name
  it.

Idempotent: what exists is kept (a stream with another shard count is left as it is and
logged: resharding is the operator's call). Everything it creates is tagged
`cdc-platform:pipeline=<id>`; `teardown` deletes only tagged streams, this pipeline's items
of the table, and the table itself only if it was created for this pipeline and holds
nothing else.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from adapters.kinesis.leases import KEY, LeaseTable
from adapters.kinesis.settings import KinesisSettings, client, error_code

log = structlog.get_logger(__name__)

TAG = "cdc-platform:pipeline"
# Dead letters stay in a DLQ stream only as long as its retention: a week (not 24 hours)
# for `cdc dlq` to list and replay them.
DLQ_RETENTION_HOURS = 168


class KinesisProvisioner:
    def __init__(
        self,
        settings: KinesisSettings,
        *,
        kinesis_client: Any = None,
        dynamodb_client: Any = None,
        wait_seconds: float = 300.0,
    ) -> None:
        self._settings = settings
        self._kinesis = kinesis_client
        self._dynamodb = dynamodb_client
        self._wait_seconds = wait_seconds
        self.created: list[str] = []
        self.removed: list[str] = []

    def _clients(self) -> tuple[Any, Any]:
        if self._kinesis is None:
            self._kinesis = client("kinesis", self._settings)
        if self._dynamodb is None:
            self._dynamodb = client("dynamodb", self._settings)
        return self._kinesis, self._dynamodb

    async def provision(self) -> None:
        await asyncio.to_thread(self._provision)

    async def teardown(self, force: bool = False) -> list[str]:
        """Delete what this pipeline created; returns what was done, one line each.
        (`force` is for the slot; nothing here is refused while in use.)"""
        self.removed = []
        await asyncio.to_thread(self._teardown)
        return list(self.removed)

    # ------------------------------------------------------------------ blocking parts

    def _provision(self) -> None:
        kinesis, dynamodb = self._clients()
        s = self._settings
        streams = list(dict.fromkeys(s.streams.values()))
        wanted = [(name, s.shard_count) for name in streams]
        wanted += [(d, 1) for name in streams if (d := s.dlq_stream(name)) is not None]
        dlqs = {name for name, _ in wanted[len(streams) :]}
        for name, shards in wanted:
            self._stream(kinesis, name, shards, DLQ_RETENTION_HOURS if name in dlqs else None)
        self._table(dynamodb)
        deadline = time.monotonic() + self._wait_seconds
        for name, _ in wanted:
            self._wait_stream(kinesis, name, deadline)
        self._wait_table(dynamodb, deadline)

    def _stream(
        self, kinesis: Any, name: str, shards: int, retention_hours: int | None = None
    ) -> None:
        try:
            summary = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        except Exception as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
        else:
            if summary.get("OpenShardCount") not in (None, shards):
                log.warning(
                    "kinesis.shard_count_differs",
                    stream=name,
                    open_shards=summary.get("OpenShardCount"),
                    shard_count=shards,
                )
            return
        try:
            kinesis.create_stream(
                StreamName=name,
                ShardCount=shards,
                StreamModeDetails={"StreamMode": "PROVISIONED"},
                Tags={TAG: self._settings.pipeline_id},
            )
        except Exception as exc:
            if error_code(exc) != "ResourceInUseException":  # created meanwhile
                raise
            return
        # Tags on create_stream are recent (and ignored by some emulators): tag again.
        self._wait_stream(kinesis, name, time.monotonic() + self._wait_seconds)
        kinesis.add_tags_to_stream(StreamName=name, Tags={TAG: self._settings.pipeline_id})
        if retention_hours is not None:
            kinesis.increase_stream_retention_period(
                StreamName=name, RetentionPeriodHours=retention_hours
            )
            self._wait_stream(kinesis, name, time.monotonic() + self._wait_seconds)
        self.created.append(f"stream {name}")
        log.info("kinesis.stream_created", stream=name, shards=shards)

    def _table(self, dynamodb: Any) -> None:
        name = self._settings.checkpoint_table
        try:
            dynamodb.describe_table(TableName=name)
            return
        except Exception as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
        try:
            dynamodb.create_table(
                TableName=name,
                AttributeDefinitions=[{"AttributeName": KEY, "AttributeType": "S"}],
                KeySchema=[{"AttributeName": KEY, "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST",
                Tags=[{"Key": TAG, "Value": self._settings.pipeline_id}],
            )
        except Exception as exc:
            if error_code(exc) != "ResourceInUseException":
                raise
            return
        self.created.append(f"table {name}")
        log.info("kinesis.table_created", table=name)

    def _wait_stream(self, kinesis: Any, name: str, deadline: float) -> None:
        while True:
            summary = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
            if summary["StreamStatus"] in ("ACTIVE", "UPDATING"):  # UPDATING is readable
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {name} is {summary['StreamStatus']}, not ACTIVE")
            time.sleep(0.5)

    def _wait_table(self, dynamodb: Any, deadline: float) -> None:
        name = self._settings.checkpoint_table
        while True:
            status = dynamodb.describe_table(TableName=name)["Table"]["TableStatus"]
            if status == "ACTIVE":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"DynamoDB table {name} is {status}, not ACTIVE")
            time.sleep(0.5)

    def _teardown(self) -> None:
        kinesis, dynamodb = self._clients()
        s = self._settings
        for name in s.all_streams:
            try:
                tags = kinesis.list_tags_for_stream(StreamName=name).get("Tags", [])
            except Exception as exc:
                if error_code(exc) == "ResourceNotFoundException":
                    continue
                raise
            if {t["Key"]: t["Value"] for t in tags}.get(TAG) != s.pipeline_id:
                log.warning(
                    "kinesis.stream_kept", stream=name, reason="not created by this pipeline"
                )
                continue
            kinesis.delete_stream(StreamName=name, EnforceConsumerDeletion=True)
            log.info("kinesis.stream_deleted", stream=name)
            self.removed.append(f"deleted Kinesis stream {name}")
        try:
            table = dynamodb.describe_table(TableName=s.checkpoint_table)["Table"]
        except Exception as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return
            raise
        removed = LeaseTable(dynamodb, s.checkpoint_table, s.pipeline_id).delete_pipeline()
        log.info("kinesis.checkpoints_deleted", table=s.checkpoint_table, items=removed)
        self.removed.append(f"deleted {removed} lease/checkpoint item(s) of {s.checkpoint_table}")
        tags = dynamodb.list_tags_of_resource(ResourceArn=table["TableArn"]).get("Tags", [])
        ours = {t["Key"]: t["Value"] for t in tags}.get(TAG) == s.pipeline_id
        others = dynamodb.scan(TableName=s.checkpoint_table, Limit=1, Select="COUNT")["Count"]
        if ours and not others:
            dynamodb.delete_table(TableName=s.checkpoint_table)
            log.info("kinesis.table_deleted", table=s.checkpoint_table)
            self.removed.append(f"deleted DynamoDB table {s.checkpoint_table}")
