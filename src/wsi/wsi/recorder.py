"""rosbag2 bags (format version 9, MCAP storage) of raw CDR messages, written and read with no ROS
installed: the recorder node's storage and the player's source.

A bag written here is what `ros2 bag record -s mcap` writes: MCAP profile `ros2`, schemas encoded
`ros2msg`, messages `cdr`, each topic's offered QoS profiles in its channel metadata and in
metadata.yaml, and type hashes equal to the ones rosidl generates; the schema text of every topic
(action feedback included) hashes to its declared type hash, so readers that check it (rosbags'
AnyReader) read the bag. In addition every chunk carries a CRC32, so a reader can tell a damaged
chunk from a good one.

`BagReader` does not trust the bag's index: it walks the MCAP records in file order, so a bag whose
recorder was killed (no index, no metadata.yaml) or whose bytes were damaged still gives back every
message that can be read, and then raises `DamagedBagError` saying what was lost and where.
"""
import mmap
import os
import queue
import re
import sys
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.rosbag2.metadata import parse_qos
from rosbags.rosbag2.storage_mcap import DECOMPRESSORS, McapWriter
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

ROSBAG2_VERSION = 9
INTERFACE_PACKAGE = "wsi_interfaces"
MCAP_MAGIC = b"\x89MCAP0\r\n"
# The largest chunk this reader accepts: far above one 2048 x 2048 x 3 tile, far below a wrong length.
MAX_CHUNK_BYTES = 1 << 31

_OP_FOOTER, _OP_SCHEMA, _OP_CHANNEL, _OP_MESSAGE, _OP_CHUNK, _OP_DATA_END = 0x02, 0x03, 0x04, 0x05, 0x06, 0x0F
_FOOTER_BYTES = 20                # summary start (u64), summary offset start (u64), summary CRC (u32)
_KNOWN_OPCODES = set(range(0x01, 0x11))
_RECORD_HEADER_BYTES = 9          # opcode (1) + content length (8)
_CHUNK_CRC_OFFSET = 24            # message start time, message end time, uncompressed size (3 x u64)
_ACTION_TOPIC_TYPES = ("Goal", "Result", "Feedback")
_INFINITE_QOS_TIME = QosTime(2147483647, 4294967295)   # how rosbag2 writes an infinite duration


class BagError(ValueError):
    """A bag cannot be written or read as asked."""


class InterfaceDefinitionsNotFoundError(FileNotFoundError):
    """The .msg/.action files of the WSI interfaces are neither installed nor in the source tree."""


class DamagedBagError(BagError):
    """A bag was truncated or corrupt; `problems` says what could not be read and where."""

    def __init__(self, path: Path, problems: list[str], messages_read: int):
        self.path, self.problems, self.messages_read = path, problems, messages_read
        super().__init__(f"damaged bag {path}: {'; '.join(problems)} "
                         f"({messages_read} readable messages were read)")


# ---------------------------------------------------------------------------------------------
# Message types
# ---------------------------------------------------------------------------------------------

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
               _INFINITE_QOS_TIME, _INFINITE_QOS_TIME, QosLiveliness.AUTOMATIC, _INFINITE_QOS_TIME, False)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

class _ChecksummedMcapWriter(McapWriter):
    """rosbags' MCAP storage, plus a CRC32 in every chunk and a flush after it.

    rosbags leaves the chunk CRC at 0 (meaning "not computed"), which makes a flipped byte in a tile
    undetectable; the flush puts every closed chunk on disk, so a killed recorder loses only the
    chunk it was filling."""

    def close_chunk(self) -> None:
        crc = zlib.crc32(self.chunk.bio.getbuffer())
        chunk_start = self.bio.tell()
        super().close_chunk()
        end = self.bio.tell()
        self.bio.seek(chunk_start + _RECORD_HEADER_BYTES + _CHUNK_CRC_OFFSET)
        self.bio.write(crc.to_bytes(4, "little"))
        self.bio.seek(end)
        self.bio.flush()


class _Rosbag2Writer(Writer):
    STORAGE_PLUGINS = {**Writer.STORAGE_PLUGINS, StoragePlugin.MCAP: _ChecksummedMcapWriter}


