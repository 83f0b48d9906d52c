#!/usr/bin/env bash
# The project's test command (README): installs what it needs, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$PYTHON" -m pytest -q -n 2 --durations=15 tests "$@"
