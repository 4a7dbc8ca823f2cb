"""The work directory of an export: hidden beside its outputs, locked while the export runs, its outputs
renamed into place only when complete (commit); the work directories killed exports leave are removed later
(remove_stale_partials)."""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
import uuid
from pathlib import Path

# An export's output name: a plain file stem.
OUTPUT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Work directory of an export: ".<name>.<32 hex digits>.export-partial" beside its outputs.
PARTIAL_SUFFIX = ".export-partial"
_PARTIAL_PATTERN = re.compile(
    rf"\.(?P<name>{OUTPUT_NAME_PATTERN.pattern})\.[0-9a-f]{{32}}{re.escape(PARTIAL_SUFFIX)}")
# A work directory is locked an instant after it is created; one unchanged for this long and unlocked
# belongs to no live export.
STALE_PARTIAL_AGE_S = 60.0


def create_work_dir(output_dir: Path, name: str) -> tuple[Path, int]:
    """A new work directory for export `name`, and the descriptor that holds its lock until the export
    ends. The lock (flock on the directory) tells remove_stale_partials that a live export owns it; the
    kernel drops it when the process ends, however it ends."""
    work_dir = output_dir / f".{name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
    work_dir.mkdir(mode=0o700)
    lock = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return work_dir, lock


def remove_stale_partials(directory: str | Path, name: str | None = None) -> list[Path]:
    """Remove the work directories that exports killed before they ended left in `directory`: those of
    export `name`, or of any export. Returns what was removed."""
    return _remove_stale_entries(Path(directory), [entry.name for entry in os.scandir(directory)], name)


def remove_stale_partials_under(root: str | Path) -> list[Path]:
    """remove_stale_partials in `root` and every directory below it, except inside Zarr stores and work
    directories: exports write no work directory there, and they hold most of the files. A directory
    that cannot be listed is passed over."""
    removed = []
    for directory, subdirectories, _ in os.walk(root):
        removed += _remove_stale_entries(Path(directory), subdirectories, None)
        subdirectories[:] = [d for d in subdirectories if not d.endswith((".zarr", PARTIAL_SUFFIX))]
    return removed


def _remove_stale_entries(directory: Path, entry_names: list[str], name: str | None) -> list[Path]:
    removed = []
    for entry_name in entry_names:
        match = _PARTIAL_PATTERN.fullmatch(entry_name)
        if match and (name is None or match["name"] == name) and _remove_if_stale(directory / entry_name):
            removed.append(directory / entry_name)
    return removed


def _remove_if_stale(path: Path) -> bool:
    """Remove a work directory that no live export holds (see create_work_dir): unlocked, and unchanged
    for STALE_PARTIAL_AGE_S (it is locked an instant after its creation). Symbolic links are never
    followed. True when it was removed."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # a symbolic link, or already gone
        return False
    try:
        if time.time() - os.fstat(descriptor).st_mtime < STALE_PARTIAL_AGE_S:
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live export; or locks do not work here, and then it may be live
            return False
        shutil.rmtree(path, ignore_errors=True)
        return not os.path.lexists(path)
    finally:
        os.close(descriptor)


def commit(written: dict[str, Path], final_paths: dict[str, Path], work_dir: Path) -> None:
    """Rename complete outputs into place; if one rename fails, the ones already renamed are removed."""
    committed: list[Path] = []
    try:
        for export_format, temporary in written.items():
            final = final_paths[export_format]
            if final.is_dir():
                final.rename(work_dir / "replaced-output")
            os.replace(temporary, final)
            committed.append(final)
    except OSError:
        for final in committed:
            if final.is_dir():
                shutil.rmtree(final, ignore_errors=True)
            else:
                final.unlink(missing_ok=True)
        raise
