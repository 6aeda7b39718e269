"""One exception type for every error a user can cause.

The CLI prints its message as a single line on stderr and exits non-zero; the
message must name what is wrong (file, line, field, id) so that nothing else is
needed to fix the input.
"""
import re


class UnlearnError(Exception):
    """A user-facing error: bad input, unknown run or id, unreachable store."""


def one_line(exc: BaseException) -> str:
    """The message of an UnlearnError, also when Ray re-raises it from an actor wrapped in
    a traceback: the last line, without the exception's qualified name."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    match = _QUALIFIED.match(last)
    return last[match.end():] if match else last


class Unavailable(UnlearnError):
    """Nothing may answer right now: every shard holding records is quarantined by a
    deletion in progress. Transient: ask again, or wait (HTTP 503)."""


# "core.errors.IntegrityError: ", "UnlearnError: ", "core.lock.RunBusy: " ...: the class of any
# UnlearnError subclass, as Ray prints it in front of the message
_QUALIFIED = re.compile(r"^(?:[A-Za-z_][\w]*\.)*(?:UnlearnError|IntegrityError|ObjectMissing|RunBusy|LockLost|Unavailable|UnknownRequest): ")


class IntegrityError(UnlearnError):
    """A stored object does not match what names it (its SHA-256, or the digest the
    manifest records). Permanent: retrying reads the same bytes, so nothing may build on
    the object or commit over it until it is repaired."""


class ObjectMissing(IntegrityError):
    """An object the committed state names is not in the store. Under the run lock that is
    damage; for a reader it may also mean a commit purged it meanwhile (read HEAD again)."""
