"""Every point's train configuration parsed and checked before anything runs.

`python -m recsys_jax.train` would reject a mistyped grid name (a macro
nothing reads), a value of the wrong type or a missing required value -- but
only once its point starts, possibly hours into a sweep. Here each point's
flags go through the same parse and checks (`cli.gin_utils.parse_gin`, with
gin/runs/train.gin first) in this process, in well under a second per point
once the configurables are imported, and the values the sweep needs are read
back: the number of training steps (a point is finished when its evaluation
at that step exists) and the evaluation settings the table depends on. The
trainer evaluates only with EVAL_EVERY set (every N steps and at the last),
so a point without it is refused.

The parse imports the modules the gin files register (JAX, TensorFlow), so
accelerators are hidden from both while it runs: this process parses, it
never trains.
"""

import contextlib
import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence

from recsys_jax.sweeps import grid as grid_lib

RUN_GIN = "runs/train.gin"


class PointConfigError(ValueError):
  """A point whose train configuration does not parse; one line."""


@dataclasses.dataclass(frozen=True)
class RunFacts:
  """What a point's parsed configuration says about its run directory.

  Attributes:
    train_steps: the step of the final checkpoint and evaluation.
    eval_every: evaluation period (the trainer also evaluates the last step).
    checkpoint_every: checkpoint period.
    keep_checkpoints: how many checkpoints the run keeps.
    eval_splits: the ranking evaluation's splits, when it is an EvalConfig
      whose splits could be read; else None.
  """
  train_steps: int
  eval_every: int
  checkpoint_every: Optional[int]
  keep_checkpoints: Optional[int]
  eval_splits: Optional[tuple]


@contextlib.contextmanager
def _accelerators_hidden():
  """Parsing imports JAX and TF; neither may take a GPU from the runs."""
  hidden = {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu",
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL",
                                                   "2")}
  saved = {k: os.environ.get(k) for k in hidden}
  os.environ.update(hidden)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


_MISSING = object()


def _resolved(selector: str) -> Any:
  """The value bound to `selector`, through macros; _MISSING if unbound."""
  import gin  # pylint: disable=g-import-not-at-top
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  try:
    value = gin.query_parameter(selector)
  except ValueError:
    return _MISSING
  seen = set()
  while (isinstance(value, gin_config.ConfigurableReference)
         and value.config_key[1] == "gin.macro"
         and value.config_key[0] not in seen):
    seen.add(value.config_key[0])
    try:
      value = gin.query_parameter(f"{value.config_key[0]}/macro.value")
    except ValueError:
      return _MISSING
  return value


def _int_or_none(value: Any) -> Optional[int]:
  return value if isinstance(value, int) and not isinstance(value, bool) \
      else None


def _eval_splits(evaluation: Any) -> Optional[tuple]:
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  if not (isinstance(evaluation, gin_config.ConfigurableReference)
          and evaluation.config_key[1].endswith("EvalConfig")):
    return None
  splits = _resolved(f"{evaluation.config_key[1]}.splits")
  return tuple(splits) if isinstance(splits, (tuple, list)) else None


def _facts(where: str) -> RunFacts:
  train_steps = _resolved("trainer.TrainLoopConfig.train_steps")
  if _int_or_none(train_steps) is None or train_steps < 1:
    raise PointConfigError(
        f"{where}: trainer.TrainLoopConfig.train_steps is {train_steps!r}; "
        "the sweep needs a positive int (e.g. --gin.TRAIN_STEPS=1000)")
  evaluation = _resolved("runs.train.evaluation")
  if evaluation is None:
    raise PointConfigError(
        f"{where}: runs.train.evaluation is None; a sweep compares points by "
        "their evaluation (the default EVALUATION of gin/runs/train.gin)")
  eval_every = _resolved("trainer.TrainLoopConfig.eval_every")
  if _int_or_none(eval_every) is None or eval_every < 1:
    # The trainer evaluates only with eval_every set (then also at the last
    # step); without it a point would never be seen finished.
    raise PointConfigError(
        f"{where}: trainer.TrainLoopConfig.eval_every is {eval_every!r}; a "
        "sweep reads the evaluations the trainer writes: set "
        "--gin.EVAL_EVERY=N (N = TRAIN_STEPS: only at the end)")
  return RunFacts(
      train_steps=train_steps,
      eval_every=eval_every,
      checkpoint_every=_int_or_none(
          _resolved("trainer.TrainLoopConfig.checkpoint_every")),
      keep_checkpoints=_int_or_none(
          _resolved("trainer.TrainLoopConfig.keep_checkpoints")),
      eval_splits=_eval_splits(evaluation))


def _grid_part(message: str, axes: Sequence[grid_lib.Axis]) -> str:
  """`--grid part 'X=[...]'` when the message names a grid flag, else ''."""
  for axis in axes:
    if f"--gin.{axis.name}=" in message:
      return f"--grid part {axis.text!r}: "
  return ""


def check_points(points: Sequence[grid_lib.Point],
                 model_dirs: Dict[str, str],
                 gin_files: Sequence[str],
                 gin_bindings: Sequence[str],
                 gin_search_paths: Sequence[str] = (),
                 axes: Sequence[grid_lib.Axis] = ()) -> Dict[str, RunFacts]:
  """Parses and checks each point's train configuration; {name: RunFacts}.

  Args:
    points: the grid's points.
    model_dirs: {point name: its MODEL_DIR}.
    gin_files: the sweep's --gin_file values (train.gin comes first).
    gin_bindings: the sweep's own bindings (`NAME = VALUE`), before the
      point's.
    gin_search_paths: --gin_search_paths.
    axes: the grid's axes (to name the grid part of an error).

  Raises:
    PointConfigError: one line naming the point, the grid part or flag, why.
  """
  with _accelerators_hidden():
    return _check(points, model_dirs, gin_files, gin_bindings,
                  gin_search_paths, axes)


def _check(points, model_dirs, gin_files, gin_bindings, gin_search_paths,
           axes) -> Dict[str, RunFacts]:
  import gin  # pylint: disable=g-import-not-at-top
  from recsys_jax.cli import gin_utils  # pylint: disable=g-import-not-at-top
  facts = {}
  try:
    for point in points:
      bindings: List[str] = list(gin_bindings) + [
          f"{n} = {v}" for n, v in point.bindings] + [
              f"MODEL_DIR = {model_dirs[point.name]!r}"]
      gin.clear_config()
      try:
        gin_utils.parse_gin([RUN_GIN] + list(gin_files), bindings,
                            gin_search_paths)
      except gin_utils.GinConfigError as e:
        raise PointConfigError(
            f"{_grid_part(str(e), axes)}point {point.name}: gin "
            f"configuration error: {e}") from e
      facts[point.name] = _facts(f"point {point.name}")
  finally:
    gin.clear_config()
  return facts
