"""Recording topics into rosbag2 MCAP bags and replaying them, intact and damaged."""
import json
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from mcap.reader import make_reader
from mcap_ros2._vendor.rosidl_adapter.parser import InvalidResourceName
from mcap_ros2.decoder import DecoderFactory
from rosbags.highlevel import AnyReader
from rosbags.interfaces import QosDurability, QosReliability
from rosbags.rosbag2 import Reader

from wsi.bag_format import (MCAP_MAGIC, BagError, find_interface_directory, interface_types, reliable_qos,
                            wsi_typestore)
from wsi.bag_reader import BagReader, DamagedBagError
from wsi.bag_writer import BackgroundBagWriter, BagWriter
from wsi.graph import GraphConfig, scan_graph
from wsi_common.ros_env import node_environment

TILE_TYPE = "wsi_interfaces/msg/Tile"


def mcap_file(bag: Path) -> Path:
    [path] = bag.glob("*.mcap")
    return path


def tile_cdr(typestore, sequence: int, size_px: int = 640) -> bytes:
    """A serialized Tile of more than 1 MiB (so it fills a chunk of its own) with distinct pixels."""
    Tile = typestore.types[TILE_TYPE]
    pixels = np.random.default_rng(sequence).integers(0, 256, size_px * size_px * 3, dtype=np.uint8)
    Header = typestore.types["std_msgs/msg/Header"]
    Time = typestore.types["builtin_interfaces/msg/Time"]
    Image = typestore.types["sensor_msgs/msg/Image"]
    TileIndex = typestore.types["wsi_interfaces/msg/TileIndex"]
    header = Header(stamp=Time(sec=sequence, nanosec=0), frame_id="camera")
    image = Image(header=header, height=size_px, width=size_px, encoding="rgb8", is_bigendian=0,
                  step=size_px * 3, data=pixels)
    tile = Tile(header=header, image=image, scan_id="t", sequence=sequence,
                index=TileIndex(row=0, col=sequence), is_recapture=False,
                **{name: 0.0 for name in ("commanded_x_um", "commanded_y_um", "commanded_z_um", "measured_x_um",
                                          "measured_y_um", "measured_z_um", "pixel_size_um",
                                          "objective_magnification", "numerical_aperture", "exposure_ms", "gain",
                                          "applied_focus_offset_um", "ground_truth_defocus_um")})
    return bytes(typestore.serialize_cdr(tile, TILE_TYPE))


@pytest.fixture(scope="module")
def typestore():
    return wsi_typestore()


@pytest.fixture(scope="module")
def tiles(typestore):
    return [tile_cdr(typestore, i) for i in range(6)]


@pytest.fixture
def bag(tmp_path, tiles):
    path = tmp_path / "bag"
    with BagWriter(path) as writer:
        writer.add_topic("/tiles", TILE_TYPE, [reliable_qos(16)])
        writer.add_topic("/scan/plan", "wsi_interfaces/msg/ScanPlan", [reliable_qos(1, transient_local=True)])
        writer.add_topic("/scan_slide/_action/feedback", "wsi_interfaces/action/ScanSlide_FeedbackMessage",
                         [reliable_qos(10)])
        for i, data in enumerate(tiles):
            writer.write("/tiles", 1_000_000_000 + i * 50_000_000, data)
    return path


def test_interface_types_hash_like_rosidl():
    """The type hashes written into bags equal the ones rosidl generated for the installed package."""
    directory = find_interface_directory()
    typestore = wsi_typestore(directory)
    official = {}
    for path in list((directory / "msg").glob("*.json")) + list((directory / "action").glob("*.json")):
        official.update({h["type_name"]: h["hash_string"] for h in json.loads(path.read_text())["type_hashes"]})
    if not official:
        pytest.skip(f"{directory} has no rosidl type-description JSON (source tree, not an install)")
    ours = [name for name in interface_types(directory) if name in official]
    assert len(ours) >= 7 + 3 * 4
    assert {name: typestore.hash_rihs01(name) for name in ours} == {name: official[name] for name in ours}


