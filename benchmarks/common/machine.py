"""The machine and run a measurement comes from, and writing results."""

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

_VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                     "seqio", "tensorflow", "numpy", "torch", "recbole")


def load_average() -> List[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def memory_gib() -> Optional[float]:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def package_versions() -> Dict[str, str]:
  out = {"python": platform.python_version()}
  for name in _VERSION_PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def machine_info() -> Dict[str, Any]:
  """CPU, cores, memory, versions, date, load and the exact command."""
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = os.cpu_count()
  return {
      "cpu_model": cpu_model(),
      "logical_cores": os.cpu_count(),
      "cores_usable": affinity,
      "memory_gib": memory_gib(),
      "platform": platform.platform(),
      "versions": package_versions(),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "load_average_start": load_average(),
      "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
      "cwd": os.getcwd(),
  }


def write_result(path: str, payload: Dict[str, Any],
                 machine: Optional[Dict[str, Any]] = None) -> str:
  """Writes `payload` plus machine info (and the load at the end) as JSON."""
  machine = dict(machine or machine_info())
  machine["load_average_end"] = load_average()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"machine": machine, **payload}, f, indent=2, sort_keys=False)
    f.write("\n")
  return path


def stats(values: Sequence[float]) -> Dict[str, Any]:
  """Median / min / max of repeated measurements, and the values."""
  values = [float(v) for v in values]
  return {"median": statistics.median(values), "min": min(values),
          "max": max(values), "n": len(values), "values": values}
