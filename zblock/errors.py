"""Error classes: exceptions in the core, errno at the FUSE edge, exit codes at the CLI edge.

Each class carries the errno the FUSE adapter answers with and the exit code the CLI uses.
A user mistake is a ZblockError whose message is one line naming the problem.
"""

import errno


class ZblockError(Exception):
    """Base of every error zblock raises on purpose."""

    errno = errno.EIO
    exit_code = 1


class UsageError(ZblockError):
    """A command-line argument or option is wrong (exit 2, like argparse)."""

    errno = errno.EINVAL
    exit_code = 2


class ConfigError(ZblockError):
    """A configuration value is invalid: an option at mount time or a param write at run time."""

    errno = errno.EINVAL
    exit_code = 2


class UnknownCompressor(ConfigError):
    """An algorithm that is not known or whose library is not installed."""


class BackingError(ZblockError):
    """The backing file cannot be used: missing, wrong size, locked, a directory, corrupt."""

    exit_code = 1


class BackingLocked(BackingError):
    errno = errno.EBUSY


class MountError(ZblockError):
    """Mounting, unmounting or talking to a mount failed."""


class NotAZblockMount(MountError):
    pass


class DeadMount(MountError):
    """A zblock mount whose server is gone (the kernel answers ENOTCONN)."""


class WritebackFailed(MountError):
    """Writing back before an unmount failed; the mount was kept, so nothing is lost."""

    exit_code = 3


class OutOfRange(ZblockError):
    """I/O past the end of the disk."""

    errno = errno.ENOSPC


class DataError(ZblockError):
    """A page cannot be returned correctly: checksum mismatch, decompression or disk read failure."""

    errno = errno.EIO


class DiskError(ZblockError):
    """The backing disk failed an operation (EIO, ENOSPC). `errno` is the disk's error."""

    def __init__(self, message, err=errno.EIO):
        super().__init__(message)
        self.errno = err
