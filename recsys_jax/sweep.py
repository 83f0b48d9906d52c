r"""`python -m recsys_jax.sweep --gin_file=... --grid="NAME=[a, b]; ..."
--sweep_dir=runs/sweeps/NAME [--parallel=N] [--dry_run]`.

Trains every point of the grid as its own run directory under --sweep_dir
(`python -m recsys_jax.train` with the point's `--gin.NAME=VALUE` flags),
skips points already finished, and writes results.md / results.csv there.
See docs/SWEEPS.md.
"""

import os
import sys

from absl import flags
from absl import logging

from recsys_jax.cli import gin_utils
from recsys_jax.sweeps import collect
from recsys_jax.sweeps import driver
from recsys_jax.sweeps import gin_check
from recsys_jax.sweeps import grid
from recsys_jax.sweeps import runner

flags.DEFINE_string("grid", None, "NAME=[v1, v2]; NAME2=[...]: gin names "
                    "(macros or parameters) and gin literal values")
flags.DEFINE_string("sweep_dir", None, "one run directory per point, the "
                    "records and the table go here")
flags.DEFINE_multi_string("gin_file", [], "gin files of every point, in order")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings of every point; "
                          "--gin.NAME=VALUE is a shorthand")
flags.DEFINE_list("gin_search_paths", [], "directories searched for gin files")
flags.DEFINE_integer("parallel", 1, "points run at a time (local launcher), "
                     "each pinned to its own block of cores")
flags.DEFINE_bool("pin_cores", True, "with --parallel > 1, pin each run to "
                  "its own cores (taskset) and size its thread pools to them")
flags.DEFINE_integer("gpus_per_point", 0, "give each parallel run its own "
                     "GPUs (CUDA_VISIBLE_DEVICES); 0: every run sees all")
flags.DEFINE_bool("dry_run", False, "list the points and their exact "
                  "commands; run and write nothing")
flags.DEFINE_bool("collect_only", False, "only write the table of what the "
                  "point directories hold")
flags.DEFINE_enum("launcher", "local", list(driver.LAUNCHERS),
                  "local: run the points here; print: print one launch/ "
                  "command per point (pods, clusters)")
flags.DEFINE_string("launch_command", "launch/local.sh", "with "
                    "--launcher=print: the command before `-- TRAIN_ARGS`, "
                    "e.g. 'launch/tpu_pod.sh --tpu=NAME --zone=ZONE'")
flags.DEFINE_string("python", sys.executable, "interpreter of the local runs")
flags.DEFINE_float("kill_grace_s", 60.0, "seconds a stopped run gets to "
                   "checkpoint after SIGTERM before SIGKILL")
flags.DEFINE_string("metric", "NDCG@10", "validation metric that selects "
                    "the best step of each point and ranks the points")
flags.DEFINE_list("test_metrics", ["NDCG@10", "HR@10"], "test metrics "
                  "reported at each point's best validation step")
flags.DEFINE_string("validation_split", "validation", "split that selects")
flags.DEFINE_string("test_split", "test", "split reported at the best step")

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; gin values go as "
             "--gin.NAME=VALUE")
  if not FLAGS.grid or not FLAGS.sweep_dir:
    sys.exit("error: --grid and --sweep_dir are required, e.g. "
             "--grid=\"MASK_PROB=[0.2, 0.4]\" --sweep_dir=runs/sweeps/mask")
  if not any(a.startswith(("-v", "--verbosity")) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)  # as the train entry point does
  options = driver.Options(
      grid=FLAGS.grid, sweep_dir=FLAGS.sweep_dir, gin_files=FLAGS.gin_file,
      gin_bindings=FLAGS.gin_bindings,
      gin_search_paths=FLAGS.gin_search_paths, parallel=FLAGS.parallel,
      dry_run=FLAGS.dry_run, collect_only=FLAGS.collect_only,
      launcher=FLAGS.launcher, launch_command=FLAGS.launch_command,
      python=FLAGS.python, pin_cores=FLAGS.pin_cores,
      gpus_per_point=FLAGS.gpus_per_point, grace_s=FLAGS.kill_grace_s,
      selection=collect.Selection(
          metric=FLAGS.metric, validation_split=FLAGS.validation_split,
          test_split=FLAGS.test_split, test_metrics=FLAGS.test_metrics))
  try:
    status = driver.run(options)
  except (grid.GridError, driver.SweepError, gin_check.PointConfigError,
          runner.SlotError, runner.LaunchError) as e:
    sys.exit(f"sweep error: {e}")
  except runner.Interrupted as e:
    print(f"sweep: stopped by {e}; rerun the same command to finish it",
          file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # Ctrl-C before any point started
    sys.exit(128 + 2)
  sys.exit(status)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  gin_utils.run(main)