def test_bag_is_rosbag2_mcap_that_rosbags_reads(bag, tiles):
    data = mcap_file(bag).read_bytes()
    assert data.startswith(MCAP_MAGIC) and data.endswith(MCAP_MAGIC)
    profile_length = int.from_bytes(data[17:21], "little")     # header record: profile string
    assert data[21:21 + profile_length] == b"ros2"
    with Reader(bag) as reader:
        connections = {c.topic: c for c in reader.connections}
        assert {t: c.msgtype for t, c in connections.items()} == {
            "/tiles": TILE_TYPE, "/scan/plan": "wsi_interfaces/msg/ScanPlan",
            "/scan_slide/_action/feedback": "wsi_interfaces/action/ScanSlide_FeedbackMessage"}
        assert all(c.msgdef.format.name == "MSG" and c.ext.serialization_format == "cdr"
                   for c in connections.values())            # schema encoding ros2msg, messages cdr
        assert "MSG: wsi_interfaces/action/ScanSlide_Feedback" in connections["/scan_slide/_action/feedback"].msgdef.data
        plan_qos = connections["/scan/plan"].ext.offered_qos_profiles
        assert plan_qos[0].durability == QosDurability.TRANSIENT_LOCAL
        assert plan_qos[0].reliability == QosReliability.RELIABLE
        assert reader.message_count == len(tiles)
        read = [raw for _, _, raw in reader.messages()]
    assert read == tiles
    assert "offered_qos_profiles" in (bag / "metadata.yaml").read_text()


# One message of every type the recorder records by default, with values to find again.
ACTION_FEEDBACK = {"scan_slide": ("ScanSlide", {"tiles_done": 7}),
                   "export_slide": ("ExportSlide", {"level": 2}),
                   "stage/move": ("MoveStage", {"distance_remaining_um": 12.5})}


def recorded_kinds_of_message() -> dict[str, tuple[str, bytes]]:
    """{topic: (type, CDR bytes as rclpy serializes them)} for every kind of topic a graph recording holds."""
    from action_msgs.msg import GoalStatus, GoalStatusArray
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from rclpy.serialization import serialize_message
    from wsi.recorder_node import message_class

    messages = {}
    for topic, type_name in (("/tiles", TILE_TYPE), ("/focus_estimates", "wsi_interfaces/msg/FocusEstimate"),
                             ("/scan/plan", "wsi_interfaces/msg/ScanPlan"),
                             ("/scan/status", "wsi_interfaces/msg/ScanStatus"),
                             ("/mosaic/status", "wsi_interfaces/msg/MosaicStatus")):
        message = message_class(type_name)(scan_id=f"scan of {topic}")
        messages[topic] = (type_name, serialize_message(message))
    messages["/stage/state"] = ("wsi_interfaces/msg/StageState", serialize_message(message_class(
        "wsi_interfaces/msg/StageState")(x_um=1234.5)))
    messages["/diagnostics"] = ("diagnostic_msgs/msg/DiagnosticArray", serialize_message(
        DiagnosticArray(status=[DiagnosticStatus(name="autofocus", message="running")])))
    for action, (name, values) in ACTION_FEEDBACK.items():
        type_name = f"wsi_interfaces/action/{name}_FeedbackMessage"
        message = message_class(type_name)()
        for field, value in values.items():
            setattr(message.feedback, field, value)
        messages[f"/{action}/_action/feedback"] = (type_name, serialize_message(message))
        messages[f"/{action}/_action/status"] = ("action_msgs/msg/GoalStatusArray", serialize_message(
            GoalStatusArray(status_list=[GoalStatus(status=GoalStatus.STATUS_EXECUTING)])))
    return messages


@pytest.fixture
def bag_of_every_kind(tmp_path):
    path = tmp_path / "every-kind"
    messages = recorded_kinds_of_message()
    with BagWriter(path) as writer:
        for i, (topic, (type_name, data)) in enumerate(messages.items()):
            writer.add_topic(topic, type_name, [reliable_qos(10)])
            writer.write(topic, 1_000_000_000 + i, data)
    return path, messages


