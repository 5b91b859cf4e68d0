"""Errors the core raises; adapters translate their own failures into these."""


class CdcError(Exception):
    """Base of every error this project raises on purpose."""


class TransientError(CdcError):
    """The operation may succeed if retried (connection lost, timeout, server restarting)."""


class PermanentError(CdcError):
    """Retrying the same input will fail again (bad data, schema mismatch): dead-letter it."""


class SourceUnavailableError(TransientError):
    pass


class SinkUnavailableError(TransientError):
    pass


class SinkHaltedError(PermanentError):
    """The sink cannot go on without an operator (e.g. a column changed to a type the
    destination cannot take): the sink process stops with exit code 2 instead of rejecting
    the same batch forever."""


class TeardownRefusedError(CdcError):
    """A provisioner refused (or could not finish) removing a pipeline's transport resources
    (a slot still in use, a pipeline still running). `done` lists what it removed before."""

    def __init__(self, message: str, done: list[str]) -> None:
        super().__init__(message)
        self.done = done
