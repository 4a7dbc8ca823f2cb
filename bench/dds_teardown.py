"""Benchmark: how often a process hangs when the graph's processes end their ROS use at once.

    .venv/bin/python bench/dds_teardown.py [--processes 6] [--rounds 100] [--teardowns end_ros,rclpy]

Each round starts `--processes` processes, each a node publishing 1 MB messages at 20 Hz on one topic and
subscribed to it (so every process discovers and talks to every other), lets them run 0.5-2 s, then tells
all of them to stop at once (closing their stdin), as a Ctrl-C of `ros2 launch` does. A process stops with
`wsi_common.node_main.end_ros` or with rclpy's `Node.destroy_node` and `rclpy.try_shutdown`, which meet Fast DDS
3.2.3's teardown livelock (wsi_common.fastdds_teardown). One not exited 10 s later is counted as hung, killed,
and its shared memory removed. Prints a table and writes bench/results/dds_teardown.json.
"""
import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from wsi_common.fastdds_shm import remove_zombie_segments
from wsi_common.ros_env import node_environment

RESULTS = Path(__file__).resolve().parent / "results"
HUNG_AFTER_S = 10.0
TEARDOWNS = ("end_ros", "rclpy")


def worker(teardown: str) -> None:
    import rclpy
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.signals import SignalHandlerOptions
    from std_msgs.msg import UInt8MultiArray

    from wsi_common.node_main import end_ros

    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = Node("teardown_bench")
    qos = QoSProfile(depth=16, reliability=ReliabilityPolicy.RELIABLE)
    publisher = node.create_publisher(UInt8MultiArray, "/teardown_bench", qos)
    node.create_subscription(UInt8MultiArray, "/teardown_bench", lambda message: None, qos)
    message = UInt8MultiArray(data=bytes(1 << 20))
    node.create_timer(0.05, lambda: publisher.publish(message))
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    while not stop.is_set():
        rclpy.spin_once(node, timeout_sec=0.05)
    started = time.monotonic()
    if teardown == "end_ros":
        end_ros([node], "teardown_bench")
    else:
        node.destroy_node()
        rclpy.try_shutdown()
    print(json.dumps({"teardown_s": time.monotonic() - started}), flush=True)


def run_round(teardown: str, processes: int, rng: random.Random) -> dict:
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", teardown], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True,
                                env=node_environment(sends_images=index % 2 == 0))
               for index in range(processes)]
    for process in workers:
        assert process.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0.5, 2.0))
    for process in workers:
        process.stdin.close()
    deadline = time.monotonic() + HUNG_AFTER_S
    hung, teardown_s = 0, []
    for process in workers:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
            teardown_s.append(json.loads(process.stdout.read().splitlines()[-1])["teardown_s"])
        except subprocess.TimeoutExpired:
            hung += 1
            process.kill()
            process.wait()
            remove_zombie_segments()    # the killed participant's; other participants' on this machine stay
    return {"hung": hung, "teardown_s": teardown_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--teardowns", default=",".join(TEARDOWNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "dds_teardown.json")
    args = parser.parse_args()
    rows = []
    for teardown in args.teardowns.split(","):
        rng = random.Random(args.seed)
        rounds = [run_round(teardown, args.processes, rng) for _ in range(args.rounds)]
        seconds = [s for result in rounds for s in result["teardown_s"]]
        rows.append({"teardown": teardown, "processes": args.processes, "rounds": args.rounds,
                     "teardowns": args.processes * args.rounds, "hung": sum(r["hung"] for r in rounds),
                     "teardown_s_median": statistics.median(seconds), "teardown_s_max": max(seconds)})
    print(f"{'teardown':<10}{'teardowns':>10}{'hung':>6}{'median s':>10}{'max s':>8}")
    for row in rows:
        print(f"{row['teardown']:<10}{row['teardowns']:>10}{row['hung']:>6}"
              f"{row['teardown_s_median']:>10.3f}{row['teardown_s_max']:>8.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rows": rows, "hung_after_s": HUNG_AFTER_S}, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        sys.exit(main())