def assert_same_fields(rclpy_message, decoded, path="") -> None:
    """Every field of an rclpy message equals the field of the same name of another reader's message."""
    for field in rclpy_message.get_fields_and_field_types():
        ours, theirs = getattr(rclpy_message, field), getattr(decoded, field)
        if hasattr(ours, "get_fields_and_field_types"):
            assert_same_fields(ours, theirs, f"{path}{field}.")
        elif isinstance(ours, (list, tuple)) and ours and hasattr(ours[0], "get_fields_and_field_types"):
            assert len(ours) == len(theirs), f"{path}{field}"
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert_same_fields(a, b, f"{path}{field}[{i}].")
        else:
            if isinstance(ours, bytes):     # rclpy's `byte` fields; other readers give integers
                ours = np.frombuffer(ours, np.uint8) if len(ours) != 1 else ours[0]
            assert np.array_equal(np.asarray(ours), np.asarray(theirs)), f"{path}{field}: {ours!r} != {theirs!r}"


def read_with_any_reader(bag: Path) -> dict[str, list[tuple[object, bytes]]]:
    """{topic: [(decoded message, raw bytes)]} of every message, decoded by rosbags' AnyReader, which
    checks every topic's declared type hash against the schema text in the bag."""
    from rclpy.serialization import deserialize_message
    from wsi.recorder_node import message_class

    read = {}
    with AnyReader([bag]) as reader:
        for connection, _, raw in reader.messages():
            decoded = reader.deserialize(raw, connection.msgtype)
            assert_same_fields(deserialize_message(raw, message_class(connection.msgtype)), decoded)
            read.setdefault(connection.topic, []).append((decoded, raw))
    return read


def test_every_kind_of_recorded_message_decodes_with_rosbags_any_reader(bag_of_every_kind):
    bag, written = bag_of_every_kind
    read = read_with_any_reader(bag)
    assert {topic: [raw for _, raw in messages] for topic, messages in read.items()} == {
        topic: [data] for topic, (_, data) in written.items()}
    for action, (_, values) in ACTION_FEEDBACK.items():
        [(message, _)] = read[f"/{action}/_action/feedback"]
        assert {field: getattr(message.feedback, field) for field in values} == values
    assert read["/stage/state"][0][0].x_um == 1234.5


def read_with_mcap(bag: Path) -> tuple[dict[str, list[tuple[str, bytes]]], dict[str, list[object]]]:
    """({topic: [(schema name, raw bytes)]}, {topic: [decoded message]}) of every message, as Foxglove's
    `mcap` reads them and its ROS 2 decoder (mcap-ros2-support) decodes them.

    That decoder cannot decode the action topics' `<Action>_FeedbackMessage`: its .msg parser accepts
    neither `_` in a type name nor an `action/` namespace in a field type, both of which an action's
    feedback type has (a limitation of that reader; rosbags, which ROS 2 tools share, reads them).
    Here it must fail on exactly those, and decode everything else."""
    decoders = DecoderFactory()
    records, decoded = {}, {}
    with mcap_file(bag).open("rb") as stream:
        reader = make_reader(stream)
        assert reader.get_header().profile == "ros2"
        for schema, channel, message in reader.iter_messages():
            assert (schema.encoding, channel.message_encoding) == ("ros2msg", "cdr")
            records.setdefault(channel.topic, []).append((schema.name, message.data))
            if schema.name.endswith("_FeedbackMessage"):
                with pytest.raises(InvalidResourceName, match=schema.name.removesuffix("Message")):
                    decoders.decoder_for(channel.message_encoding, schema)
            else:
                decoder = decoders.decoder_for(channel.message_encoding, schema)
                decoded.setdefault(channel.topic, []).append(decoder(message.data))
    return records, decoded


