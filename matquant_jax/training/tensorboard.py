"""TensorBoard scalar event files, written without tensorboardX or TensorFlow.

tensorboardX's SummaryWriter imports torch whenever torch is installed (1.3-2.9 s and several
hundred MB per training process, for a few scalars). Scalars need only two small protobuf
messages in TFRecord framing, so they are encoded here:

  record = len (uint64 LE) · masked_crc32c(len) · data · masked_crc32c(data)
  Event   {1: wall_time double, 2: step int64, 3: file_version string, 5: summary Summary}
  Summary {1: repeated Value {1: tag string, 2: simple_value float}}
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1   # Castagnoli, reflected
    table.append(c)
  return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1   # int64 fields encode negatives as 10-byte two's complement
  out = bytearray()
  while n >= 0x80:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
  msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)   # fields 1, 2
  if file_version is not None:
    msg += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
        for tag, value in scalars.items())
    msg += _bytes_field(5, values)
  return msg


def record(data: bytes) -> bytes:
  """One TFRecord: the framing TensorBoard's event-file reader checks."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data
          + struct.pack("<I", _masked_crc(data)))


class ScalarWriter:
  """Appends scalar summaries to a new `events.out.tfevents.*` file in `logdir`."""

  def __init__(self, logdir: str | pathlib.Path):
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self._file = open(self.path, "ab")
    self._file.write(record(_event(0, now, file_version="brain.Event:2")))

  def add_scalars(self, scalars: dict[str, float], step: int) -> None:
    self._file.write(record(_event(step, time.time(),
                                   scalars={k: float(v) for k, v in scalars.items()})))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()