class BagWriter:
    """Write raw CDR messages of known types into a new rosbag2 MCAP bag directory.

        with BagWriter(path) as bag:
            bag.add_topic("/tiles", "wsi_interfaces/msg/Tile", [qos])
            bag.write("/tiles", timestamp_ns, cdr_bytes)
    """

    def __init__(self, path: Path | str, interface_directory: Path | None = None):
        self.path = Path(path)
        if self.path.exists():
            raise BagError(f"bag directory {self.path} exists already; a bag is never overwritten, "
                           f"choose a new path")
        directory = interface_directory or find_interface_directory()
        self.typestore = wsi_typestore(directory)
        self._schema_typestore = wsi_typestore(directory, action_namespace="msg")
        action_types = [name.split("/") for name in self.typestore.fielddefs if "/action/" in name]
        # `<package>/<Type>` of an action type as a whole name, not the start of a longer one
        # (`ScanSlide_Feedback` in `ScanSlide_FeedbackMessage`)
        self._action_type_name = re.compile(r"(?<![\w/])({})(?![\w/])".format(
            "|".join(re.escape(f"{package}/{name}") for package, _, name in action_types)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = _Rosbag2Writer(self.path, version=ROSBAG2_VERSION, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._connections = {}
        self.counts: dict[str, int] = {}

    def check_topic(self, topic: str, msgtype: str) -> None:
        """Raise BagError if `topic` cannot be added."""
        if topic in self._connections:
            raise BagError(f"topic {topic} is already in the bag {self.path}")
        if msgtype not in self.typestore.fielddefs:
            raise BagError(f"topic {topic} has type {msgtype}, which is not in the bag's typestore "
                           f"(ROS 2 Kilted + {INTERFACE_PACKAGE}); it cannot be recorded")

    def add_topic(self, topic: str, msgtype: str, offered_qos: list[Qos]) -> None:
        self.check_topic(topic, msgtype)
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, msgdef=self.message_definition(msgtype), rihs01=self.typestore.hash_rihs01(msgtype),
            serialization_format="cdr", offered_qos_profiles=offered_qos)
        self.counts[topic] = 0

    def message_definition(self, msgtype: str) -> str:
        """The ros2msg text of `msgtype` and of every type it uses, as rosbag2 stores it in a schema.

        rosbags writes this text only for `/msg/` names, so an action's types are written from the
        typestore that files them under `/msg/`, and their names are then spelled with their real
        namespace again (`wsi_interfaces/action/ScanSlide_Feedback`, in field types and `MSG:` lines):
        the type hash covers the names of field types, and a reader that checks the schema against
        the declared hash (rosbags' AnyReader) hashes the types under the names the text gives."""
        definition, _ = self._schema_typestore.generate_msgdef(msgtype.replace("/action/", "/msg/", 1),
                                                               ros_version=2)
        return self._action_type_name.sub(lambda m: m.group(1).replace("/", "/action/", 1), definition)

    def write(self, topic: str, timestamp_ns: int, data: bytes | memoryview) -> None:
        try:
            connection = self._connections[topic]
        except KeyError:
            raise BagError(f"topic {topic} was not added to the bag {self.path}") from None
        self._writer.write(connection, timestamp_ns, data)
        self.counts[topic] += 1

    def flush(self) -> None:
        """Put the messages buffered in the open chunk on disk (a chunk with no message is left open:
        a message-less chunk has no valid time range for indexed readers)."""
        storage = self._writer.storage
        if storage is not None and storage.chunk.msgs:
            storage.close_chunk()

    def close(self) -> None:
        """Write the index, the summary and metadata.yaml; the bag is complete after this."""
        if self._writer.storage is not None:
            self._writer.close()

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BackgroundBagWriter:
    """A BagWriter driven by its own thread through a queue, so that the thread that receives
    messages never waits for the disk (a 12.6 MB tile takes ~35 ms to write).

    At most `max_queued_bytes` wait in the queue; a message beyond that is dropped and counted in
    `dropped`, never lost silently. A write error of the thread (disk full) is raised by the next
    call, and by `close`."""

    _STOP = object()

    def __init__(self, bag: BagWriter, max_queued_bytes: int):
        self.bag = bag
        self.max_queued_bytes = max_queued_bytes
        self.dropped: dict[str, int] = {}
        self.peak_queued_bytes = 0
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._error: Exception | None = None
        self._known_topics: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="bag-writer", daemon=True)
        self._thread.start()

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.bag.counts)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise BagError(f"writing the bag {self.bag.path} failed: {self._error}") from self._error

    def add_topic(self, topic: str, msgtype: str, offered_qos: list[Qos]) -> None:
        self._raise_error()
        if topic in self._known_topics:
            raise BagError(f"topic {topic} is already in the bag {self.bag.path}")
        self.bag.check_topic(topic, msgtype)
        self._known_topics.add(topic)
        self._queue.put((self.bag.add_topic, (topic, msgtype, offered_qos), 0))

    def write(self, topic: str, timestamp_ns: int, data: bytes) -> bool:
        """Queue a message; False if it was dropped because the queue is full."""
        self._raise_error()
        with self._lock:
            if self._queued_bytes + len(data) > self.max_queued_bytes:
                self.dropped[topic] = self.dropped.get(topic, 0) + 1
                return False
            self._queued_bytes += len(data)
            self.peak_queued_bytes = max(self.peak_queued_bytes, self._queued_bytes)
        self._queue.put((self.bag.write, (topic, timestamp_ns, data), len(data)))
        return True

    def flush(self) -> None:
        self._raise_error()
        self._queue.put((self.bag.flush, (), 0))

    def close(self) -> None:
        """Write everything queued, then close the bag."""
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()
        self._raise_error()

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._STOP:
            call, args, size = item
            try:
                if self._error is None:
                    call(*args)
            except Exception as error:  # reported to the caller by the next call; the thread goes on draining
                self._error = error
            with self._lock:
                self._queued_bytes -= size
        try:
            self.bag.close()
        except Exception as error:  # reported by close()
            self._error = self._error or error


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BagMessage:
    topic: str
    msgtype: str
    timestamp_ns: int
    data: bytes


