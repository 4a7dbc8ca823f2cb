"""`recorder` node: record the scan's topics, as raw CDR bytes, into a rosbag2 MCAP bag.

    python -m wsi.recorder_node --ros-args -p bag_path:=out/bags/run1 [-p topics:="['tiles']"]

Each topic is subscribed once it appears on the graph, with its type taken from the graph and a
QoS that matches what the WSI publishers offer; the publishers' own QoS profiles are stored in the
bag, so a player (`wsi play`, `ros2 bag play`) offers the same reliability and durability. On
shutdown the bag is closed (index and metadata.yaml written); if the process is killed, every
message up to the last flush (`flush_period_s`) stays readable with `wsi play`.
"""
import importlib
import sys

from rclpy.duration import Duration
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, LivelinessPolicy, QoSProfile, ReliabilityPolicy
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

from wsi.bag_format import INFINITE_QOS_TIME, BagError
from wsi.bag_writer import BackgroundBagWriter, BagWriter
from wsi_common.node_main import NodeConfigurationError, spin_node
from wsi_common.params import declare_parameters
from wsi_common.qos import EVENT_QOS
from wsi_common.topics import (ACTION_FEEDBACK_QOS, ACTION_STATUS_QOS, ACTIONS, DIAGNOSTICS, FOCUS_ESTIMATES, SCAN_PLAN,
                               SCAN_STATUS, STAGE_STATE, TILES, TOPICS_BY_NAME)

RECORDED_TOPICS = (TILES, FOCUS_ESTIMATES, SCAN_PLAN, SCAN_STATUS, STAGE_STATE, DIAGNOSTICS,
                   *(topic for action in ACTIONS for topic in (action.feedback_topic, action.status_topic)))
DEFAULT_TOPICS = [topic.name for topic in RECORDED_TOPICS]
_MAX_FINITE_NS = INFINITE_QOS_TIME.sec * 1_000_000_000


def subscription_qos(topic: str) -> QoSProfile:
    """The profile the WSI publisher of `topic` (a name relative to the namespace) uses (wsi_common.topics); any
    action's status and feedback topics have rclpy's profiles, another topic EVENT_QOS."""
    if topic in TOPICS_BY_NAME:
        return TOPICS_BY_NAME[topic].qos
    if topic.endswith("/_action/status"):
        return ACTION_STATUS_QOS
    if topic.endswith("/_action/feedback"):
        return ACTION_FEEDBACK_QOS
    return EVENT_QOS


def compatible_qos(wanted: QoSProfile, offered: list[QoSProfile]) -> QoSProfile:
    """`wanted`, relaxed where a publisher offers less (best effort, volatile), so that every
    publisher matches: the rule rosbag2's recorder applies."""
    if not offered:
        return wanted
    reliability, durability = wanted.reliability, wanted.durability
    if any(p.reliability == ReliabilityPolicy.BEST_EFFORT for p in offered):
        reliability = ReliabilityPolicy.BEST_EFFORT
    if any(p.durability == DurabilityPolicy.VOLATILE for p in offered):
        durability = DurabilityPolicy.VOLATILE
    return QoSProfile(history=wanted.history, depth=wanted.depth, reliability=reliability,
                      durability=durability)


def with_history_of(offered: QoSProfile, known: QoSProfile) -> QoSProfile:
    """`offered` with the history and depth of `known`: DDS discovery does not carry a publisher's
    history, so the graph reports depth 0; a replay with depth 0 or 1 would drop reliable messages."""
    if offered.history in (HistoryPolicy.KEEP_LAST, HistoryPolicy.KEEP_ALL) and offered.depth > 0:
        return offered
    return QoSProfile(history=known.history, depth=known.depth, reliability=offered.reliability,
                      durability=offered.durability, deadline=offered.deadline, lifespan=offered.lifespan,
                      liveliness=offered.liveliness,
                      liveliness_lease_duration=offered.liveliness_lease_duration)


def _bag_time(duration: Duration) -> QosTime:
    nanoseconds = duration.nanoseconds
    if nanoseconds <= 0 or nanoseconds >= _MAX_FINITE_NS:   # 0: unspecified; both mean "no limit"
        return INFINITE_QOS_TIME
    return QosTime(*divmod(nanoseconds, 1_000_000_000))


def qos_to_bag(profile: QoSProfile) -> Qos:
    """An rclpy QoS profile as rosbag2 stores it in a bag's offered_qos_profiles."""
    return Qos(QosHistory[profile.history.name], profile.depth, QosReliability[profile.reliability.name],
               QosDurability[profile.durability.name], _bag_time(profile.deadline),
               _bag_time(profile.lifespan), QosLiveliness[profile.liveliness.name],
               _bag_time(profile.liveliness_lease_duration), profile.avoid_ros_namespace_conventions)


def qos_from_bag(offered: list[Qos], default: QoSProfile) -> QoSProfile:
    """The profile to replay a topic with: reliable / transient-local only if every recorded
    publisher offered it (rosbag2's rule); the deepest recorded history, or `default`'s depth when
    the bag does not know it (depth 0)."""
    if not offered:
        return default
    reliable = all(q.reliability == QosReliability.RELIABLE for q in offered)
    transient_local = all(q.durability == QosDurability.TRANSIENT_LOCAL for q in offered)
    depth = max(q.depth for q in offered)
    reliability = ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
    durability = DurabilityPolicy.TRANSIENT_LOCAL if transient_local else DurabilityPolicy.VOLATILE
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth if depth > 0 else default.depth,
                      reliability=reliability, durability=durability, liveliness=LivelinessPolicy.AUTOMATIC)


