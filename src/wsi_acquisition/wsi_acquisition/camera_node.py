"""Camera node: sensor_msgs/Image + CameraInfo on trigger (std_srvs/Trigger) and as a live stream."""
import threading

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rcl_interfaces.msg import SetParametersResult
from sensor_msgs.msg import CameraInfo, Image
from std_srvs.srv import Trigger

from wsi_acquisition.hardware import CameraError, snap
from wsi_common.image import array_to_image
from wsi_common.params import declare_parameters
from wsi_common.topics import CAMERA_IMAGE, CAMERA_INFO, CAMERA_LIVE

PARAMETERS = {
    "exposure_ms": (8.0, "exposure time, ms"),
    "gain": (1.0, "analogue gain, linear"),
    "live_rate_hz": (0.0, "live stream rate on camera/live; 0 = off (frames only on camera/trigger)"),
    "frame_id": ("camera_optical_frame", "frame_id of the published images"),
}


class CameraNode(Node):
    """Shares the hardware with the scan: the live stream pauses while `hardware_lock` is held."""

    def __init__(self, backend, hardware_lock: threading.Lock):
        super().__init__("camera")
        self.params = declare_parameters(self, PARAMETERS)
        self.backend = backend
        self._lock = hardware_lock
        self.add_on_set_parameters_callback(self._on_parameters)
        self._image_pub = CAMERA_IMAGE.publisher(self)
        self._info_pub = CAMERA_INFO.publisher(self)
        self._live_pub = CAMERA_LIVE.publisher(self)
        group = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, "camera/trigger", self._trigger, callback_group=group)
        self._live_image = Image()
        if self.params["live_rate_hz"] > 0:
            self.create_timer(1.0 / self.params["live_rate_hz"], self._live, callback_group=group)

    def _on_parameters(self, parameters) -> SetParametersResult:
        for parameter in parameters:
            if parameter.name in ("exposure_ms", "gain") and not parameter.value > 0:
                return SetParametersResult(successful=False, reason=f"{parameter.name} must be > 0")
        for parameter in parameters:
            self.params[parameter.name] = parameter.value
        return SetParametersResult(successful=True)

    def _snap_into(self, msg: Image) -> Image:
        frame = snap(self.backend, self.params["exposure_ms"], self.params["gain"])
        array_to_image(frame.image_rgb8, "rgb8", msg)
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self.params["frame_id"]
        return msg

    def _camera_info(self, image: Image) -> CameraInfo:
        return CameraInfo(header=image.header, width=image.width, height=image.height)

    def _trigger(self, request, response):
        if not self._lock.acquire(blocking=False):
            response.success, response.message = False, "camera busy: a scan or a move is running"
            return response
        try:
            image = self._snap_into(Image())
        except CameraError as error:
            response.success, response.message = False, f"camera error: {error}"
            return response
        finally:
            self._lock.release()
        self._image_pub.publish(image)
        self._info_pub.publish(self._camera_info(image))
        response.success, response.message = True, f"published {image.width}x{image.height} on camera/image"
        return response

    def _live(self) -> None:
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._live_pub.publish(self._snap_into(self._live_image))
        except CameraError as error:
            self.get_logger().warning(f"live frame skipped: {error}", throttle_duration_sec=5.0)
        finally:
            self._lock.release()