@dataclass
class BagTopic:
    name: str
    msgtype: str
    serialization_format: str
    offered_qos: list[Qos] = field(default_factory=list)


class _RecordError(Exception):
    """A record's bytes do not follow the MCAP format (internal: becomes a problem of the scan)."""


class _Fields:
    """Little-endian MCAP fields read from a byte range."""

    def __init__(self, buffer, start: int, end: int):
        self.buffer, self.pos, self.end = buffer, start, end

    def take(self, size: int) -> int:
        if size < 0 or self.pos + size > self.end:
            raise _RecordError(f"field of {size} bytes runs past the end of its record")
        start, self.pos = self.pos, self.pos + size
        return start

    def uint(self, size: int) -> int:
        start = self.take(size)
        return int.from_bytes(self.buffer[start:start + size], "little")

    def blob(self) -> bytes:
        size = self.uint(4)
        start = self.take(size)
        return bytes(self.buffer[start:start + size])

    def string(self) -> str:
        try:
            return self.blob().decode()
        except UnicodeDecodeError as error:
            raise _RecordError(f"string is not UTF-8 ({error})") from None


@dataclass
class _Channel:
    topic: str
    schema_id: int
    encoding: str
    offered_qos: list[Qos]


class _Scan:
    """One pass over the records of one MCAP file, collecting schemas, channels and problems."""

    def __init__(self, path: Path, buffer, schemas: dict, channels: dict, problems: list[str]):
        self.path, self.buffer, self.size = path, buffer, len(buffer)
        self.schemas, self.channels, self.problems = schemas, channels, problems

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.path.name}: {text}")

    def records(self, with_data: bool) -> Iterator[tuple[int, int, bytes | None]]:
        """(channel id, log time, payload or None) of every readable message, in file order."""
        if bytes(self.buffer[:len(MCAP_MAGIC)]) != MCAP_MAGIC:
            raise BagError(f"{self.path} is not an MCAP file (it does not start with the MCAP magic)")
        pos = len(MCAP_MAGIC)
        while pos < self.size:
            if self.size - pos < _RECORD_HEADER_BYTES:
                self.problem(f"truncated at byte {self.size}: incomplete record header at byte {pos}")
                return
            opcode = self.buffer[pos]
            length = int.from_bytes(self.buffer[pos + 1:pos + _RECORD_HEADER_BYTES], "little")
            body = pos + _RECORD_HEADER_BYTES
            if opcode not in _KNOWN_OPCODES:
                pos = self.resync(pos, f"unknown record opcode 0x{opcode:02x} at byte {pos}")
                continue
            if body + length > self.size:
                next_chunk = self.next_valid_chunk(pos)
                end = self.size if next_chunk is None else next_chunk
                if opcode == _OP_CHUNK:
                    kept = yield from self.cut_chunk(body, end, with_data)
                    detail = (f"the chunk that starts at byte {pos} is cut off at byte {end}; {kept} "
                              f"complete messages of it were kept (its CRC cannot be checked)")
                else:
                    detail = (f"record 0x{opcode:02x} at byte {pos} needs {length} bytes, "
                              f"{end - body} are there")
                if next_chunk is None:
                    self.problem(f"truncated at byte {self.size}: {detail}")
                    return
                self.problem(f"bad record length at byte {pos} (damaged bytes): {detail}")
                pos = next_chunk
                continue
            if opcode == _OP_DATA_END:
                return
            try:
                if opcode == _OP_CHUNK:
                    yield from self.chunk(pos, body, body + length, with_data)
                else:
                    yield from self.record(opcode, body, body + length, with_data)
            except _RecordError as error:
                pos = self.resync(pos, f"bad record 0x{opcode:02x} at byte {pos}: {error}")
                continue
            pos = body + length
        self.problem(f"truncated at byte {self.size}: the file ends without its data-end record "
                     f"(the recorder did not close the bag)")

    def record(self, opcode: int, start: int, end: int, with_data: bool, buffer=None):
        fields = _Fields(self.buffer if buffer is None else buffer, start, end)
        if opcode == _OP_SCHEMA:
            schema_id, name, encoding = fields.uint(2), fields.string(), fields.string()
            self.schemas[schema_id] = (name, encoding)
        elif opcode == _OP_CHANNEL:
            channel_id, schema_id, topic, encoding = (fields.uint(2), fields.uint(2), fields.string(),
                                                      fields.string())
            metadata = _Fields(fields.buffer, fields.take(fields.uint(4)), fields.pos)
            offered = []
            while metadata.pos < metadata.end:
                key, value = metadata.string(), metadata.string()
                if key == "offered_qos_profiles" and value:
                    offered = parse_qos(value)
            self.channels[channel_id] = _Channel(topic, schema_id, encoding, offered)
        elif opcode == _OP_MESSAGE:
            channel_id, _, log_time = fields.uint(2), fields.uint(4), fields.uint(8)
            fields.uint(8)   # publish time
            payload = bytes(fields.buffer[fields.pos:end]) if with_data else None
            yield channel_id, log_time, payload

    def inner_records(self, buffer, start: int, end: int, with_data: bool):
        """The records of a chunk's record area buffer[start:end]."""
        pos = start
        while pos < end:
            if end - pos < _RECORD_HEADER_BYTES:
                raise _RecordError(f"incomplete record header at chunk byte {pos - start}")
            opcode = buffer[pos]
            length = int.from_bytes(buffer[pos + 1:pos + _RECORD_HEADER_BYTES], "little")
            body = pos + _RECORD_HEADER_BYTES
            if body + length > end:
                raise _RecordError(f"record 0x{opcode:02x} at chunk byte {pos - start} needs {length} "
                                   f"bytes, {end - body} are there")
            yield from self.record(opcode, body, body + length, with_data, buffer=buffer)
            pos = body + length

    def chunk_header(self, fields: _Fields) -> tuple[int, int, str, int]:
        fields.uint(16)   # message start and end times
        uncompressed_size, crc = fields.uint(8), fields.uint(4)
        compression = fields.string()
        records_size = fields.uint(8)
        if compression not in DECOMPRESSORS:
            raise _RecordError(f"unknown chunk compression {compression!r}")
        if uncompressed_size > MAX_CHUNK_BYTES:
            raise _RecordError(f"implausible chunk size {uncompressed_size} bytes")
        if not compression and records_size != uncompressed_size:
            raise _RecordError(f"uncompressed chunk of {records_size} bytes says it holds {uncompressed_size}")
        return uncompressed_size, crc, compression, records_size

    def chunk_records(self, start: int, end: int) -> tuple[object, int, int, int]:
        """(buffer, start, end, crc) of the records of the chunk whose content is buffer[start:end]."""
        fields = _Fields(self.buffer, start, end)
        uncompressed_size, crc, compression, records_size = self.chunk_header(fields)
        records_start = fields.take(records_size)
        if fields.pos != end:
            raise _RecordError(f"chunk content is {end - start} bytes, its fields use {fields.pos - start}")
        if not compression:
            return self.buffer, records_start, fields.pos, crc
        try:
            data = DECOMPRESSORS[compression](bytes(self.buffer[records_start:fields.pos]), uncompressed_size)
        except Exception as error:  # each codec raises its own error type for damaged input
            raise _RecordError(f"chunk cannot be decompressed ({compression}: {error})") from None
        if len(data) != uncompressed_size:
            raise _RecordError(f"chunk holds {len(data)} bytes, its header says {uncompressed_size}")
        return data, 0, len(data), crc

    def chunk(self, pos: int, start: int, end: int, with_data: bool):
        buffer, records_start, records_end, crc = self.chunk_records(start, end)
        if crc and _crc32(buffer, records_start, records_end) != crc:
            self.problem(f"chunk at byte {pos} fails its CRC32 check (damaged bytes); the "
                         f"{self._salvage_definitions(buffer, records_start, records_end)} messages it "
                         f"appears to hold were skipped")
            return
        yield from self.inner_records(buffer, records_start, records_end, with_data)

    def _salvage_definitions(self, buffer, start: int, end: int) -> int:
        """Count the messages a damaged chunk appears to hold, and keep the schemas and channels it
        defines that nothing else defined: without them every later message of those topics would
        be lost too."""
        schemas, channels = dict(self.schemas), dict(self.channels)
        count = 0
        try:
            for _ in self.inner_records(buffer, start, end, with_data=False):
                count += 1
        except _RecordError:
            pass
        self.schemas.update(schemas)
        self.channels.update(channels)
        return count

    def summary_definitions(self) -> None:
        """Schemas and channels from the summary section, when the file was closed properly."""
        footer = self.size - len(MCAP_MAGIC) - _RECORD_HEADER_BYTES - _FOOTER_BYTES
        if footer < len(MCAP_MAGIC) or bytes(self.buffer[self.size - len(MCAP_MAGIC):]) != MCAP_MAGIC \
                or self.buffer[footer] != _OP_FOOTER:
            return
        summary_start = int.from_bytes(self.buffer[footer + 9:footer + 17], "little")
        pos = summary_start
        try:
            while 0 < pos < footer:
                opcode = self.buffer[pos]
                length = int.from_bytes(self.buffer[pos + 1:pos + _RECORD_HEADER_BYTES], "little")
                body = pos + _RECORD_HEADER_BYTES
                if body + length > footer:
                    break
                if opcode in (_OP_SCHEMA, _OP_CHANNEL):
                    for _ in self.record(opcode, body, body + length, with_data=False):
                        pass
                pos = body + length
        except _RecordError:
            pass   # a damaged summary: the data section's own definitions are used

    def cut_chunk(self, start: int, end: int, with_data: bool):
        """Yield the complete records of an uncompressed chunk whose content ends early, at `end`;
        return how many messages were yielded."""
        fields = _Fields(self.buffer, start, end)
        kept = 0
        try:
            fields.uint(28)   # times, uncompressed size, CRC
            if not fields.string():
                fields.uint(8)
                for record in self.inner_records(self.buffer, fields.pos, end, with_data):
                    kept += 1
                    yield record
        except _RecordError:
            pass   # the record that was cut off
        return kept

    def next_valid_chunk(self, pos: int) -> int | None:
        candidate = pos
        while (candidate := self.buffer.find(bytes([_OP_CHUNK]), candidate + 1)) >= 0:
            if self.is_valid_chunk(candidate):
                return candidate
        return None

    def resync(self, pos: int, reason: str) -> int:
        """The next offset after `pos` where a valid chunk starts, or the end of the file."""
        next_chunk = self.next_valid_chunk(pos)
        if next_chunk is None:
            self.problem(f"{reason}; no valid chunk after it, the rest of the file "
                         f"({self.size - pos} bytes) was skipped")
            return self.size
        self.problem(f"{reason}; bytes {pos}..{next_chunk} were skipped")
        return next_chunk

    def is_valid_chunk(self, pos: int) -> bool:
        if pos + _RECORD_HEADER_BYTES > self.size:
            return False
        length = int.from_bytes(self.buffer[pos + 1:pos + _RECORD_HEADER_BYTES], "little")
        start = pos + _RECORD_HEADER_BYTES
        if start + length > self.size:
            return False
        try:
            buffer, records_start, records_end, crc = self.chunk_records(start, start + length)
        except _RecordError:
            return False
        return bool(crc) and _crc32(buffer, records_start, records_end) == crc


