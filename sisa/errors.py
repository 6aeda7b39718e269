"""One exception type for every error a user can cause.

The CLI prints its message as a single line on stderr and exits non-zero; the
message must name what is wrong (file, line, field, id) so that nothing else is
needed to fix the input.
"""


class UnlearnError(Exception):
    """A user-facing error: bad input, unknown run or id, unreachable store."""


def one_line(exc: BaseException) -> str:
    """The message of an UnlearnError, also when Ray re-raises it from an actor wrapped in
    a traceback: the last line, without the exception's qualified name."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    marker = "UnlearnError: "
    return last.split(marker, 1)[1] if marker in last else last
