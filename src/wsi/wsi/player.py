"""Replay a rosbag2 MCAP bag onto the ROS graph as raw CDR bytes (`wsi play`).

Messages go out in bag order with the recorded gaps divided by `rate` (rate 0: no gaps), each
topic with the QoS its recorded publishers offered, so a late-joining subscriber of a latched topic
(the scan plan) still gets it. The first message waits until the subscribers already running have
been discovered and matched: the others are volatile, and a message published before that is lost to
them. A damaged bag is replayed as far as it can be read, and the damage is reported.
"""
import time
from dataclasses import dataclass, field

from rclpy.duration import Duration
from rclpy.node import Node

from wsi.bag_format import BagError
from wsi.bag_reader import BagReader, DamagedBagError
from wsi.recorder_node import message_class, qos_from_bag
from wsi_common.qos import EVENT_QOS


# With --rate 0, each message waits this long at most for its acknowledgement before the next goes.
_ACK_PACE = Duration(seconds=1.0)
# Time a new participant takes to discover the ones already running: 0.25-2.9 s measured on a loaded
# 2-core machine (Fast DDS repeats its participant announcements every 3 s after the first few).
DISCOVERY_S = 4.0


class NoSubscriberError(TimeoutError):
    """Fewer subscribers than asked for appeared, or were matched, before the wait ended."""


@dataclass
class PlayReport:
    published: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)   # damage found in the bag
    interrupted: bool = False                             # stopped by Ctrl-C
    unacknowledged: list[str] = field(default_factory=list)   # topics whose last messages may be lost
    subscribers: dict[str, int] = field(default_factory=dict)  # matched per topic when the replay began

    @property
    def total(self) -> int:
        return sum(self.published.values())


def select_topics(reader: BagReader, wanted: list[str] | None) -> dict:
    available = reader.topics()
    if not available:
        raise BagError(f"bag {reader.path} holds no readable message")
    if not wanted:
        return available
    by_name = {name.lstrip("/"): topic for name, topic in available.items()}
    missing = [name for name in wanted if name.lstrip("/") not in by_name]
    if missing:
        raise BagError(f"topics {missing} are not in the bag {reader.path}; it has {sorted(available)}")
    return {by_name[name.lstrip("/")].name: by_name[name.lstrip("/")] for name in wanted}


def _wait_for_subscribers(publishers: dict, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        short = {topic: p.get_subscription_count() for topic, p in publishers.items()
                 if p.get_subscription_count() < count}
        if not short:
            return
        if time.monotonic() > deadline:
            raise NoSubscriberError(f"waited {timeout_s:g} s for {count} subscriber(s) on every replayed "
                                    f"topic; still short: {short}")
        time.sleep(0.05)


def _wait_for_discovered_subscribers(node: Node, publishers: dict, timeout_s: float) -> None:
    """Give discovery DISCOVERY_S (at most timeout_s) to find the subscribers already running, then wait
    until each one found is matched with its publisher; a subscriber whose QoS is incompatible with
    the recorded publishers' never is."""
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        unmatched = {topic: f"{publisher.get_subscription_count()} of {node.count_subscribers(topic)}"
                     for topic, publisher in publishers.items()
                     if publisher.get_subscription_count() < node.count_subscribers(topic)}
        if elapsed >= min(DISCOVERY_S, timeout_s) and not unmatched:
            return
        if elapsed > timeout_s:
            raise NoSubscriberError(f"waited {timeout_s:g} s for the subscribers on the graph to be matched; "
                                    f"matched only {unmatched} (a subscriber that asks for a QoS the recorded "
                                    f"publishers did not offer is never matched); --wait-for-subscribers 0 "
                                    f"replays without waiting")
        time.sleep(0.05)


def play(node: Node, bag_path, rate: float = 1.0, topics: list[str] | None = None, loop: bool = False,
         wait_for_subscribers: int | None = None, wait_timeout_s: float = 30.0,
         ack_timeout_s: float = 10.0) -> PlayReport:
    """Publish the bag's messages through publishers of `node`; return what was published.

    Before the first message, wait (at most wait_timeout_s) until every replayed topic is matched with
    wait_for_subscribers subscribers; None: with the subscribers discovery finds on the graph; 0: do not
    wait. rclpy must be initialised without its signal handlers (SignalHandlerOptions.NO): Ctrl-C then
    stops the replay with the context still valid, so the last messages can still be acknowledged."""
    if rate < 0:
        raise ValueError(f"rate {rate} is negative; expected a speed factor > 0, or 0 for no waiting")
    reader = BagReader(bag_path)
    selected = select_topics(reader, topics)
    report = PlayReport(published={name: 0 for name in selected})
    publishers = {name: node.create_publisher(message_class(topic.msgtype), name,
                                              qos_from_bag(topic.offered_qos, EVENT_QOS))
                  for name, topic in selected.items()}
    try:
        if wait_for_subscribers is None:
            _wait_for_discovered_subscribers(node, publishers, wait_timeout_s)
        else:
            _wait_for_subscribers(publishers, wait_for_subscribers, wait_timeout_s)
        report.subscribers = {topic: publisher.get_subscription_count() for topic, publisher in publishers.items()}
        started = time.monotonic()
        try:
            while True:
                _play_once(reader, set(selected), publishers, rate, report)
                if not loop:
                    break
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            report.seconds = time.monotonic() - started
            acked = Duration(seconds=ack_timeout_s)
            report.unacknowledged = [topic for topic, publisher in publishers.items()
                                     if not publisher.wait_for_all_acked(acked)]
    finally:
        for publisher in publishers.values():
            node.destroy_publisher(publisher)
    return report


def _play_once(reader: BagReader, topics: set[str], publishers: dict, rate: float, report: PlayReport) -> None:
    first_stamp_ns = None
    started = time.monotonic()
    try:
        for message in reader.messages(topics):
            if first_stamp_ns is None:
                first_stamp_ns = message.timestamp_ns
            if rate > 0:
                due = started + (message.timestamp_ns - first_stamp_ns) / 1e9 / rate
                time.sleep(max(0.0, due - time.monotonic()))
            publisher = publishers[message.topic]
            publisher.publish(message.data)
            report.published[message.topic] += 1
            if rate == 0:   # no faster than the subscribers take the messages in
                publisher.wait_for_all_acked(_ACK_PACE)
    except DamagedBagError as error:
        report.problems = error.problems
