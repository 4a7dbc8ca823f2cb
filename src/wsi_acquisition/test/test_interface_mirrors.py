"""The Python enums that mirror wsi_interfaces constants hold exactly the interfaces' names and values."""
import pytest

from wsi_acquisition.scan import State
from wsi_acquisition.scan_request import FocusStrategy, ScanErrorCode
from wsi_acquisition.stage import Axes
from wsi_interfaces.action import MoveStage, ScanSlide
from wsi_interfaces.msg import ScanStatus


def constants(message_type, prefix: str) -> dict[str, int]:
    return {name.removeprefix(prefix): value for name, value in vars(message_type).items()
            if name.startswith(prefix) and isinstance(value, int)}


@pytest.mark.parametrize("mirror, message_type, prefix", [
    (ScanErrorCode, ScanSlide.Result, "ERROR_"),
    (FocusStrategy, ScanSlide.Goal, "FOCUS_"),
    (State, ScanStatus, "STATE_"),
    (Axes, MoveStage.Goal, "AXES_"),
])
def test_each_mirrored_enum_matches_its_interface_constants(mirror, message_type, prefix):
    assert {name: int(member) for name, member in mirror.__members__.items()} == constants(message_type, prefix)
