"""One exception type for every error a user can cause.

The CLI prints its message as a single line on stderr and exits non-zero; the
message must name what is wrong (file, line, field, id) so that nothing else is
needed to fix the input.
"""


class UnlearnError(Exception):
    """A user-facing error: bad input, unknown run or id, unreachable store."""
