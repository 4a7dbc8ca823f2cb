"""Write rosbag2 MCAP bags (bag_format.py) of raw CDR messages: the recorder node's storage.

Every chunk carries a CRC32, so a reader can tell a damaged chunk from a good one; the schema text of
every topic (action feedback included) hashes to its declared type hash, so readers that check it
(rosbags' AnyReader) read the bag.
"""
import queue
import re
import threading
import zlib
from pathlib import Path

from rosbags.interfaces import Qos
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.rosbag2.storage_mcap import McapWriter

from wsi.bag_format import (CHUNK_CRC_OFFSET, INTERFACE_PACKAGE, RECORD_HEADER_BYTES, ROSBAG2_VERSION, BagError,
                            find_interface_directory, wsi_typestore)


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
        self.bio.seek(chunk_start + RECORD_HEADER_BYTES + CHUNK_CRC_OFFSET)
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
