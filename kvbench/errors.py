"""One error type for problems the user can fix (the CLI prints it on one line and exits 2), and which OS
errors are the disk failing."""

import errno


class KvbenchError(ValueError):
    """A user-fixable problem: the message names the problem and the fix, on one line."""

    status = 2  # the CLI's exit status


class Interrupted(KvbenchError):
    """The run was stopped by SIGINT or SIGTERM; what was stored stays stored (exit 128 + signal number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.status = 128 + signum


# A write that fails with one of these (disk full, quota, file too large, read-only, I/O error) will fail again
# for the next sample too: the run stops at once, and the CLI names the output it was writing.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


def is_disk_failure(e: BaseException) -> bool:
    """An `OSError` from the disk rather than from one sample's work (see `DISK_ERRNOS`)."""
    return isinstance(e, OSError) and e.errno in DISK_ERRNOS
