"""Node descriptions and a supervisor that runs them as processes without ros2 launch.

A `NodeSpec` says what a launch description says about a node (package, executable, name,
namespace, parameters, remappings) plus the Python module that runs it, so the same description
serves `ros2 launch` on a full ROS 2 install and `wsi launch` where launch_ros is not installable.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from wsi_common.fastdds_shm import remove_zombie_segments
from wsi_common.ros_env import node_environment


@dataclass(frozen=True)
class NodeSpec:
    name: str
    package: str
    executable: str                       # console script installed under lib/<package>
    module: str                           # python -m <module> runs the same node
    parameters: dict = field(default_factory=dict)
    # YAML parameters files applied before `parameters`, which override what they set.
    parameter_files: tuple[str, ...] = ()
    remappings: tuple = ()                # ((from, to), ...)
    namespace: str = ""
    # False for a process that hosts several nodes: renaming would give all of them this name.
    single_node: bool = True
    # The managed (lifecycle) nodes the process hosts, in the order a bring-up manager activates them.
    lifecycle_nodes: tuple[str, ...] = ()
    # Whether the process publishes camera images (or sends them in requests): only such a process needs
    # the large shared-memory segment (wsi_common.ros_env.fastdds_profile_path).
    sends_images: bool = False

    def ros_arguments(self, params_file: Path) -> list[str]:
        args = ["--ros-args"]
        if self.single_node:
            args += ["-r", f"__node:={self.name}"]
        for path in self.parameter_files:
            args += ["--params-file", path]
        args += ["--params-file", str(params_file)]
        if self.namespace:
            args += ["-r", f"__ns:=/{self.namespace.strip('/')}"]
        for source, target in self.remappings:
            args += ["-r", f"{source}:={target}"]
        return args


def write_params_file(spec: NodeSpec, directory: Path) -> Path:
    """Parameters as a ROS 2 params file (JSON is valid YAML, and quotes strings unambiguously)."""
    path = directory / f"{spec.namespace.strip('/').replace('/', '_')}_{spec.name}.params.yaml".lstrip("_")
    path.write_text(json.dumps({"/**": {"ros__parameters": spec.parameters}}, indent=1))
    return path


class NodeDiedError(RuntimeError):
    """A supervised node process exited while the graph was supposed to be running."""


class Supervisor:
    """Start node processes, prefix their output per node, notice deaths, stop them cleanly."""

    def __init__(self, specs: list[NodeSpec], env: dict | None = None, log: TextIO = sys.stdout,
                 large_images: bool = True):
        names = [(s.namespace, s.name) for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique within a namespace: {names}")
        self.specs = specs
        self._env = {sends: node_environment(env, large_images=large_images, sends_images=sends)
                     for sends in (False, True)}
        self._log = log
        self._log_lock = threading.Lock()
        self._params_dir = tempfile.TemporaryDirectory(prefix="wsi-params-")
        self.processes: dict[str, subprocess.Popen] = {}
        self._readers: list[threading.Thread] = []
        self._stopping = False

    def label(self, spec: NodeSpec) -> str:
        return f"{spec.namespace.strip('/')}/{spec.name}".lstrip("/")

    def start(self) -> "Supervisor":
        self._remove_zombie_segments()
        for spec in self.specs:
            params_file = write_params_file(spec, Path(self._params_dir.name))
            command = [sys.executable, "-m", "wsi_common.run_node", spec.module,
                       *spec.ros_arguments(params_file)]
            process = subprocess.Popen(command, env=self._env[spec.sends_images], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, text=True, errors="replace")
            label = self.label(spec)
            self.processes[label] = process
            reader = threading.Thread(target=self._forward, args=(label, process.stdout), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _forward(self, label: str, stream) -> None:
        for line in stream:
            with self._log_lock:
                self._log.write(f"[{label}] {line}")
                self._log.flush()

    def dead(self) -> dict[str, int]:
        """Nodes that have exited, with their exit codes."""
        return {label: p.returncode for label, p in self.processes.items() if p.poll() is not None}

    def check_alive(self) -> None:
        dead = self.dead()
        if dead and not self._stopping:
            details = ", ".join(f"{label} (exit code {code})" for label, code in dead.items())
            raise NodeDiedError(f"node process died: {details}")

    def stop(self, timeout_s: float = 10.0) -> dict[str, int]:
        """SIGINT every node, wait, SIGKILL stragglers; return the exit codes."""
        self._stopping = True
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for reader in self._readers:
            reader.join(timeout=2.0)
        self._params_dir.cleanup()
        self._remove_zombie_segments()
        return {label: p.returncode for label, p in self.processes.items()}

    def _remove_zombie_segments(self) -> None:
        """Free the shared memory of DDS participants whose processes were killed: before the nodes start, what an
        earlier run left (a node killed at its stop deadline, by the out-of-memory killer, by launch's SIGKILL), and
        after they stop, what a straggler killed above left. It would stay in the machine's memory until reboot."""
        sweep = remove_zombie_segments()
        if sweep.segments:
            with self._log_lock:
                self._log.write(f"wsi: {sweep.describe()}\n")
                self._log.flush()

    def __enter__(self) -> "Supervisor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
