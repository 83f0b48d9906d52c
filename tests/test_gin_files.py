"""Every gin file under gin/ parses, finalizes and builds what it configures.

Each file is combined the way an entry point would (run defaults first, then
a dataset and a model file), with tiny macros pointing at a tiny dataset; the
arguments of the run function (runs.train / evaluate / export) are then built
from the bindings without running it.
"""

import glob
import inspect
import os

import gin
import pytest
import seqio

from recsys_jax.evaluation import evaluator as evaluation
from recsys_jax.cli import gin_utils
from recsys_jax.input_pipeline import sequence_data as input_pipeline
from recsys_jax.model_lib import sequence as model_lib
from recsys_jax.core import partitioning
from recsys_jax import runs
from recsys_jax.core import trainer
from tests import helpers
from tests.helpers import tiny_data  # pylint: disable=unused-import

GIN_DIR = os.path.join(helpers.REPO_ROOT, "gin")
ALL_GIN_FILES = sorted(
    os.path.relpath(p, GIN_DIR)
    for p in glob.glob(os.path.join(GIN_DIR, "**", "*.gin"), recursive=True))
RUN_FUNCTIONS = {"runs/train.gin": runs.train,
                 "runs/eval.gin": runs.evaluate,
                 "runs/export.gin": runs.export}
TEST_TASK = "gin_files_test"


def _combination(rel: str):
  """(run defaults file, files in parse order) exercising gin file `rel`."""
  top = rel.split("/")[0]
  if rel in RUN_FUNCTIONS:
    return rel, [rel, "quickstart.gin"]
  if rel == "quickstart.gin":
    return "runs/train.gin", ["runs/train.gin", rel]
  if top == "datasets":
    return "runs/train.gin", ["runs/train.gin", "models/bert4rec.gin", rel]
  if top == "models":
    return "runs/train.gin", ["runs/train.gin", rel, "datasets/synthetic.gin"]
  if top == "experiments":  # complete run configs, used alone
    return "runs/train.gin", ["runs/train.gin", rel]
  # Overlays (partitioning/, runs/evaluation.gin, ...): on top of quickstart.
  return "runs/train.gin", ["runs/train.gin", "quickstart.gin", rel]


@pytest.fixture(autouse=True)
def _clean_gin_and_seqio():
  """Gin config and the SeqIO registry are process-global: restore both."""
  registry = dict(seqio.TaskRegistry._REGISTRY)  # pylint: disable=protected-access
  gin.clear_config()
  yield
  gin.clear_config()
  seqio.TaskRegistry._REGISTRY.clear()  # pylint: disable=protected-access
  seqio.TaskRegistry._REGISTRY.update(registry)  # pylint: disable=protected-access


def _build(value):
  """The object a bound gin value stands for (references are called)."""
  if isinstance(value, gin.config.ConfigurableReference):
    fn = value.scoped_configurable_fn
    return fn() if value.evaluate else fn
  return value


def _build_run_arguments(fn):
  """{param: built value} of the bindings of a run function."""
  built = {}
  for name, param in inspect.signature(fn).parameters.items():
    try:
      value = gin.query_parameter(f"runs.{fn.__name__}.{name}")
    except ValueError:
      assert param.default is not inspect.Parameter.empty, (
          f"runs.{fn.__name__}({name}) is required but no gin file binds it")
      continue
    built[name] = _build(value)
  return built


def test_every_directory_is_covered():
  assert "quickstart.gin" in ALL_GIN_FILES
  for sub in ("models", "datasets", "runs", "partitioning"):
    assert any(f.startswith(sub + "/") for f in ALL_GIN_FILES), sub


@pytest.mark.parametrize("rel", ALL_GIN_FILES)
def test_gin_file_parses_finalizes_and_builds(rel, tiny_data, tmp_path):
  run_gin, files = _combination(rel)
  gin_utils.parse_gin(files, [
      f"DATA_DIR = '{tiny_data}'",
      f"MODEL_DIR = '{tmp_path}'",
      "TRAIN_STEPS = 3",
      f"TASK_NAME = '{TEST_TASK}'",
  ])
  fn = RUN_FUNCTIONS[run_gin]
  args = _build_run_arguments(fn)

  assert args["model_dir"] == str(tmp_path)
  mesh_config = args["mesh_config"]
  assert isinstance(mesh_config, partitioning.MeshConfig)
  assert mesh_config.model_parallelism >= 1
  rules = dict(mesh_config.logical_rules())
  assert rules["batch"] == partitioning.DATA_AXIS
  model = args["model"]
  assert isinstance(model, model_lib.SequenceRecModel)
  assert model.num_items == 150  # sized from the dataset, not the gin file

  if fn is not runs.export:
    data = args["data"]
    assert isinstance(data, input_pipeline.SequenceData)
    assert data.data_dir == tiny_data and data.name == TEST_TASK
    assert data.max_len == model.max_len, "data and model disagree on MAX_LEN"
    assert isinstance(args["evaluation"], evaluation.EvalConfig)
    assert TEST_TASK in seqio.TaskRegistry.names()
  if fn is runs.train:
    loop, optimizer = args["loop"], args["optimizer"]
    assert isinstance(loop, trainer.TrainLoopConfig)
    assert isinstance(optimizer, trainer.OptimizerConfig)
    assert loop.train_steps == 3
    assert loop.log_every >= 1 and loop.checkpoint_every >= 1
    assert loop.num_microbatches >= 1
    assert loop.batch_size % loop.num_microbatches == 0
    trainer.make_optimizer(optimizer, loop.train_steps)  # valid schedule
  else:
    assert args["checkpoint_step"] is None


