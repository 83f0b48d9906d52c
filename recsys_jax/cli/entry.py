"""Shared command-line handling of the gin entry points (train/eval/export)."""

import os
import sys
from typing import Callable

from absl import flags
from absl import logging
import gin

from recsys_jax.core import checkpoints
from recsys_jax.data import bad_input
from recsys_jax.core import distributed
from recsys_jax.cli import gin_utils
from recsys_jax.core import trainer
from recsys_jax.text import item_text_cache

flags.DEFINE_multi_string("gin_file", [], "gin files, in order (later wins)")
flags.DEFINE_multi_string("gin_bindings", [],
                          "gin bindings; --gin.NAME=VALUE is a shorthand")
flags.DEFINE_list("gin_search_paths", [], "directories searched for gin files")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs")
flags.DEFINE_integer("num_processes", None, "number of processes")
flags.DEFINE_integer("process_id", None, "index of this process")
flags.DEFINE_bool("multihost", False,
                  "initialise jax.distributed with auto-detection (TPU pods)")
flags.DEFINE_string("platform", None, "cpu, gpu or tpu (default: JAX's)")

FLAGS = flags.FLAGS


def hide_gpus_from_tensorflow():
  """TF is only the input pipeline: it must never take accelerator memory."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # pylint: disable=broad-except
    pass


def run_configured(run_gin: str, fn: Callable, write_config: bool = False):
  """Parses flags + gin (run defaults first), then calls the gin-bound fn."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  def main(argv):
    if len(argv) > 1:
      raise ValueError(f"unexpected arguments {argv[1:]}; gin values go as "
                       "--gin.NAME=VALUE")
    if not any(a.startswith(("-v", "--verbosity")) for a in sys.argv[1:]):
      # orbax/absl INFO lines drown the progress lines; -v 0 brings them back.
      logging.set_verbosity(logging.WARNING)
    hide_gpus_from_tensorflow()
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, FLAGS.multihost, FLAGS.platform)
    try:
      gin_utils.parse_gin([run_gin] + list(FLAGS.gin_file),
                          FLAGS.gin_bindings, FLAGS.gin_search_paths)
    except gin_utils.GinConfigError as e:  # one line: the flag or file, why
      sys.exit(f"gin configuration error: {e}")
    configured = gin.get_configurable(fn)
    if write_config:
      model_dir = gin.query_parameter("MODEL_DIR/macro.value")
      # Written before training too, so a crashed run still documents itself;
      # the operative config is rewritten at the end.
      import jax  # pylint: disable=g-import-not-at-top
      if jax.process_index() == 0:
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
          f.write(gin.config_str())
    try:
      configured()
    except (FileNotFoundError, checkpoints.CheckpointError,
            trainer.NonFiniteLossError,
            item_text_cache.CacheMismatchError,
            bad_input.BadInputError) as e:
      # User-facing conditions (no checkpoint/step/data, an unreadable or
      # unfitting checkpoint, a text cache built otherwise, NaN loss, data
      # that lacks what the config asks for): no traceback, nor gin's
      # suffix.
      sys.exit(f"error: {str(e).split(chr(10) + '  In call to')[0]}")
    except ValueError as e:
      # A config class rejecting its bound values (its __post_init__).
      message = gin_utils.config_validation_message(e)
      if message is None:
        raise
      sys.exit(f"gin configuration error: {message}")
    if write_config:
      import jax  # pylint: disable=g-import-not-at-top
      if jax.process_index() == 0:
        gin_utils.write_operative_config(gin.query_parameter("MODEL_DIR/macro.value"))

  gin_utils.run(main)
