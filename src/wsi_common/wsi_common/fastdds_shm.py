"""Fast DDS shared memory in /dev/shm: which segments a process owns, and removing those no process owns.

Every DDS participant of Fast DDS (rmw_fastrtps) creates a shared-memory segment, `fastdds_<16 hex digits>` (128 MiB
for a process that sends images with the shipped large-image profile), and holds an advisory lock on its lock file
`fastdds_<id>_el` while it lives. A participant deleted normally removes both. A process killed before that (SIGKILL
of a straggler, the out-of-memory killer, a node that exits at its stop deadline) leaves them: a zombie segment,
which stays in the machine's memory until it is removed or the machine restarts. Fast DDS does not remove zombies
itself (its `fastdds shm clean` command does); `remove_zombie_segments` does what it does for segments. ROS-free.
"""
import fcntl
import re
import time
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_LOCK_FILE = re.compile(r"^(fastdds_[0-9a-z]{16})_(el|sl)$")
# A lock file younger than this is left alone: its participant may be between creating and locking it.
ZOMBIE_MIN_AGE_S = 2.0


def fast_dds_segments() -> set[str]:
    """Every Fast DDS shared-memory file on the machine."""
    return {str(path) for path in SHM_DIR.glob("fastdds_*")}


def participant_segments(pid: int, existing: set[str]) -> set[str]:
    """The Fast DDS segments in /dev/shm that the process's participant owns: those it maps that were not
    there before it started (it also maps the segments of other participants on the machine, to write to
    them). The port files (fastdds_port<N>, 52 kB) are not among them: every participant on the port shares
    one, and Fast DDS keeps it while any process of the domain may still use it."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    mapped = {line.split()[-1] for line in maps if "/dev/shm/fastdds_" in line}
    return {path for path in mapped - existing if not Path(path).name.startswith("fastdds_port")}


@dataclass(frozen=True)
class ZombieSweep:
    segments: tuple[str, ...]     # the segment files removed
    bytes_freed: int

    def describe(self) -> str:
        return (f"removed {len(self.segments)} Fast DDS shared-memory segment(s) "
                f"({self.bytes_freed / 2 ** 20:.0f} MiB) that processes which ended without deleting their DDS "
                "participant left in /dev/shm")


def _held(lock_file: Path) -> bool:
    """Whether a process holds the lock file (or it cannot be told: another user's, or gone meanwhile)."""
    try:
        with open(lock_file, "ab") as file:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    return False


def remove_zombie_segments(directory: Path = SHM_DIR, min_age_s: float = ZOMBIE_MIN_AGE_S) -> ZombieSweep:
    """Remove every Fast DDS segment in `directory` whose lock file no living process holds (and that lock file),
    leaving the segments of participants alive on the machine, whoever runs them; returns what was removed."""
    removed, freed = [], 0
    now = time.time()
    for lock_file in sorted(Path(directory).iterdir()):
        match = _LOCK_FILE.match(lock_file.name)
        try:
            if match is None or now - lock_file.stat().st_mtime < min_age_s or _held(lock_file):
                continue
        except FileNotFoundError:       # removed meanwhile by its participant or another sweep
            continue
        segment = lock_file.with_name(match.group(1))
        try:
            freed += segment.stat().st_size
            segment.unlink()
            removed.append(str(segment))
        except FileNotFoundError:
            pass
        lock_file.unlink(missing_ok=True)
    return ZombieSweep(tuple(removed), freed)


def main() -> int:
    """`python -m wsi_common.fastdds_shm`: remove the zombie segments, say what was freed."""
    print(remove_zombie_segments().describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
