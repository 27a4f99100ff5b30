"""Atomic file writes shared by the cache, the phantoms, the checkpoints and the segmentation output."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path


def _temporary_beside(target: Path) -> Path:
    """Create an empty, unique temporary file beside ``target`` and return its path.

    The name ends with the target's name (writers that infer the format from the extension, such as
    nibabel, still work) and has a non-empty part before its last dot (torch's zip writer derives
    its archive name from it). The file is created with mode 0666 masked by the umask, like any
    other file, unlike ``tempfile.mkstemp``'s 0600.
    """
    while True:
        temporary = target.parent / f".tmp-{secrets.token_hex(6)}.{target.name}"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temporary


def _make_parents(targets: Sequence[Path]) -> list[Path]:
    """Make the targets' missing folders; return those made, deepest first."""
    made: set[Path] = set()
    for target in targets:
        made.update(d for d in (target.parent, *target.parent.parents) if not d.exists())
        target.parent.mkdir(parents=True, exist_ok=True)
    return sorted(made, key=lambda d: len(d.parts), reverse=True)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with suppress(OSError):  # not empty (another writer's file) or already gone
            folder.rmdir()


@contextmanager
def staged(targets: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield one temporary path per target; rename them all into place when the block succeeds.

    Missing folders are made. If the block (or a rename) fails, every temporary file and every
    folder made (when empty) is removed: the targets are all written or none is, and an existing
    target keeps its old content. Concurrent writers of one target never share a temporary file.
    """
    targets = [Path(t) for t in targets]
    made: list[Path] = []
    temporaries: list[Path] = []
    try:
        made = _make_parents(targets)
        temporaries.extend(_temporary_beside(t) for t in targets)
        yield temporaries
        for temporary, target in zip(temporaries, targets):
            temporary.replace(target)
    except BaseException:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        _remove_empty(made)
        raise


def check_writable(path: Path, what: str) -> None:
    """Raise ValueError unless files can be written at ``path`` (a folder that exists or can be made).

    A real probe (a temporary file made and removed in the nearest existing folder), so a read-only
    file system fails even for root. ``what`` names the path in the message, e.g. ``--output``.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: cannot be made, {existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot write in {existing} ({error.strerror or error})") from None


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file of its own beside ``target``, then rename it into place.

    Readers never see a partial file and a failed write leaves nothing behind (see :func:`staged`).
    """
    with staged([Path(target)]) as (temporary,):
        write(temporary)
