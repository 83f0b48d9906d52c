"""`python -m benchmarks.common summarize [RESULTS_DIR]` rewrites RESULTS.md."""

import sys

from benchmarks.common import constants
from benchmarks.common import summary

if __name__ == "__main__":
  if len(sys.argv) >= 2 and sys.argv[1] == "summarize":
    print(summary.summarize(*(sys.argv[2:3] or [constants.RESULTS_DIR])))
  else:
    print("usage: python -m benchmarks.common summarize [RESULTS_DIR]")
    sys.exit(2)
