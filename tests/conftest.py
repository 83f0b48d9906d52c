"""Shared pytest setup: repo root on sys.path, quiet TF, TF kept off GPUs,
fast XLA compilation and one persistent compilation cache (tests/helpers.py).

XLA reads XLA_FLAGS when JAX first creates its CPU backend, so they are set
here, before any test module runs JAX.
"""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from tests import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ["XLA_FLAGS"] = helpers.xla_flags(
    base=os.environ.get("XLA_FLAGS", ""))
os.environ.update(helpers.compilation_cache_env())
