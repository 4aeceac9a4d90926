"""Where diffalign writes: the rules every command's outputs follow, in one place.

- **No input is ever overwritten.** An output path that is (or resolves to, or is a hard link
  of) one of the command's inputs is refused before any work starts.
- **No existing output is replaced unless asked** (``--overwrite``); a new training run goes
  only into a folder that does not exist or is empty.
- **Nothing half-written is left under a final name.** Files are written under a hidden
  temporary name beside their destination and renamed into place (``replacing``,
  ``write_text``; folders: ``staging_folder``), the one way diffalign writes atomically; if the
  write fails (a full disk, a kill), the temporary is removed, and ``remove_debris`` clears the
  ones a hard kill left behind the next time the same folder is written. What lands under the
  final name has the permissions a plain ``open`` or ``mkdir`` would give (the umask's).
- **Checks come first**: a folder that cannot hold the output (its parent is a file, it is not
  writable) is reported before minutes of sampling or protecting, not after.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from diffalign.errors import DiffalignError

# Every temporary name diffalign writes starts with this, so leftovers are recognisable as its own.
TEMPORARY_PREFIX = ".diffalign-tmp-"
# mkstemp and mkdtemp create private (0600 / 0700) entries; the renamed results get the modes a
# plain open() or mkdir() would, from the process's umask (read once: reading it means setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
FOLDER_MODE = 0o777 & ~_UMASK


class OutputError(DiffalignError, ValueError):
    """An output path would overwrite an input or an existing output, or cannot be written."""


def _same_file(path: Path, other: Path) -> bool:
    if path.resolve() == other.resolve():
        return True
    try:
        return path.exists() and other.exists() and os.path.samefile(path, other)
    except OSError:
        return False


def check_writable_folder(folder: Path) -> None:
    """Refuse a folder that cannot be created or written: its nearest existing ancestor must be a
    writable folder."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write into {str(folder)!r}: {str(existing)!r} is a file, not a folder")
    # Try it: permission bits do not tell the whole story (root, read-only mounts, immutable folders).
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=TEMPORARY_PREFIX):
            pass
    except OSError as error:
        raise OutputError(
            f"cannot write into {str(folder)!r}: {str(existing)!r} is not writable ({error.strerror}); "
            "choose a folder you can write to"
        ) from error


def check_output_file(
    path: str | Path,
    *,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    what: str = "output",
) -> Path:
    """``path`` if the command may write it, else an ``OutputError`` saying why (nothing is written)."""
    path = Path(path).expanduser()
    for source in inputs:
        if source is not None and _same_file(path, Path(source).expanduser()):
            raise OutputError(
                f"{what} {str(path)!r} is the input {str(source)!r}; diffalign never overwrites an input. "
                "Choose another output name."
            )
    if path.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputError(
            f"{what} {str(path)!r} already exists; pass --overwrite to replace it, or choose another name "
            "(nothing was written)"
        )
    check_writable_folder(path.parent)
    return path


def check_output_files(
    paths: Iterable[str | Path],
    *,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    what: str = "output",
) -> list[Path]:
    """``check_output_file`` for every file a command will write (e.g. the images of a folder)."""
    inputs = list(inputs)
    return [check_output_file(path, inputs=inputs, overwrite=overwrite, what=what) for path in paths]


def check_new_run_folder(folder: str | Path) -> Path:
    """A new run goes only into a folder that does not exist or is empty (hidden leftovers of
    diffalign's own temporary files aside)."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output_dir {str(folder)!r} is a file, not a folder; choose another output_dir")
    if folder.is_dir():
        held = sorted(p.name for p in folder.iterdir() if not p.name.startswith(TEMPORARY_PREFIX))
        if held:
            shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            raise OutputError(
                f"output_dir {str(folder)!r} is not empty (it holds {shown}) and has no checkpoint to resume. "
                "A new run goes only into a new or empty folder, so nothing there is overwritten: "
                "choose another output_dir."
            )
    check_writable_folder(folder)
    return folder


def cache_root() -> Path:
    """diffalign's cache folder, for what it generates once and reuses (preference sets, class
    images): ``$DIFFALIGN_CACHE``, else ``$XDG_CACHE_HOME/diffalign``, else ``~/.cache/diffalign``."""
    if os.environ.get("DIFFALIGN_CACHE"):
        return Path(os.environ["DIFFALIGN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "diffalign"


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` atomically,
    on failure removed. The temporary name keeps the suffix, so writers that pick a format by
    suffix still do."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f"{TEMPORARY_PREFIX}{path.stem}-", suffix=path.suffix
    )
    os.close(handle)
    os.chmod(temporary, FILE_MODE)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, flushed to disk before the rename."""
    path = Path(path)
    with replacing(path) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    return path


@contextmanager
def staging_folder(final: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """A hidden folder beside ``final`` to fill; on success it becomes ``final`` in one rename, on
    failure it is removed. With ``replace`` an existing ``final`` is removed first; without, a
    ``final`` that holds files by then (another process wrote it meanwhile) is kept and the
    write ends in ``FileExistsError``."""
    final = Path(final)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{TEMPORARY_PREFIX}{final.name}-"))
    os.chmod(staging, FOLDER_MODE)
    try:
        yield staging
        if replace and final.exists():
            shutil.rmtree(final)
        try:
            os.replace(staging, final)
        except OSError as error:
            if not replace and final.is_dir() and any(final.iterdir()):
                raise FileExistsError(f"{final} was written by another process meanwhile") from error
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_debris(folder: str | Path, *, of: str | None = None) -> list[Path]:
    """Remove the temporary files and folders an interrupted write left in ``folder``; returns them.

    ``of`` limits it to the leftovers of writes to ``folder/of``: in a folder several processes
    write to (the cache), another entry's temporary may be a write in progress."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    pattern = f"{TEMPORARY_PREFIX}{of}-*" if of is not None else f"{TEMPORARY_PREFIX}*"
    for leftover in folder.glob(pattern):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


@contextmanager
def cache_entry_lock(entry: str | Path) -> Iterator[Path]:
    """Hold the lock of one cache entry (a folder under ``cache_root()``) while making it.

    Two runs that need the same entry at once (two ``personalize`` jobs with the same class images)
    take turns: the first fills it, the second then finds it complete and reads it. Under the lock
    the entry's own leftovers from an interrupted write are removed; other entries' temporaries are
    left alone, as they may be writes in progress. The lock is a ``filelock`` file beside the entry."""
    from filelock import FileLock

    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.parent / f".{entry.name}.lock")):
        remove_debris(entry.parent, of=entry.name)
        yield entry
