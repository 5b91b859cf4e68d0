"""Topic administration through confluent-kafka's AdminClient (blocking calls, run them in
a thread). Creating is idempotent; nothing here deletes a topic except :meth:`delete_topics`,
which only `cdc undeploy --delete-topics` calls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from adapters.config import KafkaConfig
from adapters.kafka.security import client_settings


class TopicAdminError(Exception):
    """The broker refused or did not answer; the message names the topic and the reason."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str] = field(default_factory=dict)


@dataclass
class EnsureResult:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)


class TopicAdmin:
    def __init__(self, kafka: KafkaConfig, timeout: float = 15.0) -> None:
        self.timeout = timeout
        self.client = AdminClient(client_settings(kafka, "admin"))

    def list_topics(self) -> set[str]:
        try:
            metadata = self.client.list_topics(timeout=self.timeout)
        except KafkaException as exc:
            raise TopicAdminError(f"cannot list topics: {exc.args[0]}") from exc
        return set(metadata.topics)

    def broker_count(self) -> int:
        """How many brokers answer (a health check)."""
        try:
            return len(self.client.list_topics(timeout=self.timeout).brokers)
        except KafkaException as exc:
            raise TopicAdminError(f"brokers not reachable: {exc.args[0]}") from exc

    def ensure_topics(self, specs: Iterable[TopicSpec]) -> EnsureResult:
        """Create the topics that do not exist; an existing one is left exactly as it is."""
        result = EnsureResult()
        wanted = list(specs)
        present = self.list_topics()
        missing = [s for s in wanted if s.name not in present]
        result.existing = [s.name for s in wanted if s.name in present]
        if not missing:
            return result
        futures = self.client.create_topics(
            [
                NewTopic(
                    s.name,
                    num_partitions=s.partitions,
                    replication_factor=s.replication_factor,
                    config=dict(s.config),
                )
                for s in missing
            ],
            operation_timeout=self.timeout,
            request_timeout=self.timeout,
        )
        problems = []
        for name, future in futures.items():
            try:
                future.result()
                result.created.append(name)
            except KafkaException as exc:
                error = exc.args[0]
                if (
                    isinstance(error, KafkaError)
                    and error.code() == KafkaError.TOPIC_ALREADY_EXISTS
                ):
                    result.existing.append(name)  # created meanwhile by someone else
                else:
                    problems.append(
                        f"{name}: {error.str() if isinstance(error, KafkaError) else error}"
                    )
        if problems:
            raise TopicAdminError("cannot create topic(s): " + "; ".join(problems))
        return result

    def delete_topics(self, names: Iterable[str]) -> list[str]:
        """Delete the named topics that exist; returns those deleted."""
        present = self.list_topics()
        doomed = [n for n in names if n in present]
        if not doomed:
            return []
        futures = self.client.delete_topics(doomed, operation_timeout=self.timeout)
        problems = []
        for name, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                problems.append(f"{name}: {exc.args[0]}")
        if problems:
            raise TopicAdminError("cannot delete topic(s): " + "; ".join(problems))
        return doomed