def test_recorded_messages_read_with_the_mcap_library(bag_of_every_kind):
    bag, written = bag_of_every_kind
    records, decoded = read_with_mcap(bag)
    assert records == {topic: [message] for topic, message in written.items()}
    assert len(decoded) == len(written) - len(ACTION_FEEDBACK)
    for topic in ("/tiles", "/focus_estimates", "/scan/plan", "/scan/status", "/mosaic/status"):
        assert decoded[topic][0].scan_id == f"scan of {topic}"
    assert decoded["/stage/state"][0].x_um == 1234.5
    assert decoded["/diagnostics"][0].status[0].message == "running"
    assert decoded["/scan_slide/_action/status"][0].status_list[0].status == 2     # STATUS_EXECUTING


def test_reader_returns_what_was_written_in_order(bag, tiles):
    reader = BagReader(bag)
    assert set(reader.topics()) == {"/tiles"}
    messages = list(reader.messages())
    assert [m.data for m in messages] == tiles
    assert [m.timestamp_ns for m in messages] == [1_000_000_000 + i * 50_000_000 for i in range(len(tiles))]
    assert {m.msgtype for m in messages} == {TILE_TYPE}


def damaged_copy(bag: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "damaged"
    copy.mkdir()
    data = bytearray(mcap_file(bag).read_bytes())
    (copy / "damaged.mcap").write_bytes(damage(data))
    return copy


def read_all(path: Path) -> tuple[list[bytes], DamagedBagError | None]:
    read = []
    try:
        for message in BagReader(path).messages():
            read.append(message.data)
    except DamagedBagError as error:
        return read, error
    return read, None


def test_truncated_bag_gives_back_every_complete_message(bag, tiles, tmp_path):
    data = mcap_file(bag).read_bytes()
    cut = data.find(tiles[3]) + len(tiles[3]) // 2                # in the middle of the fourth tile
    read, error = read_all(damaged_copy(bag, tmp_path, lambda d: d[:cut]))
    complete = [t for t in tiles if data.find(t) + len(t) <= cut]
    assert read == complete and len(complete) == 3
    assert "truncated at byte" in str(error) and error.messages_read == 3


def test_corrupt_tile_is_skipped_and_the_others_are_intact(bag, tiles, tmp_path):
    data = mcap_file(bag).read_bytes()

    def flip(d):
        d[data.find(tiles[2]) + 1000] ^= 0xFF
        return bytes(d)
    read, error = read_all(damaged_copy(bag, tmp_path, flip))
    assert read == tiles[:2] + tiles[3:]
    assert "fails its CRC32 check" in str(error)


def top_level_records(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, opcode, length) of the records of an MCAP file's data section."""
    records, pos = [], len(MCAP_MAGIC)
    while data[pos] != 0x0F:
        length = int.from_bytes(data[pos + 1:pos + 9], "little")
        records.append((pos, data[pos], length))
        pos += 9 + length
    return records


def chunk_holding(data: bytes, payload: bytes) -> int:
    where = data.find(payload)
    [offset] = [pos for pos, opcode, length in top_level_records(data)
                if opcode == 0x06 and pos < where < pos + 9 + length]
    return offset


def test_damaged_record_header_is_skipped_over(bag, tiles, tmp_path):
    data = mcap_file(bag).read_bytes()
    chunk = chunk_holding(data, tiles[1])

    def wrong_opcode(d):
        d[chunk] = 0x77
        return bytes(d)
    read, error = read_all(damaged_copy(bag, tmp_path, wrong_opcode))
    assert read == tiles[:1] + tiles[2:]
    assert f"unknown record opcode 0x77 at byte {chunk}" in str(error)


def test_wrong_record_length_is_skipped_over(bag, tiles, tmp_path):
    data = mcap_file(bag).read_bytes()
    chunk = chunk_holding(data, tiles[1])

    def wrong_length(d):
        d[chunk + 1:chunk + 9] = (len(data) * 2).to_bytes(8, "little")
        return bytes(d)
    read, error = read_all(damaged_copy(bag, tmp_path, wrong_length))
    assert read == tiles         # the tile's own record is intact; only its chunk's length is wrong
    assert f"bad record length at byte {chunk}" in str(error)


def test_unclosed_bag_of_a_killed_recorder_is_readable(tmp_path, tiles):
    path = tmp_path / "bag"
    writer = BagWriter(path)
    writer.add_topic("/tiles", TILE_TYPE, [reliable_qos(16)])
    for i, data in enumerate(tiles[:3]):
        writer.write("/tiles", i, data)
    writer.flush()
    # A killed process never writes the summary, the index or metadata.yaml.
    assert not (path / "metadata.yaml").exists()
    read, error = read_all(path)
    assert read == tiles[:3]
    assert "without its data-end record" in str(error)


def test_missing_bag_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(BagError, match="no bag at"):
        BagReader(tmp_path / "nothing")
    (tmp_path / "x.db3").write_bytes(b"SQLite format 3\0")
    with pytest.raises(BagError, match="holds no .mcap file"):
        BagReader(tmp_path)
    (tmp_path / "y.mcap").write_bytes(b"not mcap at all")
    with pytest.raises(BagError, match="is not an MCAP file"):
        list(BagReader(tmp_path / "y.mcap").messages())
    with pytest.raises(BagError, match="exists already"):
        BagWriter(tmp_path)


def test_background_writer_drops_and_counts_beyond_its_queue(tmp_path, tiles):
    class SlowBag(BagWriter):
        def write(self, *args):
            release.wait(10)
            super().write(*args)
    release = threading.Event()
    writer = BackgroundBagWriter(SlowBag(tmp_path / "bag"), max_queued_bytes=2 * len(tiles[0]) + 10)
    writer.add_topic("/tiles", TILE_TYPE, [reliable_qos(16)])
    accepted = [writer.write("/tiles", i, data) for i, data in enumerate(tiles)]
    release.set()
    writer.close()
    assert accepted == [True, True] + [False] * (len(tiles) - 2)
    assert writer.dropped == {"/tiles": len(tiles) - 2} and writer.counts == {"/tiles": 2}
    assert [m.data for m in BagReader(tmp_path / "bag").messages()] == tiles[:2]


def test_background_writer_reports_a_write_error(tmp_path, tiles):
    class FullDisk(BagWriter):
        def write(self, *args):
            raise OSError(28, "No space left on device")
    writer = BackgroundBagWriter(FullDisk(tmp_path / "bag"), max_queued_bytes=1 << 30)
    writer.add_topic("/tiles", TILE_TYPE, [reliable_qos(16)])
    writer.write("/tiles", 0, tiles[0])
    with pytest.raises(BagError, match="No space left on device"):
        writer.close()
    assert (tmp_path / "bag" / "metadata.yaml").exists()    # what was written is closed and readable


def test_qos_round_trip_through_the_bag():
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from wsi.recorder_node import qos_from_bag, qos_to_bag, subscription_qos, with_history_of
    from wsi_common.qos import EVENT_QOS, LATCHED_QOS, TILE_QOS
    for profile in (TILE_QOS, LATCHED_QOS, subscription_qos("scan_slide/_action/status")):
        replayed = qos_from_bag([qos_to_bag(profile)], EVENT_QOS)
        assert (replayed.reliability, replayed.durability, replayed.depth) == (
            profile.reliability, profile.durability, profile.depth)
    # discovery reports depth 0: the recorder stores the known depth instead
    discovered = QoSProfile(history=HistoryPolicy.UNKNOWN, depth=0, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.VOLATILE)
    assert qos_to_bag(with_history_of(discovered, TILE_QOS)).depth == 16
    # one best-effort publisher makes the replay best effort
    mixed = [qos_to_bag(TILE_QOS), qos_to_bag(QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT))]
    assert qos_from_bag(mixed, EVENT_QOS).reliability == ReliabilityPolicy.BEST_EFFORT


