#!/usr/bin/env bash
# The project's test command (README): installs what it needs, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# --dist loadscope: all tests of a module run on one worker, so a module's
# shared fixture (a multi-process training, an end-to-end pipeline) is built
# once, not once per worker.
exec "$PYTHON" -m pytest -q -n 2 --dist loadscope --durations=15 tests "$@"
