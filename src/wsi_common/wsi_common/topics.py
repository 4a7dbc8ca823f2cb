"""The topics and actions of a WSI scanner, each named once with its message type and QoS. The nodes that
publish, subscribe, serve or call them and the recorder (wsi.recorder_node) take them from here.

Names are relative to the scanner's namespace, except /diagnostics (the ROS diagnostics topic).

    TILES.publisher(node)                         # node.create_publisher(Tile, "tiles", TILE_QOS)
    TILES.subscription(node, on_tile)
    SCAN_SLIDE.server(node, execute)              # ActionServer(node, ScanSlide, "scan_slide", ...)
"""
from dataclasses import dataclass

from action_msgs.msg import GoalStatusArray
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionClient, ActionServer
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_action_status_default
from sensor_msgs.msg import CameraInfo, Image

from wsi_common.qos import EVENT_QOS, LATCHED_QOS, LIVE_IMAGE_QOS, TILE_QOS
from wsi_interfaces.action import ExportSlide, MoveStage, ScanSlide
from wsi_interfaces.msg import FocusEstimate, MosaicStatus, ScanPlan, ScanStatus, StageState, Tile

# rclpy's defaults for an action's feedback and status topics, which `ros2 action` and other clients expect.
ACTION_FEEDBACK_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.VOLATILE)
ACTION_STATUS_QOS = qos_profile_action_status_default


def type_name(message_type: type) -> str:
    """`package/msg/Name` (an action's topic types: `package/action/Name_FeedbackMessage`), as the ROS graph
    and a bag name a rosidl Python class."""
    package, kind = message_type.__module__.split(".")[:2]
    return f"{package}/{kind}/{message_type.__name__}"


@dataclass(frozen=True)
class Topic:
    name: str
    message_type: type              # the rosidl Python class
    qos: QoSProfile

    @property
    def type_name(self) -> str:
        return type_name(self.message_type)

    def publisher(self, node, **options):
        return node.create_publisher(self.message_type, self.name, self.qos, **options)

    def subscription(self, node, callback, **options):
        return node.create_subscription(self.message_type, self.name, callback, self.qos, **options)


@dataclass(frozen=True)
class Action:
    name: str
    action_type: type

    @property
    def feedback_topic(self) -> Topic:
        return Topic(f"{self.name}/_action/feedback", self.action_type.Impl.FeedbackMessage, ACTION_FEEDBACK_QOS)

    @property
    def status_topic(self) -> Topic:
        return Topic(f"{self.name}/_action/status", GoalStatusArray, ACTION_STATUS_QOS)

    def server(self, node, execute_callback, **options) -> ActionServer:
        return ActionServer(node, self.action_type, self.name, execute_callback=execute_callback,
                            feedback_pub_qos_profile=ACTION_FEEDBACK_QOS, status_pub_qos_profile=ACTION_STATUS_QOS,
                            **options)

    def client(self, node, **options) -> ActionClient:
        return ActionClient(node, self.action_type, self.name, feedback_sub_qos_profile=ACTION_FEEDBACK_QOS,
                            status_sub_qos_profile=ACTION_STATUS_QOS, **options)


TILES = Topic("tiles", Tile, TILE_QOS)
SCAN_PLAN = Topic("scan/plan", ScanPlan, LATCHED_QOS)
SCAN_STATUS = Topic("scan/status", ScanStatus, EVENT_QOS)
FOCUS_ESTIMATES = Topic("focus_estimates", FocusEstimate, EVENT_QOS)
MOSAIC_STATUS = Topic("mosaic/status", MosaicStatus, LATCHED_QOS)
STAGE_STATE = Topic("stage/state", StageState, EVENT_QOS)
CAMERA_IMAGE = Topic("camera/image", Image, EVENT_QOS)
CAMERA_INFO = Topic("camera/camera_info", CameraInfo, EVENT_QOS)
CAMERA_LIVE = Topic("camera/live", Image, LIVE_IMAGE_QOS)
DIAGNOSTICS = Topic("/diagnostics", DiagnosticArray, EVENT_QOS)

SCAN_SLIDE = Action("scan_slide", ScanSlide)
EXPORT_SLIDE = Action("export_slide", ExportSlide)
MOVE_STAGE = Action("stage/move", MoveStage)

ACTIONS = (SCAN_SLIDE, EXPORT_SLIDE, MOVE_STAGE)
TOPICS = (TILES, SCAN_PLAN, SCAN_STATUS, FOCUS_ESTIMATES, MOSAIC_STATUS, STAGE_STATE, CAMERA_IMAGE, CAMERA_INFO,
          CAMERA_LIVE, DIAGNOSTICS,
          *(topic for action in ACTIONS for topic in (action.feedback_topic, action.status_topic)))
TOPICS_BY_NAME = {topic.name: topic for topic in TOPICS}