def test_the_recorder_subscribes_with_the_qos_of_the_topic_table():
    from wsi.recorder_node import DEFAULT_TOPICS, RECORDED_TOPICS, subscription_qos
    from wsi_common.qos import EVENT_QOS
    from wsi_common.topics import ACTION_FEEDBACK_QOS, ACTION_STATUS_QOS, TOPICS
    assert all(topic in TOPICS for topic in RECORDED_TOPICS) and DEFAULT_TOPICS == [t.name for t in RECORDED_TOPICS]
    assert all(subscription_qos(topic.name) == topic.qos for topic in TOPICS)
    # a topic the table does not know: an action's by rclpy's profiles, any other as an event
    assert subscription_qos("other/_action/status") == ACTION_STATUS_QOS
    assert subscription_qos("other/_action/feedback") == ACTION_FEEDBACK_QOS
    assert subscription_qos("other") == EVENT_QOS


def test_message_classes_of_recorded_types():
    from wsi.recorder_node import message_class
    from wsi_interfaces.action import ScanSlide
    from wsi_interfaces.msg import Tile
    assert message_class(TILE_TYPE) is Tile
    assert message_class("wsi_interfaces/action/ScanSlide_FeedbackMessage") is ScanSlide.Impl.FeedbackMessage
    with pytest.raises(BagError, match="no type"):
        message_class("wsi_interfaces/msg/Nope")


