"""/diagnostics for every WSI node: one status per node, with its own key/value readings."""
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from wsi_common.topics import DIAGNOSTICS


class DiagnosticsPublisher:
    """Publishes `collect()` -> (level, message, {key: value}) every `period_s` on /diagnostics."""

    def __init__(self, node, hardware_id: str, period_s: float, collect):
        self._node = node
        self._hardware_id = hardware_id
        self._collect = collect
        self._publisher = DIAGNOSTICS.publisher(node)
        node.create_timer(period_s, self.publish)

    def publish(self) -> None:
        level, message, values = self._collect()
        status = DiagnosticStatus(level=level, name=self._node.get_fully_qualified_name(),
                                  hardware_id=self._hardware_id, message=message,
                                  values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self._node.get_clock().now().to_msg()
        self._publisher.publish(array)


OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


def worker_level(worker, message: str) -> tuple[int, str]:
    """(level, message) of a node whose slow work runs on `worker` (a wsi_common.worker.QueueWorker):
    ERROR once any batch failed, naming the last failure; else OK with `message`."""
    if worker.failures:
        return ERROR, f"{worker.failures} batch(es) failed in the worker; last: {worker.last_error}"
    return OK, message
