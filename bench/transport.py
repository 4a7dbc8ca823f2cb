"""Benchmark: 2048x2048 rgb8 Tile messages between two processes, default Fast DDS vs our profile.

    .venv/bin/python bench/transport.py [--duration 10] [--size 2048]

For each Fast DDS configuration, two runs of `--duration` seconds each: as fast as the sender can
publish (throughput), and at 10 tiles/s (latency at a scanner-like rate). Prints a table and writes
bench/results/transport.json.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from wsi_common.ros_env import fastdds_profile_path, node_environment

RESULTS = Path(__file__).resolve().parent / "results"


def probe_environment(use_profile: bool, domain_id: int) -> dict:
    env = dict(os.environ)
    env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    env = node_environment(env, large_images=use_profile)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    return env


def last_json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def run_case(use_profile: bool, rate_hz: float, duration_s: float, size_px: int, domain_id: int) -> dict:
    env = probe_environment(use_profile, domain_id)
    probe = [sys.executable, "-m", "wsi.tile_probe"]
    receiver = subprocess.Popen([*probe, "receive", "--duration", str(duration_s + 15)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sender = subprocess.run([*probe, "send", "--size", str(size_px), "--duration", str(duration_s),
                             "--rate", str(rate_hz)], env=env, capture_output=True, text=True)
    if sender.returncode != 0:
        receiver.kill()
        raise SystemExit(f"tile sender failed (exit {sender.returncode}):\n{sender.stderr}")
    received_text, _ = receiver.communicate(timeout=duration_s + 60)
    sent = last_json_line(sender.stdout)
    received = last_json_line(received_text)
    return {
        "profile": "wsi_large_images" if use_profile else "default",
        "mode": f"{rate_hz:g} Hz" if rate_hz else "max rate",
        "sent": sent["sent"], "refused_by_middleware": sent["refused"], "received": received["count"],
        "images_per_s": received.get("images_per_s", 0.0), "mb_per_s": received.get("mb_per_s", 0.0),
        "latency_ms_median": received.get("latency_ms_median"),
        "latency_ms_p95": received.get("latency_ms_p95"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--size", type=int, default=2048, help="tile edge, px")
    parser.add_argument("--domain-id", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", 61)),
                        help="ROS_DOMAIN_ID for the probe processes")
    parser.add_argument("--output", type=Path, default=RESULTS / "transport.json", help="JSON results file")
    args = parser.parse_args()
    rows = [run_case(use_profile, rate, args.duration, args.size, args.domain_id)
            for use_profile in (False, True) for rate in (0.0, 10.0)]
    header = f"{'profile':<18}{'mode':<10}{'sent':>6}{'recv':>6}{'img/s':>9}{'MB/s':>9}{'lat p50 ms':>12}{'lat p95 ms':>12}"
    print(f"Tile transport, {args.size}x{args.size} rgb8 ({args.size * args.size * 3 / 1e6:.1f} MB), "
          f"{args.duration:g} s per run, 2 processes")
    print(header)
    for r in rows:
        print(f"{r['profile']:<18}{r['mode']:<10}{r['sent']:>6}{r['received']:>6}{r['images_per_s']:>9.1f}"
              f"{r['mb_per_s']:>9.0f}{r['latency_ms_median']:>12.1f}{r['latency_ms_p95']:>12.1f}")
    output = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"size_px": args.size, "duration_s": args.duration,
                                  "profile_file": str(fastdds_profile_path()), "runs": rows}, indent=2))
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
