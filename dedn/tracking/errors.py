"""A store that fails, fails once: `TrackingStoreError`, one line naming the store and its reason.

`store_errors` turns whatever a request to the store raises into it; `is_store_failure` tells a
store that cannot answer (read-only, locked, full, a server gone) from an answer to the request
(no such run, already exists), which callers catch on purpose.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

from dedn.errors import DednError
from dedn.tracking.location import redact_uri, tracking_uri

__all__ = ["TrackingStoreError", "is_store_failure", "store_errors"]


class TrackingStoreError(DednError, RuntimeError):
    """The tracking store failed a request: read-only, locked, full, a server gone or refusing.

    One line naming the store (its URI without a password) and the reason the store gave. Not
    retried: a restarted worker group would meet the same store, and every restart's traceback
    would bury the reason. `note` says what became of the run (e.g. that it is left RUNNING).
    """

    def __init__(self, uri: object, what: str, reason: str, note: str = ""):
        self.uri, self.what, self.reason, self.note = redact_uri(str(uri)), what, reason, note
        super().__init__(f"tracking store {self.uri}: {what} failed: {reason}" + (f"; {note}" if note else ""))


# MLflow error codes of a store that cannot do what it is asked, whatever the request (the rest,
# e.g. RESOURCE_DOES_NOT_EXIST, answer the request itself, and callers catch them on purpose)
_FAILURE_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED", "PERMISSION_DENIED",
                            "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND", "IO_ERROR"})


def _chain(e: BaseException) -> Iterator[BaseException]:
    """`e`, what it was raised from, and a database driver's own error (`.orig`), innermost last."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        yield x
        orig = getattr(x, "orig", None)  # sqlalchemy's DBAPIError keeps the driver's error here
        # not __context__: an answer raised while handling something else (a missing file) is an answer
        x = x.__cause__ or (orig if isinstance(orig, BaseException) else None)


def is_store_failure(e: BaseException) -> bool:
    """Whether `e` (from an MLflow call) says the store itself failed, rather than answering the request.

    A database error (read-only, locked, full, gone), an OSError (a full or read-only artifact
    folder, a refused connection: requests' errors are OSErrors too) or an MlflowException with a
    failure code (MLflow turns SQLAlchemy's OperationalError into TEMPORARILY_UNAVAILABLE).
    """
    for x in _chain(e):
        if isinstance(x, DednError):
            return False
        if isinstance(x, OSError) or type(x).__name__ in ("OperationalError", "DisconnectionError", "InterfaceError"):
            return True
        if str(getattr(x, "error_code", "")) in _FAILURE_CODES:
            return True
    return False


def _reason(e: BaseException) -> str:
    """The store's own words, one line: the innermost error of the chain (a database driver's message
    with its type), else the error's first line; passwords left out."""
    inner = list(_chain(e))[-1]
    text = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
    text = re.sub(r"^\((?:[\w.]+)\)\s*", "", text)  # sqlalchemy's "(sqlite3.OperationalError) " prefix
    kind = f"{type(inner).__module__}.{type(inner).__qualname__}".removeprefix("builtins.")
    if len(text) > 300:
        text = text[:297] + "..."
    return redact_uri(f"{text} ({kind})" if text else kind)


@contextlib.contextmanager
def store_errors(what: str, uri: str | None = None, *, every: bool = True) -> Iterator[None]:
    """Inside the block, an error of the tracking store becomes a TrackingStoreError naming the store.

    every=True: any error but a DednError (the block is nothing but a request to the store, so
    whatever it raises is the store refusing it); every=False: only store failures
    (`is_store_failure`), so an MlflowException that answers the request (no such run, already
    exists) reaches callers that catch it on purpose. A TrackingStoreError from a request inside
    (a `client()` call) is named after this block's `what` when every=True.
    """
    try:
        yield
    except TrackingStoreError as e:  # from a client() call inside: named by this, the caller's, request
        if not every:
            raise
        raise TrackingStoreError(e.uri, what, e.reason, e.note) from None
    except DednError:
        raise
    except Exception as e:
        if not every and not is_store_failure(e):
            raise
        # from None: the chain is SQLAlchemy's and MLflow's frames around the reason given here
        raise TrackingStoreError(uri or tracking_uri(), what, _reason(e)) from None