def message_class(type_name: str):
    """The Python class of a ROS type name: `pkg/msg/Name`, or an action's topic type
    `pkg/action/Name_FeedbackMessage` (also `_Goal`, `_Result`, `_Feedback`)."""
    try:
        package, kind, name = type_name.split("/")
        module = importlib.import_module(f"{package}.{kind}")
    except (ValueError, ImportError) as error:
        raise BagError(f"cannot load the message type {type_name!r} ({error}); "
                       f"is its package installed?") from None
    if hasattr(module, name):
        return getattr(module, name)
    action_name, _, part = name.rpartition("_")
    action = getattr(module, action_name, None)
    found = getattr(action, part, None) or getattr(getattr(action, "Impl", None), part, None)
    if found is None:
        raise BagError(f"the package {package} has no type {type_name!r}")
    return found


class RecorderNode(Node):
    PARAMETERS = {
        "bag_path": ("", "directory of the bag to write; it must not exist yet (bags are never overwritten)"),
        "topics": (DEFAULT_TOPICS, "topics to record; relative names are in the node's namespace"),
        "discovery_period_s": (0.5, "how often to look for recorded topics that appeared on the graph, s"),
        "flush_period_s": (1.0, "buffered messages are put on disk at least this often, s (a killed "
                                "recorder loses at most this much)"),
        "max_queue_mb": (1024, "messages received but not yet written may use this much memory, MB; "
                               "beyond it messages are dropped and counted"),
    }

    def __init__(self):
        super().__init__("recorder")
        params = declare_parameters(self, self.PARAMETERS)
        if not params["bag_path"]:
            raise NodeConfigurationError("parameter bag_path is empty; give the directory of the bag to write")
        if params["discovery_period_s"] <= 0 or params["flush_period_s"] <= 0:
            raise NodeConfigurationError("discovery_period_s and flush_period_s must be positive, got "
                                         f"{params['discovery_period_s']} and {params['flush_period_s']}")
        try:
            self._bag = BackgroundBagWriter(BagWriter(params["bag_path"]), params["max_queue_mb"] * 1_000_000)
        except (BagError, OSError) as error:
            raise NodeConfigurationError(str(error)) from None
        # fully qualified name -> name as configured (the relative name picks the WSI QoS)
        self._pending = {self.resolve_topic_name(t): t for t in params["topics"]}
        self._recording = {}
        self._refused = set()
        self._lost: dict[str, int] = {}
        self.create_timer(params["discovery_period_s"], self._discover)
        self.create_timer(params["flush_period_s"], self._flush)
        self.get_logger().info(f"recording {len(self._pending)} topics into {params['bag_path']}")
        self._discover()

    def _discover(self) -> None:
        graph = dict(self.get_topic_names_and_types())
        for topic, configured in list(self._pending.items()):
            if topic not in graph or topic in self._refused:
                continue
            type_name = graph[topic][0]
            try:
                msg_class = message_class(type_name)
                publishers = [info.qos_profile for info in self.get_publishers_info_by_topic(topic)]
                wanted = subscription_qos(configured)
                qos = compatible_qos(wanted, publishers)
                offered = [with_history_of(p, qos) for p in publishers] or [qos]
                self._bag.add_topic(topic, type_name, [qos_to_bag(p) for p in offered])
            except BagError as error:
                self._refused.add(topic)
                self.get_logger().error(f"not recording {topic}: {error}")
                continue
            events = SubscriptionEventCallbacks(message_lost=self._lost_counter_for(topic))
            self._recording[topic] = self.create_subscription(
                msg_class, topic, self._writer_for(topic), qos, raw=True, event_callbacks=events)
            del self._pending[topic]
            self.get_logger().info(f"recording {topic} ({type_name}, {qos.reliability.name.lower()}, "
                                   f"{qos.durability.name.lower()}, depth {qos.depth})")

    def _flush(self) -> None:
        try:
            self._bag.flush()
        except BagError as error:
            self.get_logger().error(str(error), throttle_duration_sec=5.0)

    def _writer_for(self, topic: str):
        def write(data: bytes) -> None:
            try:
                if not self._bag.write(topic, self.get_clock().now().nanoseconds, data):
                    self.get_logger().warning(f"queue full: a message on {topic} was dropped "
                                              f"({self._bag.dropped[topic]} so far)", throttle_duration_sec=1.0)
            except BagError as error:
                self.get_logger().error(str(error), throttle_duration_sec=5.0)
        return write

    def _lost_counter_for(self, topic: str):
        def count(info) -> None:
            self._lost[topic] = self._lost.get(topic, 0) + info.total_count_change
            self.get_logger().warning(f"{info.total_count_change} messages on {topic} were lost before "
                                      f"reaching the recorder ({self._lost[topic]} so far)")
        return count

    def destroy_node(self) -> None:
        for subscription in self._recording.values():
            self.destroy_subscription(subscription)
        try:
            self._bag.close()
        except BagError as error:
            self.get_logger().error(str(error))
        counts = ", ".join(f"{topic}: {count}" for topic, count in self._bag.counts.items()) or "no topics"
        lost = {**self._lost, **{t: self._lost.get(t, 0) + n for t, n in self._bag.dropped.items()}}
        # Printed, not logged: at shutdown the ROS context is already gone, and this line is the
        # record of what the bag holds.
        print(f"[recorder] bag {self._bag.bag.path} closed ({counts}); lost or dropped: {lost or 'none'}; "
              f"peak write queue {self._bag.peak_queued_bytes / 1e6:.0f} MB", file=sys.stderr, flush=True)
        super().destroy_node()


def main(args=None) -> None:
    spin_node(RecorderNode, args)


if __name__ == "__main__":
    main()
