"""Zombie Fast DDS segments (their participant's process is gone) are removed; those a living process holds,
those just being created and every other file are left."""
import fcntl
import os
import time

from wsi_common.fastdds_shm import ZOMBIE_MIN_AGE_S, remove_zombie_segments


def _segment(directory, name: str, size: int, age_s: float) -> tuple:
    segment, lock_file = directory / name, directory / f"{name}_el"
    segment.write_bytes(b"\0" * size)
    lock_file.write_bytes(b"")
    then = time.time() - age_s
    for path in (segment, lock_file):
        os.utime(path, (then, then))
    return segment, lock_file


def test_only_segments_whose_lock_no_process_holds_are_removed(tmp_path):
    zombie = _segment(tmp_path, "fastdds_0123456789abcdef", 4096, age_s=60)
    living = _segment(tmp_path, "fastdds_fedcba9876543210", 8192, age_s=60)
    just_created = _segment(tmp_path, "fastdds_00000000000000aa", 1024, age_s=ZOMBIE_MIN_AGE_S / 4)
    port = _segment(tmp_path, "fastdds_port7413", 512, age_s=60)
    orphan_lock = tmp_path / "fastdds_1111111111111111_el"
    orphan_lock.write_bytes(b"")
    os.utime(orphan_lock, (time.time() - 60,) * 2)
    with open(living[1], "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)     # as the participant's process holds it
        sweep = remove_zombie_segments(tmp_path)
        assert sweep.segments == (str(zombie[0]),) and sweep.bytes_freed == 4096
        assert not any(path.exists() for path in (*zombie, orphan_lock))
        assert all(path.exists() for path in (*living, *just_created, *port))
        assert "removed 1 Fast DDS shared-memory segment(s) (0 MiB)" in sweep.describe()
        assert remove_zombie_segments(tmp_path).segments == ()
    # The lock released without the segment removed: its process ended without deleting its participant.
    assert remove_zombie_segments(tmp_path).segments == (str(living[0]),)