def test_record_adds_a_recorder_under_the_output_dir():
    specs = {s.name: s for s in scan_graph(GraphConfig(record=True, output_dir="/data/out", namespace="b"))}
    recorder = specs["recorder"]
    assert recorder.module == "wsi.recorder_node" and recorder.executable == "recorder_node"
    assert recorder.namespace == "b"
    assert Path(recorder.parameters["bag_path"]).parent == Path("/data/out/bags")
    assert "recorder" not in {s.name for s in scan_graph(GraphConfig(record=False))}


# ---------------------------------------------------------------------------------------------
# Real processes: tile_probe -> recorder node -> bag -> wsi play -> tile_probe
# ---------------------------------------------------------------------------------------------

def python_module(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], env=node_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout_s: float = 90) -> tuple[str, str]:
    """What the process printed once it exited; one still running after `timeout_s` is killed (a receiver left
    spinning took a core from every later test) and the test fails with what it printed."""
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{process.args} did not exit in {timeout_s} s; it printed:\n{out}\n{err}")
    assert process.returncode == 0, err
    return out, err


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def receive_tiles(count: int) -> subprocess.Popen:
    receiver = python_module("wsi.tile_probe", "receive", "--count", str(count), "--duration", "60",
                             "--idle-timeout", "10", "--checksums")
    assert json.loads(receiver.stdout.readline()) == {"ready": True}
    return receiver


