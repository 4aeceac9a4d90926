"""The one kind of error the command line reports as a single line: a fault the user can fix.

Every input or environment fault diffalign detects is raised as a subclass of
``DiffalignError`` (config keys, prompt files, images, rewards, checkpoints, output paths, a
diverged run), with a message that says what was wrong, what was expected and what was kept.
The CLI prints such errors, and ``OSError``s from the machine (a full disk, a read-only folder),
as one line with a non-zero exit; anything else is a bug in diffalign and keeps its traceback.
"""

from __future__ import annotations

import errno


class DiffalignError(Exception):
    """A fault in what the user gave or in the environment; the message says how to fix it."""


def describe_os_error(error: OSError) -> str:
    """One line for an ``OSError`` raised by the machine, naming the file and, for a full disk, the space."""
    where = f" {error.filename!r}" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"no space left on the device while writing{where}: free some disk space and run again"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing{where}: free some space in your quota and run again"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"permission denied for{where or ' a file'}: {error.strerror}; choose a folder you can write to"
        )
    if error.errno == errno.ENOTDIR:
        return f"a path component of{where} is a file, not a folder: {error.strerror}"
    if error.errno == errno.EISDIR:
        return f"{where.strip() or 'the path'} is a folder where a file was expected"
    return f"{error.strerror or error}{':' + where if where else ''}"
