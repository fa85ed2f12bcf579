"""Errors a user can cause, each with one message naming where, what was expected and what was found.

Every error here (and every subclass of `DednError` defined elsewhere, e.g.
`dedn.checkpoint.CheckpointError`) pickles and unpickles intact, with its message and its
attributes, so that an error raised inside a Ray worker reaches the driver as itself.

`DednError.retryable` marks which errors are worth retrying: a `DednError` is a deterministic
consequence of the configuration, the data or the run itself (a bad key, a corrupt shard, a
non-finite loss) and would happen again on a retry, so its class says `retryable = False`. A
failure that is not a `DednError` (a lost worker or node, an out-of-memory kill) is a system
failure that a retry may cure; `is_retryable(exc)` applies this rule to an exception and the
exceptions it was raised from.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

__all__ = ["DednError", "DatasetError", "ConfigError", "NonFiniteLossError", "OutputError", "is_retryable", "os_reason",
           "ServerError", "ClusterError", "rebuild"]


def rebuild(cls: type, args: tuple, state: dict[str, Any]) -> "DednError":
    """Unpickle a DednError without calling its __init__ (whose signature is the subclass's own)."""
    obj = cls.__new__(cls, *args)
    obj.args = args
    obj.__dict__.update(state)
    return obj


class DednError(Exception):
    """Base class of every error `dedn` raises on purpose.

    retryable: False (the default for every DednError) means the error is deterministic (a user
    error in the configuration or the data, or a diverging run) and must end the run at once
    rather than be retried; a subclass for a transient condition may set it to True.
    """

    retryable: bool = False

    def __reduce__(self) -> tuple[Any, ...]:
        # The default (cls, self.args) would call a subclass's __init__ with the message alone
        # (ConfigError.__init__() missing 2 required positional arguments ...); rebuild from
        # the message args and the instance attributes instead, for every subclass.
        return rebuild, (type(self), tuple(self.args), dict(self.__dict__))


def is_retryable(exc: BaseException) -> bool:
    """False when `exc`, or an exception it was raised from, is a non-retryable DednError.

    Wrappers that keep the original as their cause (`raise Wrapper(...) from e`) are looked
    through, so `is_retryable(wrapper)` is False for a wrapped ConfigError. An exception merely
    raised while another was being handled (__context__) is judged on its own.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DednError) and not e.retryable:
            return False
        e = e.__cause__
    return True


class DatasetError(DednError, ValueError):
    """A dataset file (manifest, shard, class-side array, source file) is not what it must be."""

    def __init__(self, file: object, field: str, expected: str, found: object):
        self.file, self.field, self.expected, self.found = str(file), field, expected, found
        super().__init__(f"{self.file}: {field}: expected {expected}, found {found}")


class ConfigError(DednError, ValueError):
    """A configuration key or value is unknown or out of range."""

    def __init__(self, key: str, expected: str, found: object, source: str = "config"):
        self.key, self.expected, self.found, self.source = key, expected, found, source
        super().__init__(f"{source}: {key}: expected {expected}, found {found!r}")


class NonFiniteLossError(DednError, FloatingPointError):
    """The training loss became NaN or infinite; names the epoch, the step and every loss part."""

    def __init__(self, epoch: int, step: int, parts: Mapping[str, float]):
        self.epoch, self.step, self.parts = epoch, step, dict(parts)
        shown = ", ".join(f"{k}={v:.6g}" for k, v in parts.items())
        super().__init__(
            f"epoch {epoch}, step {step}: loss: expected a finite value, found {shown} "
            "(try a lower optim.lr, optim.grad_clip > 0, or check the features for NaN/inf)"
        )


def os_reason(e: BaseException) -> str:
    """An OSError as the OS says it ("No space left on device, errno 28"); other errors by type and first line."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{e.strerror or os.strerror(e.errno)}, errno {e.errno}"
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


class OutputError(DednError, RuntimeError):
    """A file or folder dedn writes could not be written (a missing or read-only location, a full disk).

    Raised after the partial file is removed: nothing half-written is left under the real name.
    """

    def __init__(self, path: object, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: cannot be written ({reason}); nothing half-written was left there")


class ServerError(DednError, RuntimeError):
    """The team tracking server (PostgreSQL + MLflow, `jobs/server.py`) could not be started, reached or stopped.

    `what` names the part (a folder, a port, "MLFLOW_TRACKING_URI"); the message says what was found
    and where its log is.
    """

    def __init__(self, what: object, problem: str):
        self.what, self.problem = str(what), problem
        super().__init__(f"{self.what}: {problem}")


class ClusterError(DednError, RuntimeError):
    """The Ray cluster a run was told to use (`--address`, `RAY_ADDRESS`) cannot be reached, or went away.

    `address` names the cluster; `problem` says what happened and, for a run that had started, the
    `--name` that continues it from its last checkpoint.
    """

    def __init__(self, address: object, problem: str):
        self.address, self.problem = str(address), problem
        super().__init__(f"Ray cluster {self.address}: {problem}")
