r"""`python -m recsys_jax.export --gin_file=... --gin.MODEL_DIR="'runs/x'"`.

Defaults come from gin/runs/export.gin (parsed first); the user's gin files and
`--gin.NAME=VALUE` overrides follow. See README.md and docs/.
"""

from recsys_jax.cli import entry
from recsys_jax import runs

if __name__ == "__main__":
  entry.run_configured("runs/export.gin", runs.export)
