"""Scalars of a run's TensorBoard event files, read without TensorFlow.

`core/metric_writer.py` writes scalars through tensorboardX into
`MODEL_DIR/events.out.tfevents.*`: TFRecord files (each record: uint64
length, masked CRC32C of the length, the payload, masked CRC32C of the
payload) whose payloads are `Event` protos. tensorboardX (a requirement)
ships the `Event` proto and a CRC32C, so reading needs neither TensorFlow nor
the `tensorboard` package. Only length headers are checked (cheap); a record
cut short by a writer that was killed ends that file's reading with a note.
"""

import dataclasses
import glob
import os
import struct
from typing import Dict, List, Tuple

from tensorboardX import crc32c
from tensorboardX.proto import event_pb2

EVENTS_GLOB = "events.out.tfevents.*"
_HEADER = struct.Struct("<QI")
_FOOTER = 4


@dataclasses.dataclass
class Scalars:
  """{tag: [(step, value)] sorted by step}, and what could not be read."""
  series: Dict[str, List[Tuple[int, float]]]
  files: List[str]
  problems: List[str]

  def tags(self, prefix: str = "") -> List[str]:
    return [t for t in self.series if t.startswith(prefix)]


def _masked_crc(data: bytes) -> int:
  crc = crc32c.crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: str) -> Tuple[List[bytes], str]:
  """The record payloads of one TFRecord file, and a problem ('' if none)."""
  with open(path, "rb") as f:
    data = f.read()
  records, pos = [], 0
  while pos < len(data):
    if pos + _HEADER.size > len(data):
      return records, f"{path}: truncated record header at byte {pos}"
    length, length_crc = _HEADER.unpack_from(data, pos)
    if _masked_crc(data[pos:pos + 8]) != length_crc:
      return records, f"{path}: corrupt record length at byte {pos}"
    start = pos + _HEADER.size
    end = start + length
    if end + _FOOTER > len(data):
      return records, f"{path}: truncated record at byte {pos}"
    records.append(data[start:end])
    pos = end + _FOOTER
  return records, ""


def _scalar_value(value) -> Tuple[bool, float]:
  """(is a scalar, its value) of one `Summary.Value`."""
  if value.HasField("simple_value"):
    return True, float(value.simple_value)
  if value.HasField("tensor"):
    t = value.tensor
    for field in ("float_val", "double_val", "int64_val", "int_val"):
      vals = getattr(t, field)
      if len(vals) == 1:
        return True, float(vals[0])
  return False, 0.0


def read_scalars(model_dir: str) -> Scalars:
  """Every scalar of the run's event files, merged by tag.

  Files are read oldest first (by the wall time of their events), so where a
  resumed run or a later evaluation wrote a step again, the later value wins.
  """
  files = sorted(glob.glob(os.path.join(model_dir, EVENTS_GLOB)))
  problems = []
  stamped = []  # (wall_time, tag, step, value)
  for path in files:
    try:
      records, problem = read_records(path)
    except OSError as e:
      problems.append(f"{path}: {e.strerror or e}")
      continue
    if problem:
      problems.append(problem)
    for raw in records:
      event = event_pb2.Event()
      try:
        event.ParseFromString(raw)
      except Exception:  # pylint: disable=broad-except
        problems.append(f"{path}: an event that is not an Event proto")
        break
      if not event.HasField("summary"):
        continue
      for value in event.summary.value:
        ok, v = _scalar_value(value)
        if ok:
          stamped.append((event.wall_time, value.tag, int(event.step), v))
  stamped.sort(key=lambda x: x[0])
  merged: Dict[str, Dict[int, float]] = {}
  for _, tag, step, v in stamped:
    merged.setdefault(tag, {})[step] = v
  series = {tag: sorted(by_step.items()) for tag, by_step in merged.items()}
  return Scalars(series=series, files=files, problems=problems)
