"""Publish synthetic tiles or receive tiles and report what arrived: transport checks and benchmarks.

    python -m wsi.tile_probe send --size 2048 --duration 10 [--rate 0]
    python -m wsi.tile_probe receive --duration 12 [--count N] [--idle-timeout 3]

`receive` prints one JSON object: count, images/s, MB/s, latency percentiles (header stamp to
arrival, both on this machine's clock), and for every tile its sequence, index and a CRC32 of the
pixels, so a sender's tiles can be checked bit for bit.
"""
import argparse
import json
import sys
import time
import zlib

import numpy as np
import rclpy
from rclpy._rclpy_pybind11 import RCLError
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from wsi_common.image import array_to_image, image_to_array
from wsi_common.node_main import end_ros
from wsi_common.topics import TILES
from wsi_interfaces.msg import Tile


def synthetic_tile(size_px: int, sequence: int) -> np.ndarray:
    """A reproducible RGB test pattern that differs per sequence number."""
    rng = np.random.default_rng(sequence)
    return rng.integers(0, 256, size=(size_px, size_px, 3), dtype=np.uint8)


def tile_crc(pixels: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(pixels).data)


def fill_tile(msg: Tile, pixels: np.ndarray, sequence: int, node: Node) -> Tile:
    array_to_image(pixels, "rgb8", msg.image)
    msg.scan_id = "probe"
    msg.sequence = sequence
    msg.index.row, msg.index.col = divmod(sequence, 16)
    msg.pixel_size_um = 0.25
    msg.ground_truth_defocus_um = float("nan")
    msg.header.stamp = node.get_clock().now().to_msg()
    return msg


def send(args) -> dict:
    node = Node("tile_probe_sender")
    publisher = TILES.publisher(node)
    deadline = time.monotonic() + args.wait_for_subscriber
    while publisher.get_subscription_count() < args.subscribers:
        if time.monotonic() > deadline:
            raise SystemExit(f"no subscriber on {TILES.name!r} after {args.wait_for_subscriber} s")
        time.sleep(0.05)
    # A few distinct patterns, reused, so that generating pixels does not limit the send rate.
    patterns = [synthetic_tile(args.size, i) for i in range(args.patterns)]
    msg = Tile()
    sent, refused, crcs = 0, 0, []
    period = 1.0 / args.rate if args.rate > 0 else 0.0
    started = time.monotonic()
    while time.monotonic() - started < args.duration and (args.count == 0 or sent < args.count):
        pixels = patterns[sent % len(patterns)]
        try:
            publisher.publish(fill_tile(msg, pixels, sent, node))
        except RCLError:
            # The middleware refused the sample (its shared-memory pool momentarily full under load):
            # for a transport measurement that is a lost tile, which the receiver counts as a gap.
            refused += 1
        crcs.append(tile_crc(pixels))
        sent += 1
        if period:
            time.sleep(max(0.0, started + sent * period - time.monotonic()))
    publisher.wait_for_all_acked(rclpy.duration.Duration(seconds=args.ack_timeout))
    elapsed = time.monotonic() - started
    end_ros([node], "tile_probe send")
    return {"sent": sent, "refused": refused, "seconds": elapsed, "crc32": crcs}


def receive(args) -> dict:
    node = Node("tile_probe_receiver")
    arrivals = []

    def on_tile(msg: Tile) -> None:
        now_ns = node.get_clock().now().nanoseconds
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        pixels = image_to_array(msg.image)
        arrivals.append({"sequence": msg.sequence, "row": msg.index.row, "col": msg.index.col,
                         "encoding": msg.image.encoding, "shape": list(pixels.shape),
                         "crc32": tile_crc(pixels) if args.checksums else None,
                         "latency_ms": (now_ns - stamp_ns) / 1e6, "bytes": len(msg.image.data),
                         "arrived_s": time.monotonic()})

    TILES.subscription(node, on_tile)
    print(json.dumps({"ready": True}), flush=True)
    started = time.monotonic()
    while time.monotonic() - started < args.duration and (args.count == 0 or len(arrivals) < args.count):
        rclpy.spin_once(node, timeout_sec=0.05)
        if arrivals and time.monotonic() - arrivals[-1]["arrived_s"] > args.idle_timeout:
            break
    end_ros([node], "tile_probe receive")
    return summarize(arrivals, per_tile=args.checksums)


def summarize(arrivals: list[dict], per_tile: bool) -> dict:
    summary = {"count": len(arrivals)}
    if per_tile:
        summary["tiles"] = [{k: a[k] for k in ("sequence", "row", "col", "encoding", "shape", "crc32")}
                            for a in arrivals]
    if len(arrivals) >= 2:
        span = arrivals[-1]["arrived_s"] - arrivals[0]["arrived_s"]
        summary["images_per_s"] = (len(arrivals) - 1) / span if span > 0 else float("inf")
        summary["mb_per_s"] = summary["images_per_s"] * arrivals[0]["bytes"] / 1e6
    if arrivals:
        latencies = np.array([a["latency_ms"] for a in arrivals])
        summary["latency_ms_median"] = float(np.median(latencies))
        summary["latency_ms_p95"] = float(np.percentile(latencies, 95))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsi.tile_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    sender = modes.add_parser("send")
    sender.add_argument("--size", type=int, default=2048, help="tile edge, px")
    sender.add_argument("--duration", type=float, default=10.0, help="seconds to send for")
    sender.add_argument("--count", type=int, default=0, help="stop after this many tiles (0: no limit)")
    sender.add_argument("--rate", type=float, default=0.0, help="tiles per second (0: as fast as possible)")
    sender.add_argument("--patterns", type=int, default=4, help="distinct pixel patterns to cycle through")
    sender.add_argument("--subscribers", type=int, default=1, help="wait for this many subscribers")
    sender.add_argument("--wait-for-subscriber", type=float, default=30.0)
    sender.add_argument("--ack-timeout", type=float, default=10.0)
    sender.set_defaults(run=send)
    receiver = modes.add_parser("receive")
    receiver.add_argument("--duration", type=float, default=12.0, help="seconds to listen for")
    receiver.add_argument("--count", type=int, default=0, help="stop after this many tiles (0: no limit)")
    receiver.add_argument("--idle-timeout", type=float, default=3.0,
                          help="stop when no tile arrived for this many seconds after the first")
    receiver.add_argument("--checksums", action="store_true", help="CRC32 of every tile's pixels")
    receiver.set_defaults(run=receive)
    args = parser.parse_args(argv)
    # Without rclpy's handlers SIGTERM ends the probe at once wherever it is: rclpy's handler only shuts the
    # context down, which a probe stuck in the middleware never sees (one spun a core for 20 min of a CI run).
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    try:
        print(json.dumps(args.run(args)), flush=True)
    finally:
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
