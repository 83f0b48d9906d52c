"""A sweep point's run directory: its evaluations, whether it finished, its
records.

The trainer writes `MODEL_DIR/eval/eval_step<N>.json` at every evaluation
(`{"step": N, "validation": {...}, "test": {...}, ...}`, every split it
evaluated) and `MODEL_DIR/checkpoint_<N>/` when a checkpoint is committed
(orbax writes into a temporary name and renames). A run is finished when both
exist for its last step: the final evaluation runs just before the final
checkpoint is saved, and a run stopped by SIGTERM saves a checkpoint but
neither reaches the last step nor evaluates there, though it exits 0.

The sweep adds three small files: `point.json` (the point's bindings and the
exact command), `status.json` (the last attempt: exit status, seconds) and
`DONE.json` (written once the run is finished; informative -- the check
above is what counts, so runs launched by other means are seen finished too).
"""

import json
import math
import os
import re
import time
from typing import Any, Dict, List, Optional

EVAL_NAME = "eval"
POINT_FILE = "point.json"
STATUS_FILE = "status.json"
DONE_FILE = "DONE.json"
LOG_FILE = "train.log"


def read_json(path: str) -> Optional[Any]:
  """The JSON in `path`, or None when it is missing or not (yet) whole."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path: str, value: Any) -> None:
  """Writes atomically (a killed sweep leaves the old file or the new)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)


def eval_steps(model_dir: str, name: str = EVAL_NAME) -> List[int]:
  """Steps of `eval/<name>_step<N>.json`, ascending."""
  pattern = re.compile(rf"{re.escape(name)}_step(\d+)\.json")
  try:
    files = os.listdir(os.path.join(model_dir, "eval"))
  except OSError:
    return []
  return sorted(int(m.group(1)) for m in map(pattern.fullmatch, files) if m)


def read_eval(model_dir: str, step: int,
              name: str = EVAL_NAME) -> Optional[Dict[str, Any]]:
  return read_json(os.path.join(model_dir, "eval", f"{name}_step{step}.json"))


def evaluations(model_dir: str,
                name: str = EVAL_NAME) -> Dict[int, Dict[str, Any]]:
  """{step: results} of every readable evaluation file of the run."""
  out = {}
  for step in eval_steps(model_dir, name):
    results = read_eval(model_dir, step, name)
    if isinstance(results, dict):
      out[step] = results
  return out


def metric(results: Optional[Dict[str, Any]], split: str,
           name: str) -> Optional[float]:
  """results[split][name] when it is a finite number, else None."""
  value = (results or {}).get(split)
  value = value.get(name) if isinstance(value, dict) else None
  if isinstance(value, (int, float)) and not isinstance(value, bool) and (
      math.isfinite(value)):
    return float(value)
  return None


def has_checkpoint(model_dir: str, step: int) -> bool:
  return os.path.isdir(os.path.join(model_dir, f"checkpoint_{step}"))


def checkpoint_steps(model_dir: str) -> List[int]:
  """Steps of the committed `checkpoint_<N>` directories, ascending."""
  try:
    names = os.listdir(model_dir)
  except OSError:
    return []
  return sorted(int(m.group(1)) for m in
                (re.fullmatch(r"checkpoint_(\d+)", n) for n in names)
                if m and os.path.isdir(os.path.join(model_dir, m.group(0))))


def set_aside_evals_after_resume_point(model_dir: str,
                                       name: str = EVAL_NAME) -> List[int]:
  """Moves evaluations newer than the newest checkpoint to eval/superseded/.

  A rerun resumes from that checkpoint (or step 0), so evaluations of later
  steps come from the attempt that was stopped; the rerun writes them again
  (equal on CPU, where training is deterministic, but not necessarily on
  GPU). Returns the steps moved.
  """
  resume = max(checkpoint_steps(model_dir), default=0)
  stale = [s for s in eval_steps(model_dir, name) if s > resume]
  if stale:
    aside = os.path.join(model_dir, "eval", "superseded")
    os.makedirs(aside, exist_ok=True)
    for step in stale:
      base = f"{name}_step{step}.json"
      os.replace(os.path.join(model_dir, "eval", base),
                 os.path.join(aside, base))
  return stale


def is_finished(model_dir: str, train_steps: int,
                name: str = EVAL_NAME) -> bool:
  """The final evaluation is readable and the final checkpoint committed."""
  return (isinstance(read_eval(model_dir, train_steps, name), dict)
          and has_checkpoint(model_dir, train_steps))


def mark_done(model_dir: str, train_steps: int, seconds: float) -> None:
  write_json(os.path.join(model_dir, DONE_FILE), {
      "train_steps": train_steps, "seconds": round(seconds, 1),
      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})


def write_status(model_dir: str, state: str, **fields) -> None:
  """Records the last attempt: state is running, finished, failed or
  interrupted."""
  write_json(os.path.join(model_dir, STATUS_FILE), {
      "state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields})


def read_status(model_dir: str) -> Dict[str, Any]:
  status = read_json(os.path.join(model_dir, STATUS_FILE))
  return status if isinstance(status, dict) else {}


def log_tail(model_dir: str, lines: int = 8) -> str:
  """The last lines of the point's train.log (what a failure printed)."""
  try:
    with open(os.path.join(model_dir, LOG_FILE), errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""
