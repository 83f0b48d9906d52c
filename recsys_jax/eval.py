r"""`python -m recsys_jax.eval --gin_file=... --gin.MODEL_DIR="'runs/x'"`.

Defaults come from gin/runs/eval.gin (parsed first); the user's gin files and
`--gin.NAME=VALUE` overrides follow. See README.md and docs/.
"""

from recsys_jax.cli import entry
from recsys_jax import runs

if __name__ == "__main__":
  entry.run_configured("runs/eval.gin", runs.evaluate)
