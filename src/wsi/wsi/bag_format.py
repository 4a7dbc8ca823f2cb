"""The rosbag2 bags of WSI (format version 9, MCAP storage, raw CDR messages), as their writer
(bag_writer.py) and reader (bag_reader.py) share them: the MCAP record layout, the message types, the
QoS profiles a bag stores, and the error both raise. No ROS install is needed.

A bag written here is what `ros2 bag record -s mcap` writes: MCAP profile `ros2`, schemas encoded
`ros2msg`, messages `cdr`, each topic's offered QoS profiles in its channel metadata and in
metadata.yaml, and type hashes equal to the ones rosidl generates.
"""
import os
import re
import sys
from pathlib import Path

from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

ROSBAG2_VERSION = 9
INTERFACE_PACKAGE = "wsi_interfaces"
MCAP_MAGIC = b"\x89MCAP0\r\n"
RECORD_HEADER_BYTES = 9           # opcode (1) + content length (8)
CHUNK_CRC_OFFSET = 24             # message start time, message end time, uncompressed size (3 x u64)
INFINITE_QOS_TIME = QosTime(2147483647, 4294967295)   # how rosbag2 writes an infinite duration
_ACTION_TOPIC_TYPES = ("Goal", "Result", "Feedback")


class BagError(ValueError):
    """A bag cannot be written or read as asked."""


class InterfaceDefinitionsNotFoundError(FileNotFoundError):
    """The .msg/.action files of the WSI interfaces are neither installed nor in the source tree."""


def interface_share_candidates(package: str = INTERFACE_PACKAGE) -> list[Path]:
    """Where the package's .msg/.action files may be, most specific first: the ament prefixes
    (AMENT_PREFIX_PATH), this interpreter's prefix (a venv with the ROS wheels), the source tree."""
    prefixes = [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    prefixes.append(Path(sys.prefix))
    candidates = [prefix / "share" / package for prefix in prefixes]
    candidates.append(Path(__file__).resolve().parents[2] / package)
    return candidates


def find_interface_directory(package: str = INTERFACE_PACKAGE) -> Path:
    for candidate in interface_share_candidates(package):
        if (candidate / "msg").is_dir():
            return candidate
    searched = ", ".join(str(c) for c in interface_share_candidates(package))
    raise InterfaceDefinitionsNotFoundError(
        f"no {package} interface definitions (a msg/ directory) in any of: {searched}; "
        f"install {package} or set AMENT_PREFIX_PATH to its install prefix")


def _qualify_package_types(text: str, package: str) -> str:
    """Write the package's own bare type names (`TileIndex`) as `package/TileIndex`.

    In an .action file a bare name means a message of the same package; rosbags would otherwise
    look for it among the action's types."""
    def qualify(match: re.Match) -> str:
        return f"{match.group(1)}{package}/{match.group(2)}"
    return re.sub(r"^(\s*)([A-Z]\w*)(?=[\s\[<])", qualify, text, flags=re.MULTILINE)


def interface_types(directory: Path, package: str = INTERFACE_PACKAGE, action_namespace: str = "action") -> dict:
    """rosbags type definitions for every message of the package and the topic types of its actions
    (`<Action>_Goal`, `_Result`, `_Feedback`, and `_FeedbackMessage`, which the feedback topic carries).

    `action_namespace="msg"` files the action types under `<package>/msg/`: rosbags can write the
    ros2msg schema text only for such names (`BagWriter.message_definition` names them right again)."""
    types = {}
    for path in sorted((directory / "msg").glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"{package}/msg/{path.stem}"))
    for path in sorted((directory / "action").glob("*.action")):
        sections = re.split(r"^---\s*$", path.read_text(), flags=re.MULTILINE)
        if len(sections) != 3:
            raise BagError(f"{path} has {len(sections)} sections separated by ---; an action has 3")
        name = f"{package}/{action_namespace}/{path.stem}"
        for suffix, text in zip(_ACTION_TOPIC_TYPES, sections):
            types.update(get_types_from_msg(_qualify_package_types(text, package), f"{name}_{suffix}"))
        feedback_message = f"unique_identifier_msgs/UUID goal_id\n{name}_Feedback feedback\n"
        types.update(get_types_from_msg(feedback_message, f"{name}_FeedbackMessage"))
    return types


def wsi_typestore(directory: Path | None = None, action_namespace: str = "action") -> Typestore:
    """The ROS 2 Kilted types plus the WSI interfaces."""
    typestore = get_typestore(Stores.ROS2_KILTED)
    typestore.register(interface_types(directory or find_interface_directory(),
                                       action_namespace=action_namespace))
    return typestore


def reliable_qos(depth: int, transient_local: bool = False) -> Qos:
    """A QoS profile as rosbag2 stores it; the recorder node converts the publishers' real profiles."""
    return Qos(QosHistory.KEEP_LAST, depth, QosReliability.RELIABLE,
               QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
               INFINITE_QOS_TIME, INFINITE_QOS_TIME, QosLiveliness.AUTOMATIC, INFINITE_QOS_TIME, False)

