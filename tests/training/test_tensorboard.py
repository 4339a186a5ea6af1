"""Our TensorBoard event files decode with the real protobuf classes and carry valid CRCs."""

import struct

import pytest

from matquant_jax.training import tensorboard


def test_crc32c_matches_published_check_values():
  assert tensorboard.crc32c(b"") == 0
  assert tensorboard.crc32c(b"123456789") == 0xE3069283          # the CRC-32C check value
  assert tensorboard.crc32c(bytes(32)) == 0x8A9136AA             # RFC 3720 B.4
  assert tensorboard.crc32c(bytes(range(32))) == 0x46DD794E      # RFC 3720 B.4


def _masked(data):  # TFRecord's masking, as TensorFlow's record reader checks it
  c = tensorboard.crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path):
  data, out, i = path.read_bytes(), [], 0
  while i < len(data):
    (n,) = struct.unpack_from("<Q", data, i)
    (len_crc,) = struct.unpack_from("<I", data, i + 8)
    payload = data[i + 12:i + 12 + n]
    (data_crc,) = struct.unpack_from("<I", data, i + 12 + n)
    assert len_crc == _masked(data[i:i + 8]) and data_crc == _masked(payload)
    out.append(payload)
    i += 16 + n
  return out


def test_scalars_decode_as_tensorboard_events(tmp_path):
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  w = tensorboard.ScalarWriter(tmp_path / "tb")
  w.add_scalars({"train/loss": 2.5, "train/ce_int2": -1e-3}, step=7)
  w.add_scalars({"train/loss": 2.25}, step=2**40)
  w.close()
  (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
  events = [event_pb2.Event.FromString(r) for r in _records(path)]
  assert events[0].file_version == "brain.Event:2"
  assert [e.step for e in events[1:]] == [7, 2**40]
  assert all(e.wall_time > 1.6e9 for e in events)
  got = [{v.tag: v.simple_value for v in e.summary.value} for e in events[1:]]
  assert got[0] == pytest.approx({"train/loss": 2.5, "train/ce_int2": -1e-3})
  assert got[1] == {"train/loss": 2.25}
