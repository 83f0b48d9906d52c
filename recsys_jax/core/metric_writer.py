"""TensorBoard scalars (tensorboardX event files), written by process 0 only."""

import importlib
import sys
import threading
from types import ModuleType
from typing import Mapping

import jax

_IMPORT_LOCK = threading.Lock()


def import_tensorboardx() -> ModuleType:
  """The `tensorboardX` module, imported without importing torch.

  tensorboardX's writer module imports torch whenever it is installed (only
  to name `torch.Tensor` in type hints); that import costs about 2 s of CPU
  in every training and evaluation process, and nothing here passes torch
  tensors. While tensorboardX is first imported, `import torch` fails as if
  torch were not installed (tensorboardX catches that ImportError); torch
  imports normally afterwards. Where torch or tensorboardX is already loaded,
  this is a plain import.
  """
  with _IMPORT_LOCK:
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
      return importlib.import_module("tensorboardX")
    sys.modules["torch"] = None  # `import torch` raises ImportError
    try:
      return importlib.import_module("tensorboardX")
    finally:
      if sys.modules.get("torch", False) is None:
        del sys.modules["torch"]


class MetricWriter:
  """`write_scalars(step, {name: value})` into MODEL_DIR's event files."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      self._writer = import_tensorboardx().SummaryWriter(logdir=logdir)

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
