"""Read rosbag2 MCAP bags (bag_format.py): the player's source.

`BagReader` does not trust the bag's index: it walks the MCAP records in file order, so a bag whose
recorder was killed (no index, no metadata.yaml) or whose bytes were damaged still gives back every
message that can be read, and then raises `DamagedBagError` saying what was lost and where.
"""
import mmap
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rosbags.interfaces import Qos
from rosbags.rosbag2.metadata import parse_qos
from rosbags.rosbag2.storage_mcap import DECOMPRESSORS

from wsi.bag_format import MCAP_MAGIC, RECORD_HEADER_BYTES, BagError

# The largest chunk this reader accepts: far above one 2048 x 2048 x 3 tile, far below a wrong length.
MAX_CHUNK_BYTES = 1 << 31

_OP_FOOTER, _OP_SCHEMA, _OP_CHANNEL, _OP_MESSAGE, _OP_CHUNK, _OP_DATA_END = 0x02, 0x03, 0x04, 0x05, 0x06, 0x0F
_FOOTER_BYTES = 20                # summary start (u64), summary offset start (u64), summary CRC (u32)
_KNOWN_OPCODES = set(range(0x01, 0x11))


class DamagedBagError(BagError):
    """A bag was truncated or corrupt; `problems` says what could not be read and where."""

    def __init__(self, path: Path, problems: list[str], messages_read: int):
        self.path, self.problems, self.messages_read = path, problems, messages_read
        super().__init__(f"damaged bag {path}: {'; '.join(problems)} "
                         f"({messages_read} readable messages were read)")


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
            if self.size - pos < RECORD_HEADER_BYTES:
                self.problem(f"truncated at byte {self.size}: incomplete record header at byte {pos}")
                return
            opcode = self.buffer[pos]
            length = int.from_bytes(self.buffer[pos + 1:pos + RECORD_HEADER_BYTES], "little")
            body = pos + RECORD_HEADER_BYTES
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
            if end - pos < RECORD_HEADER_BYTES:
                raise _RecordError(f"incomplete record header at chunk byte {pos - start}")
            opcode = buffer[pos]
            length = int.from_bytes(buffer[pos + 1:pos + RECORD_HEADER_BYTES], "little")
            body = pos + RECORD_HEADER_BYTES
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
        footer = self.size - len(MCAP_MAGIC) - RECORD_HEADER_BYTES - _FOOTER_BYTES
        if footer < len(MCAP_MAGIC) or bytes(self.buffer[self.size - len(MCAP_MAGIC):]) != MCAP_MAGIC \
                or self.buffer[footer] != _OP_FOOTER:
            return
        summary_start = int.from_bytes(self.buffer[footer + 9:footer + 17], "little")
        pos = summary_start
        try:
            while 0 < pos < footer:
                opcode = self.buffer[pos]
                length = int.from_bytes(self.buffer[pos + 1:pos + RECORD_HEADER_BYTES], "little")
                body = pos + RECORD_HEADER_BYTES
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
        if pos + RECORD_HEADER_BYTES > self.size:
            return False
        length = int.from_bytes(self.buffer[pos + 1:pos + RECORD_HEADER_BYTES], "little")
        start = pos + RECORD_HEADER_BYTES
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

