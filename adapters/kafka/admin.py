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
        self.client_error: str | None = None
        settings = client_settings(kafka, "admin")
        settings["error_cb"] = self._note_client_error
        self.client = AdminClient(settings)

    def _note_client_error(self, error: KafkaError) -> None:
        if error.code() != KafkaError._ALL_BROKERS_DOWN:  # says nothing about why
            self.client_error = error.str()

    def _failure(self, exc: KafkaException) -> str:
        """The failed request's error and why the client could not talk to the brokers: a
        failed TLS handshake or SASL authentication is only reported through ``error_cb``
        (served by ``poll``), the request itself just says "Broker transport failure"."""
        self.client.poll(0)
        if self.client_error is None:
            return str(exc.args[0])
        return f"{exc.args[0]}; client error: {self.client_error}"

    def list_topics(self) -> set[str]:
        try:
            metadata = self.client.list_topics(timeout=self.timeout)
        except KafkaException as exc:
            raise TopicAdminError(f"cannot list topics: {self._failure(exc)}") from exc
        return set(metadata.topics)

    def broker_count(self) -> int:
        """How many brokers answer (a health check)."""
        try:
            return len(self.client.list_topics(timeout=self.timeout).brokers)
        except KafkaException as exc:
            raise TopicAdminError(f"brokers not reachable: {self._failure(exc)}") from exc

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
