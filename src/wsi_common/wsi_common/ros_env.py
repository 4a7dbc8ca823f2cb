"""Environment for WSI node processes: middleware and the large-image Fast DDS profile."""
import os
import signal
from importlib import resources
from pathlib import Path

RMW_IMPLEMENTATION = "rmw_fastrtps_cpp"


def fastdds_profile_path(sends_images: bool = True) -> Path:
    """Path of a shipped Fast DDS profile: for a process that sends camera images, a large shared-memory
    segment that carries each whole; for one that only receives them, a small one (a participant's
    segment holds what it sends)."""
    name = "fastdds_large_images.xml" if sends_images else "fastdds_image_readers.xml"
    return Path(str(resources.files("wsi_common") / "config" / name))


def node_environment_defaults(sends_images: bool = True, large_images: bool = True) -> dict[str, str]:
    """What a node process's environment gets where the user has not set it (the launch file sets the same).

    FASTDDS_DEFAULT_PROFILES_FILE: the shipped profile for a sender or a receiver of images (`large_images`
    False: Fast DDS's defaults). MALLOC_ARENA_MAX: glibc gives threads that allocate at once arenas of their
    own, up to 8 per core, and a tile-sized block freed in one arena is not reused by another; with two
    arenas the graph's memory at the pipeline bench's 8 tiles/s fell from 1819 to 1654 MB PSS at the same
    CPU time.
    """
    defaults = {"MALLOC_ARENA_MAX": "2"}
    if large_images:
        defaults["FASTDDS_DEFAULT_PROFILES_FILE"] = str(fastdds_profile_path(sends_images))
    return defaults


def node_environment(base: dict | None = None, large_images: bool = True, sends_images: bool = True) -> dict:
    """Environment for a node process: `base` (default: this process's) plus node_environment_defaults.
    A profile file the user already selected is kept; so is an explicit RMW_IMPLEMENTATION.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("RMW_IMPLEMENTATION", RMW_IMPLEMENTATION)
    for name, value in node_environment_defaults(sends_images, large_images).items():
        env.setdefault(name, value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def interruptible() -> None:
    """`preexec_fn` for a child that must see Ctrl-C as a terminal user's process does: a runner
    started in the background (nohup, `make test &`) passes SIGINT on as ignored, and Python then
    never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
