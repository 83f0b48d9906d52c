r"""`python -m recsys_jax.report --model_dir=runs/a [--model_dir=runs/b]
[--output=report.html]`: one self-contained HTML page comparing runs.

The metrics against the baselines, beyond-accuracy figures, metrics by
target frequency, training curves, validation vs test over steps, critique
lift and the configs, read from each run directory (eval JSONs, TensorBoard
events, config.gin, predict output); see docs/REPORT.md.
"""

import argparse
import sys
from typing import Optional, Sequence

from recsys_jax.reporting import build
from recsys_jax.reporting import run_data


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m recsys_jax.report",
      description="Write an HTML evaluation report of one or more runs.")
  parser.add_argument("--model_dir", action="append", required=True,
                      help="a run directory (MODEL_DIR); repeat to compare "
                      "runs side by side")
  parser.add_argument("--output", default="report.html",
                      help="the HTML file to write (default: report.html)")
  parser.add_argument("--title", default="",
                      help="page title (default: names the runs)")
  args = parser.parse_args(argv)
  if len(set(args.model_dir)) != len(args.model_dir):
    parser.error("--model_dir: the same directory is given twice")
  try:
    path = build.write_report(args.model_dir, args.output, args.title)
  except run_data.RunError as e:
    print(f"report: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"report: --output={args.output}: {e.strerror or e}",
          file=sys.stderr)
    return 2
  print(f"Wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
