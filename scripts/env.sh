# Sourced by the README commands: makes (or reuses) the project virtualenv and
# puts the repo on PYTHONPATH. The venv is cached, keyed on the requirements.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_cache="${RECSYS_JAX_CACHE:-$HOME/.cache/recsys_jax}"
_key="$(cat "$_repo/requirements.txt" "$_repo/requirements-test.txt" | sha256sum | cut -c1-16)"
RECSYS_VENV="${RECSYS_VENV:-$_cache/venv-$_key}"
if [ ! -f "$RECSYS_VENV/.complete" ]; then
  echo "Creating virtualenv $RECSYS_VENV (first run only; TensorFlow and torch take minutes)" >&2
  _py="$(command -v python3.11 || command -v python3)"
  rm -rf "$RECSYS_VENV"
  "$_py" -m venv "$RECSYS_VENV"
  "$RECSYS_VENV/bin/pip" install -q --upgrade pip >&2
  "$RECSYS_VENV/bin/pip" install -q -r "$_repo/requirements.txt" -r "$_repo/requirements-test.txt" >&2
  touch "$RECSYS_VENV/.complete"
fi
export PATH="$RECSYS_VENV/bin:$PATH"
export PYTHONPATH="$_repo${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PYTHON="$RECSYS_VENV/bin/python"