def test_quickstart_data_yields_batches_the_model_accepts(tiny_data,
                                                           tmp_path):
  gin_utils.parse_gin(["runs/train.gin", "quickstart.gin"], [
      f"DATA_DIR = '{tiny_data}'", f"MODEL_DIR = '{tmp_path}'",
      "TRAIN_STEPS = 3", "MAX_LEN = 12", "MAX_PREDICTIONS = 6",
      f"TASK_NAME = '{TEST_TASK}'"])
  args = _build_run_arguments(runs.train)
  batch = next(args["data"].train_batches(0, 4))
  assert set(batch) >= {"item_ids", "targets", "loss_weights"}
  for v in batch.values():
    assert v.shape == (4, 12)
  assert batch["item_ids"].max() <= args["model"].mask_id


def test_num_microbatches_default_override_and_error(tiny_data, tmp_path):
  macros = [f"DATA_DIR = '{tiny_data}'", f"MODEL_DIR = '{tmp_path}'",
            "TRAIN_STEPS = 3", f"TASK_NAME = '{TEST_TASK}'"]
  gin_utils.parse_gin(["runs/train.gin", "quickstart.gin"], macros)
  loop = _build_run_arguments(runs.train)["loop"]
  assert loop.num_microbatches == 1  # runs/train.gin: no accumulation
  assert loop.batch_size == 64
  gin.clear_config()
  gin_utils.parse_gin(["runs/train.gin", "quickstart.gin"],
                      macros + ["trainer.TrainLoopConfig.num_microbatches = 4"])
  assert _build_run_arguments(runs.train)["loop"].num_microbatches == 4
  gin.clear_config()
  gin_utils.parse_gin(["runs/train.gin", "quickstart.gin"],
                      macros + ["trainer.TrainLoopConfig.num_microbatches = 3"])
  with pytest.raises(ValueError, match=r"TrainLoopConfig\.num_microbatches=3 "
                     r"must divide TrainLoopConfig\.batch_size=64"):
    _build_run_arguments(runs.train)


def test_missing_macro_is_named_in_process():
  with pytest.raises(ValueError) as err:
    gin_utils.parse_gin(["runs/train.gin", "models/bert4rec.gin",
                         "datasets/synthetic.gin"], ["TRAIN_STEPS = 3"])
  assert "--gin.MODEL_DIR=" in gin_utils.required_error_message(err.value)


def test_missing_model_dir_cli_error(tiny_data, tmp_path):
  # Run from a directory holding `runs/` and `models/` (as the repo root does
  # after a first run): gin must not take them for Python packages.
  for d in ("runs", "models", "datasets"):
    os.makedirs(tmp_path / d)
  res = helpers.run_entry(
      "recsys_jax.train",
      ["--gin_file=models/bert4rec.gin", "--gin_file=datasets/synthetic.gin",
       f"--gin.DATA_DIR='{tiny_data}'", "--gin.TRAIN_STEPS=3"],
      cwd=str(tmp_path))
  assert res.rc != 0
  assert "--gin.MODEL_DIR=" in res.stderr, res.stderr[-3000:]
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  assert not os.listdir(tmp_path / "runs")


RUN_CONFIGS = ["quickstart.gin"] + [f for f in ALL_GIN_FILES
                                    if f.startswith("experiments/")]


@pytest.mark.parametrize("run_gin", ["runs/eval.gin", "runs/export.gin"])
@pytest.mark.parametrize("rel", RUN_CONFIGS)
def test_run_configs_parse_for_eval_and_export(run_gin, rel, tiny_data,
                                               tmp_path):
  # README passes one --gin_file to train, eval and export alike, so a run
  # config's training bindings (optimizer, loop) must parse for all three.
  gin_utils.parse_gin([run_gin, rel], [
      f"DATA_DIR = '{tiny_data}'", f"MODEL_DIR = '{tmp_path}'",
      f"TASK_NAME = '{TEST_TASK}'"])
  args = _build_run_arguments(RUN_FUNCTIONS[run_gin])
  assert args["model_dir"] == str(tmp_path)
  assert isinstance(args["model"], model_lib.Bert4RecModel)
