"""One error type for problems the user can fix; the CLI prints it on one line and exits 2."""


class KvbenchError(ValueError):
    """A user-fixable problem: the message names the problem and the fix, on one line."""

    status = 2  # the CLI's exit status


class Interrupted(KvbenchError):
    """The run was stopped by SIGINT or SIGTERM; what was stored stays stored (exit 128 + signal number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.status = 128 + signum
