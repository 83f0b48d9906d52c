"""`summarize`: benchmarks/RESULTS.md from the result files, section by
section (throughput_report.py, records_report.py)."""

import os
from typing import Optional

from benchmarks.common import records_report
from benchmarks.common import throughput_report
from benchmarks.common.constants import RESULTS_DIR
from benchmarks.common.results import rounds
from benchmarks.common.results import Rounds


def summarize(results_dir: str = RESULTS_DIR,
              out_path: Optional[str] = None) -> str:
  """Builds RESULTS.md from the round files train_*/eval_*/recbole_*.json."""
  timing = Rounds.read(results_dir)
  ours_quality = rounds(results_dir, "ours_quality_")
  recbole_quality = rounds(results_dir, "recbole_quality_")
  lines = throughput_report.header_lines(timing)
  lines += throughput_report.comparison_section(timing)
  lines += throughput_report.mfu_section(timing)
  lines += throughput_report.eval_modes_section(timing)
  lines += records_report.head_change_section(results_dir, timing.train)
  lines += records_report.packing_quality_section(results_dir)
  lines += records_report.quality_section(ours_quality, recbole_quality)
  lines += records_report.commands_section(
      timing.train + timing.train_mb + timing.train_1core + timing.recbole
      + timing.eval + ours_quality + recbole_quality)
  lines += records_report.million_items_section(results_dir)
  text = "\n".join(lines)
  out_path = out_path or os.path.join(os.path.dirname(results_dir),
                                      "RESULTS.md")
  with open(out_path, "w") as f:
    f.write(text)
  return out_path
