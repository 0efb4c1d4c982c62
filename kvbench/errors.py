"""One error type for problems the user can fix; the CLI prints it on one line and exits 2."""


class KvbenchError(ValueError):
    """A user-fixable problem: the message names the problem and the fix, on one line."""
