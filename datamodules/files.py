"""Atomic file writes shared by the cache, the phantoms, the checkpoints and the segmentation output."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file of its own beside ``target``, then rename it into place.

    Readers never see a partial file, a failed write leaves nothing behind, and concurrent writers of
    one target (DDP ranks, loader workers) never share a temporary file. The temporary name ends
    with the target's name, so writers that infer the format from the extension (nibabel) still work.
    """
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=f"-{target.name}")
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)