TILES_SENT = 8


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A bag recorded by the recorder node from `tile_probe send`, and what was sent."""
    bag = tmp_path_factory.mktemp("rec") / "bag"
    recorder = python_module("wsi.recorder_node", "--ros-args", "-p", f"bag_path:={bag}",
                             "-p", "discovery_period_s:=0.2")
    try:
        sender = python_module("wsi.tile_probe", "send", "--count", str(TILES_SENT), "--size", "1024",
                               "--rate", "10", "--wait-for-subscriber", "30")
        sent = last_json(finish(sender)[0])
    finally:
        recorder.send_signal(signal.SIGINT)
        out, err = recorder.communicate(timeout=30)
    assert recorder.returncode == 0, err
    return {"bag": bag, "sent": sent, "log": out + err}


@pytest.mark.ros
@pytest.mark.slow
def test_recorder_node_writes_every_tile_with_type_and_qos(recorded):
    closing = next(line for line in recorded["log"].splitlines() if " closed (" in line)
    assert "/tiles: 8" in closing and "lost or dropped: none" in closing, closing
    with Reader(recorded["bag"]) as reader:
        # Topics left on the graph by earlier tests may be subscribed too; only /tiles carries messages.
        [connection] = [c for c in reader.connections if c.msgcount > 0]
        assert (connection.topic, connection.msgtype, connection.msgcount) == ("/tiles", TILE_TYPE, TILES_SENT)
        [offered] = connection.ext.offered_qos_profiles   # the sender's own profile (TILE_QOS)
        assert (offered.reliability, offered.durability, offered.depth) == (
            QosReliability.RELIABLE, QosDurability.VOLATILE, 16)
        typestore = wsi_typestore()
        tiles = [typestore.deserialize_cdr(raw, TILE_TYPE) for _, _, raw in reader.messages()]
    assert [t.sequence for t in tiles] == list(range(TILES_SENT))
    assert [zlib.crc32(t.image.data) for t in tiles] == recorded["sent"]["crc32"]


def run_play(*args, timeout_s=90) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "wsi.cli", "play", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout_s, env=node_environment())
    except subprocess.TimeoutExpired as expired:
        # Its waits are bounded well under the timeout: what it printed says whether it hung before the replay
        # or after it (in the middleware's shutdown).
        pytest.fail(f"wsi play did not exit within {timeout_s} s; it printed: stdout {expired.stdout!r}, "
                    f"stderr {expired.stderr!r}")


@pytest.mark.ros
@pytest.mark.slow
def test_replay_delivers_bit_identical_tiles_with_the_recorded_timing(recorded):
    with Reader(recorded["bag"]) as reader:
        span_s = (reader.end_time - reader.start_time) / 1e9
    assert span_s > 0.5     # 8 tiles sent at 10 Hz
    receiver = receive_tiles(TILES_SENT)
    played = run_play(recorded["bag"], "--rate", "1", "--wait-for-subscribers", "1")
    assert played.returncode == 0, played.stderr
    received = last_json(finish(receiver)[0])
    assert [t["crc32"] for t in received["tiles"]] == recorded["sent"]["crc32"]
    assert [t["sequence"] for t in received["tiles"]] == list(range(TILES_SENT))
    seconds = float(played.stdout.split(" in ")[1].split(" s")[0])
    assert seconds >= span_s * 0.95


@pytest.mark.ros
@pytest.mark.slow
def test_truncated_bag_replays_what_is_readable_and_fails_clearly(recorded, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    data = mcap_file(recorded["bag"]).read_bytes()
    (damaged / "cut.mcap").write_bytes(data[:len(data) // 2])
    expected = len(read_all(damaged)[0])
    assert 0 < expected < TILES_SENT
    receiver = receive_tiles(expected)
    played = run_play(damaged, "--rate", "0", "--wait-for-subscribers", "1")
    assert played.returncode == 1
    assert "damaged bag" in played.stderr and "truncated at byte" in played.stderr
    received = last_json(finish(receiver)[0])
    assert [t["crc32"] for t in received["tiles"]] == recorded["sent"]["crc32"][:expected]


@pytest.mark.ros
def test_replay_reaches_a_subscriber_that_was_running_before_the_player(bag, tiles):
    """The player's participant joins the graph just before the replay; the subscriber already there is
    found by discovery (0.3-3 s) and matched before the first tile, which would otherwise be lost."""
    import rclpy
    from rclpy.node import Node
    from rclpy.signals import SignalHandlerOptions

    from wsi.player import play
    from wsi_common.node_main import end_ros

    receiver = receive_tiles(len(tiles))
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)   # as `wsi play` does
    node = Node("player")
    try:
        report = play(node, bag, rate=0, topics=["/tiles"])
    finally:
        end_ros([node], "player")
    assert report.subscribers == {"/tiles": 1}
    received = last_json(finish(receiver)[0])
    assert [t["sequence"] for t in received["tiles"]] == list(range(len(tiles)))


@pytest.mark.ros
def test_wsi_play_waits_for_discovery_unless_told_not_to(bag, tiles):
    receiver = receive_tiles(len(tiles))
    played = run_play(bag, "--rate", "0", "--topics", "tiles")
    assert played.returncode == 0, played.stderr
    assert "waiting 4 s for the subscribers already running to be discovered" in played.stderr
    assert len(last_json(finish(receiver)[0])["tiles"]) == len(tiles)
    unwaited = run_play(bag, "--rate", "0", "--topics", "tiles", "--wait-for-subscribers", "0")
    assert unwaited.returncode == 0 and "waiting" not in unwaited.stderr
    assert "no subscriber of /tiles was matched when the replay began" in unwaited.stderr


@pytest.mark.ros
def test_a_subscriber_that_is_never_matched_ends_the_wait_with_the_reason(bag, ros_node):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    from wsi.player import NoSubscriberError, play
    from wsi_interfaces.msg import Tile

    # The bag's tiles were published volatile: a subscriber asking for transient local never matches.
    ros_node.create_subscription(Tile, "/tiles", lambda _: None, QoSProfile(
        depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    started = time.monotonic()
    with pytest.raises(NoSubscriberError, match=r"waited 2 s .* matched only \{'/tiles': '0 of 1'\} .*QoS"):
        play(ros_node, bag, rate=0, topics=["/tiles"], wait_timeout_s=2)
    assert time.monotonic() - started < 10


def test_play_refuses_unknown_topics(bag):
    done = run_play(bag, "--topics", "focus_estimates", timeout_s=60)
    assert done.returncode == 2
    assert "['focus_estimates'] are not in the bag" in done.stderr


@pytest.mark.ros
@pytest.mark.slow
def test_graph_recorder_bags_status_and_action_topics(tmp_path, run_nodes, ros_node):
    """The recorder of `scan_graph(record=True)` records the microscope's status and action topics."""
    from action_msgs.msg import GoalStatus
    from wsi_common.action_caller import ActionCaller
    from wsi_common.topics import MOVE_STAGE, TOPICS
    from wsi_interfaces.action import MoveStage

    specs = scan_graph(GraphConfig(record=True, output_dir=str(tmp_path), sim_speedup=4.0))
    supervisor = run_nodes([s for s in specs if s.name in ("microscope", "recorder", "lifecycle_manager")])
    stage = ActionCaller(ros_node, MOVE_STAGE)
    stage.wait_for_server(timeout_s=30)
    # The recorder subscribes once it has discovered the topics, and matches the publishers soon after:
    # on a loaded machine that can take seconds, so wait for it in the graph rather than a fixed time.
    deadline = time.monotonic() + 30
    while ros_node.count_subscribers("/stage/state") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    outcome = stage.call(MoveStage.Goal(x_um=20_000.0, y_um=5_000.0, z_um=0.0), timeout_s=30)
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED
    time.sleep(1.0)     # stage/state at 10 Hz: several more after the move, however late the recorder matched
    assert supervisor.stop()["recorder"] == 0
    [bag] = (tmp_path / "bags").iterdir()
    with Reader(bag) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        types = {c.topic: c.msgtype for c in reader.connections}
        offered = {c.topic: {(q.reliability.name, q.durability.name) for q in c.ext.offered_qos_profiles}
                   for c in reader.connections}
    # Readers this project did not write read every message of the bag.
    read = read_with_any_reader(bag)
    records, decoded = read_with_mcap(bag)
    assert {topic: len(messages) for topic, messages in read.items()} == {
        topic: len(messages) for topic, messages in records.items()} == {t: n for t, n in counts.items() if n}
    assert len(decoded["/stage/state"]) == counts["/stage/state"]
    feedback = [message for message, _ in read["/stage/move/_action/feedback"]]
    assert types["/stage/move/_action/feedback"] == "wsi_interfaces/action/MoveStage_FeedbackMessage"
    assert types["/stage/move/_action/status"] == "action_msgs/msg/GoalStatusArray"
    assert counts["/stage/state"] > 0 and counts["/stage/move/_action/status"] > 0
    assert len(feedback) == len(outcome.feedback)
    assert [f.feedback.distance_remaining_um for f in feedback] == pytest.approx(
        [f.distance_remaining_um for f in outcome.feedback])
    # Every topic recorded is in the topic table, with the type and QoS its publishers use on the graph
    # (discovery carries reliability and durability, not the history depth).
    table = {f"/{topic.name.lstrip('/')}": topic for topic in TOPICS}
    assert {"/tiles", "/scan/plan", "/scan/status", "/stage/state", "/diagnostics"} <= types.keys() <= table.keys()
    assert {topic: (types[topic], offered[topic]) for topic in types} == {
        topic: (table[topic].type_name, {(table[topic].qos.reliability.name, table[topic].qos.durability.name)})
        for topic in types}
