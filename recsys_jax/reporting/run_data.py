"""What a run directory holds for the report: evaluations, events, config.

A run directory (MODEL_DIR) as the runs leave it:
  eval/<name>_step<N>.json   one per evaluation (`evaluator.write_results`):
                             `eval` from training and recsys_jax.eval, other
                             names from `EVAL_NAME` (e.g. `eval_exported`)
  events.out.tfevents.*      TensorBoard scalars (`core/metric_writer.py`)
  config.gin                 the operative configuration of the run
  predict/<split>_step<N>[.process<i>].jsonl
                             recsys_jax.predict's per-user output

Only a missing directory or one without any evaluation is an error
(`RunError`); every other missing or unreadable part is recorded in
`Run.problems` and reported in the page.
"""

import dataclasses
import glob
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

from recsys_jax.reporting import events

EVAL_SUBDIR = "eval"
PREDICT_SUBDIR = "predict"
CONFIG_FILE = "config.gin"
# The main evaluation, in order of preference: training's and
# recsys_jax.eval's own, then an exported model's.
MAIN_EVAL_NAMES = ("eval", "eval_exported")

_EVAL_FILE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+?)_step(?P<step>\d+)\.json$")
_PREDICT_FILE = re.compile(
    r"^(?P<split>[A-Za-z0-9_-]+)_step(?P<step>\d+)(?:\.process\d+)?\.jsonl$")


class RunError(ValueError):
  """A --model_dir the report cannot use at all (one line, naming it)."""


@dataclasses.dataclass
class EvalFile:
  """One `eval/<name>_step<step>.json`: its results without the `step` key."""
  name: str
  step: int
  path: str
  results: Dict[str, Any]


@dataclasses.dataclass
class PredictOutput:
  """The predict JSONL files of one split and step (one per process)."""
  split: str
  step: int
  paths: List[str]


@dataclasses.dataclass
class Run:
  """Everything the report reads from one run directory."""
  label: str
  model_dir: str
  evals: Dict[str, List[EvalFile]]  # name -> files sorted by step
  main_eval: str
  scalars: events.Scalars
  config_text: Optional[str]
  predictions: List[PredictOutput]
  problems: List[str]

  @property
  def history(self) -> List[EvalFile]:
    """The main evaluation at every step it was run."""
    return self.evals[self.main_eval]

  @property
  def latest(self) -> EvalFile:
    return self.history[-1]

  def latest_of(self, name: str) -> Optional[EvalFile]:
    files = self.evals.get(name)
    return files[-1] if files else None


def _read_evals(model_dir: str, problems: List[str]
                ) -> Dict[str, List[EvalFile]]:
  evals: Dict[str, List[EvalFile]] = {}
  for path in sorted(glob.glob(os.path.join(model_dir, EVAL_SUBDIR, "*.json"))):
    m = _EVAL_FILE.match(os.path.basename(path))
    if not m:
      continue
    try:
      with open(path) as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      problems.append(f"{path}: not JSON (line {e.lineno}: {e.msg}); skipped")
      continue
    except OSError as e:
      problems.append(f"{path}: {e.strerror or e}; skipped")
      continue
    if not isinstance(data, dict):
      problems.append(f"{path}: expected a JSON object of results; skipped")
      continue
    results = {k: v for k, v in data.items() if k != "step"}
    evals.setdefault(m["name"], []).append(
        EvalFile(m["name"], int(m["step"]), path, results))
  for files in evals.values():
    files.sort(key=lambda e: e.step)
  return evals


def _read_predictions(model_dir: str) -> List[PredictOutput]:
  grouped: Dict[tuple, List[str]] = {}
  for path in sorted(glob.glob(os.path.join(model_dir, PREDICT_SUBDIR,
                                            "*.jsonl"))):
    m = _PREDICT_FILE.match(os.path.basename(path))
    if m:
      grouped.setdefault((m["split"], int(m["step"])), []).append(path)
  return [PredictOutput(split, step, paths)
          for (split, step), paths in sorted(grouped.items())]


def _main_eval_name(evals: Dict[str, List[EvalFile]]) -> str:
  for name in MAIN_EVAL_NAMES:
    if name in evals:
      return name
  return sorted(evals)[0]


def unique_labels(model_dirs: Sequence[str]) -> List[str]:
  """Short run names: each directory's basename, with as many parent
  directories as it takes to tell the runs apart."""
  parts = [os.path.normpath(os.path.abspath(d)).split(os.sep)
           for d in model_dirs]
  depth = 1
  while True:
    labels = ["/".join(p[-depth:]) for p in parts]
    if len(set(labels)) == len(labels) or depth >= max(map(len, parts)):
      return labels
    depth += 1


def load_run(model_dir: str, label: Optional[str] = None) -> Run:
  """Reads one run directory; RunError if it is missing or has no eval."""
  if not os.path.isdir(model_dir):
    what = "is not a directory" if os.path.exists(model_dir) else (
        "does not exist")
    raise RunError(f"--model_dir={model_dir} {what}")
  problems: List[str] = []
  evals = _read_evals(model_dir, problems)
  if not evals:
    extra = f" ({'; '.join(problems)})" if problems else ""
    raise RunError(
        f"--model_dir={model_dir} has no evaluation output: expected "
        f"{os.path.join(model_dir, EVAL_SUBDIR, 'eval_step<N>.json')} (train "
        f"with an EVALUATION, or run python -m recsys_jax.eval){extra}")
  scalars = events.read_scalars(model_dir)
  problems.extend(scalars.problems)
  config_text = None
  config_path = os.path.join(model_dir, CONFIG_FILE)
  try:
    with open(config_path, errors="replace") as f:
      config_text = f.read()
  except FileNotFoundError:
    pass
  except OSError as e:
    problems.append(f"{config_path}: {e.strerror or e}")
  return Run(label=label or os.path.basename(os.path.normpath(model_dir)),
             model_dir=model_dir, evals=evals,
             main_eval=_main_eval_name(evals), scalars=scalars,
             config_text=config_text,
             predictions=_read_predictions(model_dir), problems=problems)


def load_runs(model_dirs: Sequence[str]) -> List[Run]:
  """`load_run` of each directory, labelled by `unique_labels`."""
  return [load_run(d, label)
          for d, label in zip(model_dirs, unique_labels(model_dirs))]
