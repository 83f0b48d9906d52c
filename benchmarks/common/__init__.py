"""Shared pieces of the benchmarks, one module per concern.

  constants.py          paths, the issue's fixed sizes and targets
  machine.py            machine and run metadata, `write_result`, `stats`
  processes.py          pinned multi-process launches, `Turns` (A/B windows)
  flops.py              analytic Bert4Rec FLOPs, the measured matmul peak
  profiles.py           time per op / category from a jax.profiler trace
  data.py               the benchmarks' prepared datasets
  results.py            reading round files, formatting figures
  throughput_report.py, records_report.py, summary.py   RESULTS.md

The benchmark scripts use the names re-exported here (`common.machine_info`,
...). Importable from both the project's virtualenv and RecBole's own (which
has no JAX): module top levels use only the standard library; JAX and the
project are imported inside the functions that need them.

`python -m benchmarks.common summarize` rewrites benchmarks/RESULTS.md from
benchmarks/results/*.json.
"""

# pylint: disable=g-importing-member
from benchmarks.common.constants import BEAUTY_NUM_ITEMS
from benchmarks.common.constants import BEAUTY_RAW
from benchmarks.common.constants import ISSUE_SIZES
from benchmarks.common.constants import MFU_TARGET
from benchmarks.common.constants import REPO_ROOT
from benchmarks.common.constants import RESULTS_DIR
from benchmarks.common.constants import SHARED_DATA
from benchmarks.common.constants import TARGETS
from benchmarks.common.data import ensure_beauty_or_synthetic
from benchmarks.common.data import ensure_synthetic
from benchmarks.common.flops import bert4rec_flops_per_row
from benchmarks.common.flops import measure_matmul_peak
from benchmarks.common.flops import train_flops_per_step
from benchmarks.common.machine import cpu_model
from benchmarks.common.machine import load_average
from benchmarks.common.machine import machine_info
from benchmarks.common.machine import memory_gib
from benchmarks.common.machine import package_versions
from benchmarks.common.machine import stats
from benchmarks.common.machine import write_result
from benchmarks.common.processes import add_duel_flags
from benchmarks.common.processes import pinned_commands
from benchmarks.common.processes import PROCESS_ENV
from benchmarks.common.processes import Turns
from benchmarks.common.profiles import profile_breakdown
from benchmarks.common.records_report import HEAD_CHANGE_RECORD
from benchmarks.common.records_report import head_change_record
from benchmarks.common.summary import summarize

__all__ = [
    "BEAUTY_NUM_ITEMS",
    "BEAUTY_RAW",
    "ISSUE_SIZES",
    "MFU_TARGET",
    "REPO_ROOT",
    "RESULTS_DIR",
    "SHARED_DATA",
    "TARGETS",
    "ensure_beauty_or_synthetic",
    "ensure_synthetic",
    "bert4rec_flops_per_row",
    "measure_matmul_peak",
    "train_flops_per_step",
    "cpu_model",
    "load_average",
    "machine_info",
    "memory_gib",
    "package_versions",
    "stats",
    "write_result",
    "add_duel_flags",
    "pinned_commands",
    "PROCESS_ENV",
    "Turns",
    "profile_breakdown",
    "HEAD_CHANGE_RECORD",
    "head_change_record",
    "summarize",
]
