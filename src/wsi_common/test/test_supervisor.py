"""The supervisor gives each node process the environment its spec asks for."""
import io
import os
import time

from wsi_common.ros_env import fastdds_profile_path
from wsi_common.supervisor import NodeSpec, Supervisor

PRINT_PROFILE = ("import os\n"
                 "print('profile', os.environ['FASTDDS_DEFAULT_PROFILES_FILE'], os.environ['MALLOC_ARENA_MAX'])\n")


def test_only_a_process_that_sends_images_gets_the_large_segment(tmp_path):
    (tmp_path / "print_profile.py").write_text(PRINT_PROFILE)
    env = {name: value for name, value in os.environ.items()
           if name not in ("FASTDDS_DEFAULT_PROFILES_FILE", "MALLOC_ARENA_MAX")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    specs = [NodeSpec(name=name, package="p", executable="e", module="print_profile", sends_images=sends)
             for name, sends in (("camera", True), ("consumer", False))]
    log = io.StringIO()
    supervisor = Supervisor(specs, env=env, log=log).start()
    deadline = time.monotonic() + 60
    while len(supervisor.dead()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert supervisor.stop() == {"camera": 0, "consumer": 0}
    assert f"[camera] profile {fastdds_profile_path(sends_images=True)} 2" in log.getvalue()
    assert f"[consumer] profile {fastdds_profile_path(sends_images=False)} 2" in log.getvalue()