def _crc32(buffer, start: int, end: int) -> int:
    with memoryview(buffer) as view, view[start:end] as part:
        return zlib.crc32(part)


class BagReader:
    """Every readable message of a rosbag2 MCAP bag (a bag directory or one .mcap file), in file order.

        reader = BagReader(path)
        reader.topics()                    # {name: BagTopic}
        for message in reader.messages():  # BagMessage(topic, msgtype, timestamp_ns, data)
            ...
    After the last readable message, `messages()` raises DamagedBagError if anything was lost.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.files = self._mcap_files()
        self.problems: list[str] = []

    def _mcap_files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            raise BagError(f"no bag at {self.path}: expected a bag directory or an .mcap file")
        files = sorted(self.path.glob("*.mcap"))
        if not files:
            found = ", ".join(p.name for p in sorted(self.path.iterdir())) or "nothing"
            raise BagError(f"bag directory {self.path} holds no .mcap file (found: {found}); only MCAP "
                           f"storage is supported")
        return files

    def _scan(self, with_data: bool, problems: list[str]) -> Iterator[tuple[BagTopic, int, bytes | None]]:
        for path in self.files:
            schemas, channels, topics = {}, {}, {}
            unknown_channels: dict[int, int] = {}
            with path.open("rb") as stream:
                if os.fstat(stream.fileno()).st_size == 0:
                    problems.append(f"{path.name}: the file is empty")
                    continue
                with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                    scan = _Scan(path, buffer, schemas, channels, problems)
                    scan.summary_definitions()
                    for channel_id, log_time, payload in scan.records(with_data):
                        topic = topics.get(channel_id) or self._topic(channel_id, schemas, channels)
                        if topic is None:
                            unknown_channels[channel_id] = unknown_channels.get(channel_id, 0) + 1
                            continue
                        topics[channel_id] = topic
                        yield topic, log_time, payload
            for channel_id, count in unknown_channels.items():
                problems.append(f"{path.name}: {count} messages of channel {channel_id} were skipped: "
                                f"its channel record was lost")

    @staticmethod
    def _topic(channel_id: int, schemas: dict, channels: dict) -> BagTopic | None:
        channel = channels.get(channel_id)
        if channel is None or channel.schema_id not in schemas:
            return None
        return BagTopic(channel.topic, schemas[channel.schema_id][0], channel.encoding, channel.offered_qos)

    def topics(self) -> dict[str, BagTopic]:
        """The topics that have readable messages (reads the records' headers, not their data)."""
        found = {}
        for topic, _, _ in self._scan(with_data=False, problems=[]):
            found.setdefault(topic.name, topic)
        return found

    def messages(self, topics: set[str] | None = None) -> Iterator[BagMessage]:
        self.problems = []
        count = 0
        for topic, log_time, payload in self._scan(with_data=True, problems=self.problems):
            if topics is None or topic.name in topics:
                count += 1
                yield BagMessage(topic.name, topic.msgtype, log_time, payload)
        if self.problems:
            raise DamagedBagError(self.path, self.problems, count)

