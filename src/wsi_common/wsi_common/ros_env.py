"""Environment for WSI node processes: middleware and the large-image Fast DDS profile."""
import os
import signal
from importlib import resources
from pathlib import Path

RMW_IMPLEMENTATION = "rmw_fastrtps_cpp"


def fastdds_profile_path() -> Path:
    """Path of the shipped Fast DDS profile with a large shared-memory segment for big images."""
    return Path(str(resources.files("wsi_common") / "config" / "fastdds_large_images.xml"))


def node_environment(base: dict | None = None, large_images: bool = True) -> dict:
    """Environment for a node process: `base` (default: this process's) plus the Fast DDS settings.

    A profile file the user already selected is kept; so is an explicit RMW_IMPLEMENTATION.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("RMW_IMPLEMENTATION", RMW_IMPLEMENTATION)
    if large_images:
        env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(fastdds_profile_path()))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def interruptible() -> None:
    """`preexec_fn` for a child that must see Ctrl-C as a terminal user's process does: a runner
    started in the background (nohup, `make test &`) passes SIGINT on as ignored, and Python then
    never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
