"""TensorBoard scalars (tensorboardX event files), written by process 0 only."""

from typing import Mapping

import jax


class MetricWriter:
  """`write_scalars(step, {name: value})` into MODEL_DIR's event files."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(logdir=logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    if self._writer is None:
      return
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(v), global_step=int(step))

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
