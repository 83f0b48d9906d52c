"""Every gin file under gin/ parses, finalizes and builds what it configures.

Each file is combined the way an entry point would (run defaults first, then
a dataset and a model file), with tiny macros pointing at a tiny dataset; the
arguments of the run function (runs.train / evaluate / export / predict) are
then built from the bindings without running it. Every run config parses for
every entry point, and configuration mistakes (gin_utils.parse_gin's checks)
end in one line naming the flag or the file and line.
"""

import glob
import inspect
import os
import re
from typing import List, Set, Tuple

import gin
import pytest
import seqio

from recsys_jax.evaluation import evaluator as evaluation
from recsys_jax.cli import gin_sources
from recsys_jax.cli import gin_utils
from recsys_jax.input_pipeline import sequence_data as input_pipeline
from recsys_jax.model_lib import base
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
                 "runs/export.gin": runs.export,
                 "runs/predict.gin": runs.predict}
TEST_TASK = "gin_files_test"
TINY_TEXT_VOCAB = 300  # synthetic.TINY's SentencePiece pieces


def _macros(rel: str) -> Tuple[Set[str], Set[str]]:
  """(macros set, macros read) by repo gin file `rel` and what it includes."""
  with open(os.path.join(GIN_DIR, rel)) as f:
    text = f.read()
  statements, reads = gin_sources.parse_written(text, where=rel)
  sets = {st.macro for st in statements if st.macro}
  for included in re.findall(r"^include '([^']+)'", text, re.M):
    more_sets, more_reads = _macros(included)
    sets, reads = sets | more_sets, reads | more_reads
  return sets, reads


def _needs(rel: str) -> Set[str]:
  """Macros `rel` reads that neither it nor runs/train.gin sets."""
  sets, reads = _macros(rel)
  return {m for m in reads - sets - _macros("runs/train.gin")[0]
          if not m.startswith("gin.")}


def _partner(rel: str) -> str:
  """The models/ file for a datasets/ file `rel`, or the other way round:
  the first (synthetic data first) that sets every macro the other reads."""
  other = "datasets/" if rel.startswith("models/") else "models/"
  candidates = sorted((f for f in ALL_GIN_FILES if f.startswith(other)),
                      key=lambda f: ("synthetic" not in f, f))
  for candidate in candidates:
    if (_needs(rel) <= _macros(candidate)[0]
        and _needs(candidate) <= _macros(rel)[0]):
      return candidate
  raise AssertionError(f"no {other} file sets the macros {rel} reads "
                       f"({sorted(_needs(rel))})")


# Overlays that only make sense on top of one model family's experiment.
_OVERLAY_EXPERIMENT = {
    "runs/soft_token_contributions.gin": "experiments/synthetic_regen.gin",
    # Model fragments completed by an experiment (ILM's shared Q-Former, the
    # CoLLM adapter swapped into ILM's phase 2).
    "models/qformer.gin": "experiments/synthetic_ilm_phase1.gin",
    "models/collm.gin": "experiments/synthetic_ilm_phase2.gin",
}


def _combination(rel: str):
  """(run defaults file, files in parse order) exercising gin file `rel`."""
  top = rel.split("/")[0]
  if rel in RUN_FUNCTIONS:
    return rel, [rel, "quickstart.gin"]
  if rel == "quickstart.gin":
    return "runs/train.gin", ["runs/train.gin", rel]
  if rel in _OVERLAY_EXPERIMENT:  # an overlay of one family's experiment
    run = "runs/eval.gin" if top == "runs" else "runs/train.gin"
    return run, [run, _OVERLAY_EXPERIMENT[rel], rel]
  if top == "datasets":
    return "runs/train.gin", ["runs/train.gin", _partner(rel), rel]
  if top == "models":
    return "runs/train.gin", ["runs/train.gin", rel, _partner(rel)]
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


@pytest.fixture(scope="module")
def tiny_text_caches(tiny_data, tmp_path_factory):
  """(item cache, critique cache) of the tiny data: FLARE's gin files need
  them (bert_random, 8 tokens: built in seconds)."""
  from recsys_jax import embed_items  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("text_caches")
  out = []
  for texts in ("items", "critiques"):
    path = str(root / texts)
    embed_items.build_cache(
        tiny_data, "bert_random", None, None, path, texts=texts,
        max_text_len=8, dtype="float32", log=lambda _: None,
        random_encoder={"hidden_size": 16, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "intermediate_size": 32})
    out.append(path)
  return tuple(out)


def _text_cache_bindings(files, caches) -> List[str]:
  """Bindings of the text-cache macros for the files that read them; the
  out-of-domain categories of the experiments are not tiny-data categories."""
  reads = set().union(*(_macros(f)[1] for f in files))
  out = []
  if "ITEM_TEXT_CACHE" in reads:
    out.append(f"ITEM_TEXT_CACHE = '{caches[0]}'")
  if "CRITIQUE_TEXT_CACHE" in reads:
    out.append(f"CRITIQUE_TEXT_CACHE = '{caches[1]}'")
  if "OOD_CATEGORIES" in reads:
    out.append("OOD_CATEGORIES = ()")
  if "CF_EXPORT" in reads:  # ILM: a CF table fitted on the tiny data
    out.append("CF_EXPORT = 'als'")
  return out


@pytest.mark.parametrize("rel", ALL_GIN_FILES)
def test_gin_file_parses_finalizes_and_builds(rel, tiny_data, tmp_path,
                                              tiny_text_caches):
  run_gin, files = _combination(rel)
  gin_utils.parse_gin(files, [
      f"DATA_DIR = '{tiny_data}'",
      f"MODEL_DIR = '{tmp_path}'",
      "TRAIN_STEPS = 3",
      f"TASK_NAME = '{TEST_TASK}'",
  ] + _text_cache_bindings(files, tiny_text_caches))
  fn = RUN_FUNCTIONS[run_gin]
  args = _build_run_arguments(fn)

  assert args["model_dir"] == str(tmp_path)
  mesh_config = args["mesh_config"]
  assert isinstance(mesh_config, partitioning.MeshConfig)
  assert mesh_config.model_parallelism >= 1
  rules = dict(mesh_config.logical_rules())
  assert rules["batch"] == partitioning.DATA_AXIS
  model = args["model"]
  assert isinstance(model, base.BaseModel)
  # Sized from the dataset, not the gin file.
  if isinstance(model, model_lib.SequenceRecModel):
    assert model.num_items == 150
  else:  # text models: the dataset's SentencePiece pieces + sentinels
    assert model.config.vocab_size >= TINY_TEXT_VOCAB

  if "data" in args:
    data = args["data"]
    # A mixture (datasets/*_mixture.gin) draws from several sources.
    sources = getattr(data, "sources", [data])
    if "TASK_NAME" in set().union(*(_macros(f)[1] for f in files)):
      # The macro names the task (or prefixes it: ILM's phase-1 entries).
      assert any(d.name == TEST_TASK or d.name.startswith(TEST_TASK + "_")
                 for d in sources), [d.name for d in sources]
    for d in sources:
      assert d.data_dir == tiny_data
      if isinstance(d, input_pipeline.SequenceData):
        assert d.max_len == model.max_len, "data and model disagree on MAX_LEN"
        assert d.name in seqio.TaskRegistry.names()
  if "evaluation" in args:
    if isinstance(model, model_lib.SequenceRecModel) and (
        "runs/critiquing.gin" not in files):
      assert isinstance(args["evaluation"], evaluation.EvalConfig)
    elif args["evaluation"] is not None:  # None: no evaluation (ILM phase 1)
      assert callable(getattr(args["evaluation"], "evaluate", None))
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


def test_init_from_and_frozen_from_flags_alone(tiny_data, tmp_path):
  """The README's command: nothing in a gin file binds InitFrom's path."""
  from recsys_jax.core import init_from  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin_utils.parse_gin(
      ["runs/train.gin", "quickstart.gin"],
      [f"DATA_DIR = '{tiny_data}'", f"MODEL_DIR = '{tmp_path}'",
       "TRAIN_STEPS = 3", f"TASK_NAME = '{TEST_TASK}'",
       "trainer.OptimizerConfig.frozen = ('item_embed/.*',)",
       "runs.train.init_from = @init_from.InitFrom()",
       "init_from.InitFrom.path = 'runs/quickstart/export'"])
  args = _build_run_arguments(runs.train)
  assert args["init_from"] == init_from.InitFrom(path="runs/quickstart/export")
  assert args["optimizer"].frozen == ("item_embed/.*",)
  gin.clear_config()


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


@pytest.mark.parametrize("run_gin", sorted(RUN_FUNCTIONS))
@pytest.mark.parametrize("rel", RUN_CONFIGS)
def test_run_configs_parse_for_every_entry_point(run_gin, rel, tiny_data,
                                                 tmp_path, tiny_text_caches):
  # README and launch/local.sh pass the same --gin_file and --gin.NAME flags
  # to train, eval, export (and predict), so a run config's training bindings and
  # macros (TRAIN_STEPS, EVAL_EVERY: read only by runs/train.gin) must parse
  # for all three without an "unused" error.
  gin_utils.parse_gin([run_gin, rel], [
      f"DATA_DIR = '{tiny_data}'", f"MODEL_DIR = '{tmp_path}'",
      f"TASK_NAME = '{TEST_TASK}'", "TRAIN_STEPS = 3", "EVAL_EVERY = 2"]
                      + _text_cache_bindings([run_gin, rel], tiny_text_caches))
  args = _build_run_arguments(RUN_FUNCTIONS[run_gin])
  assert args["model_dir"] == str(tmp_path)
  assert isinstance(args["model"], base.BaseModel)


def test_every_macro_a_repo_file_sets_is_read_by_a_repo_file():
  # The rule that makes TRAIN_STEPS legal for eval (gin_checks): a macro
  # some repo gin file reads is never "unused". A repo file setting a macro
  # no repo file reads would fail every entry point that parses it.
  reads = gin_sources.repo_macro_reads(gin_utils.REPO_GIN_DIR)
  assert {"TRAIN_STEPS", "MODEL_DIR", "DATA", "MODEL"} <= reads
  for rel in ALL_GIN_FILES:
    with open(os.path.join(GIN_DIR, rel)) as f:
      statements, _ = gin_sources.parse_written(f.read(), where=rel)
    for st in statements:
      if st.macro:
        assert st.macro in reads, f"{st.where}: {st.macro} is read nowhere"


# -- configuration mistakes: one line naming the flag or file and line ------


def _gin_error(files, bindings) -> str:
  """The GinConfigError message of parsing `files` + `bindings`."""
  with pytest.raises(gin_utils.GinConfigError) as err:
    gin_utils.parse_gin(files, bindings)
  message = str(err.value)
  assert "\n" not in message, message
  return message


QUICKSTART = ["runs/train.gin", "quickstart.gin"]
MODEL_DIR = "MODEL_DIR = 'runs/x'"


@pytest.mark.parametrize("binding,expected", [
    # A macro nothing reads, with the closest known names.
    ("TRAIN_STEPZ = 5", "--gin.TRAIN_STEPZ=5 is not used by anything; did "
     "you mean TRAIN_STEPS?"),
    ("LEARNING_RATE = 1e-3", "--gin.LEARNING_RATE=1e-3 is not used by "
     "anything; did you mean trainer.OptimizerConfig.learning_rate?"),
    ("NOTHING_LIKE_IT = 1", "--gin.NOTHING_LIKE_IT=1 is not used by "
     "anything; no gin binding reads %NOTHING_LIKE_IT"),
    # Values gin cannot read.
    ("TRAIN_STEPS = abc", "--gin.TRAIN_STEPS=abc: abc is not a value gin can"
     " read: expected a Python literal (5, 1e-3, True, None, 'text', (1, 2)),"
     " a %MACRO or an @configurable() (strings need quotes: "
     "--gin.TRAIN_STEPS=\"'abc'\")"),
    ("MODEL_DIR = runs/y", "--gin.MODEL_DIR=runs/y: runs/y is not a value "
     "gin can read"),
    ("TRAIN_STEPS = (3,", "--gin.TRAIN_STEPS=(3,: unbalanced brackets or "
     "quotes"),
    # Values of the wrong type, directly or through a macro.
    ("trainer.OptimizerConfig.learning_rate = 'x'",
     "--gin.trainer.OptimizerConfig.learning_rate='x': "
     "trainer.OptimizerConfig.learning_rate expects a float, not the str "
     "'x'"),
    ("TRAIN_STEPS = 1e4", "--gin.TRAIN_STEPS=1e4: TRAIN_STEPS is read by "
     "trainer.TrainLoopConfig.train_steps, which expects an int, not the "
     "float 10000.0"),
    ("trainer.TrainLoopConfig.local_accumulation = 1",
     "--gin.trainer.TrainLoopConfig.local_accumulation=1: "
     "trainer.TrainLoopConfig.local_accumulation expects a bool (True/False),"
     " not the int 1"),
    ("evaluation.EvalConfig.splits = 'test'",
     "--gin.evaluation.EvalConfig.splits='test': evaluation.EvalConfig.splits "
     "expects a tuple or list of strings, not the str 'test'"),
    ("evaluation.EvalConfig.ks = (1, 'a')",
     "--gin.evaluation.EvalConfig.ks=(1, 'a'): evaluation.EvalConfig.ks "
     "expects a tuple or list of ints, not the tuple (1, 'a')"),
    # Unknown configurables and parameters, with the closest names.
    ("trainerr.OptimizerConfig.learning_rate = 1",
     "--gin.trainerr.OptimizerConfig.learning_rate=1: no configurable named "
     "trainerr.OptimizerConfig; did you mean trainer.OptimizerConfig?"),
    ("builders.bert4rec.hiddenn = 3", "--gin.builders.bert4rec.hiddenn=3: "
     "builders.bert4rec has no parameter 'hiddenn'; did you mean hidden?"),
    # A macro read but set nowhere.
    ("trainer.OptimizerConfig.learning_rate = %LR",
     "--gin.trainer.OptimizerConfig.learning_rate=%LR reads %LR, but no gin "
     "file or --gin.LR=... sets it; set it or fix the name"),
])
def test_flag_mistakes_are_one_line_naming_the_flag(binding, expected):
  assert _gin_error(QUICKSTART, [MODEL_DIR, binding]).startswith(expected)


def test_values_that_fit_their_annotations_parse():
  gin_utils.parse_gin(QUICKSTART, [
      MODEL_DIR,
      "trainer.OptimizerConfig.learning_rate = 1",     # int for a float
      "trainer.OptimizerConfig.clip_norm = None",      # Optional[float]
      "trainer.TrainLoopConfig.keep_checkpoints = None",
      "evaluation.EvalConfig.ks = [1, 10]",            # list for a Sequence
      "LR = 3e-3", "trainer.OptimizerConfig.warmup_steps = %STEPS",
      "STEPS = %WARMUP", "WARMUP = 7",                 # read through macros
      "trainer.OptimizerConfig.learning_rate = %LR"])
  assert gin.query_parameter("trainer.OptimizerConfig.warmup_steps") is not (
      None)


def test_macro_read_only_by_an_unread_macro_blames_the_unread_one():
  message = _gin_error(QUICKSTART, [MODEL_DIR, "A = %B", "B = 3"])
  assert message == "--gin.A=%B is not used by anything; no gin binding reads %A"


def test_macros_of_other_entry_points_are_not_errors(tiny_data):
  # eval parses no runs/train.gin, yet quickstart.gin and launch/local.sh
  # set TRAIN_STEPS and BATCH_SIZE for it: repo gin files read them.
  gin_utils.parse_gin(["runs/eval.gin", "quickstart.gin"], [
      MODEL_DIR, f"DATA_DIR = '{tiny_data}'", "TRAIN_STEPS = 5",
      "BATCH_SIZE = 8", "EVAL_EVERY = 2"])
  gin.clear_config()
  assert _gin_error(["runs/eval.gin", "quickstart.gin"], [
      MODEL_DIR, "TRAIN_STEPZ = 5"]).startswith(
          "--gin.TRAIN_STEPZ=5 is not used by anything; did you mean "
          "TRAIN_STEPS?")


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("text,line,expected", [
    ("include 'quickstart.gin'\nTRAIN_STEPZ = 5\n", 2,
     "'TRAIN_STEPZ = 5' ({path}, line 2) is not used by anything; did you "
     "mean TRAIN_STEPS?"),
    ("include 'quickstart.gin'\ntrainer.OptimizerConfig:\n"
     "  learning_rate = 'x'\n", 3,
     "\"learning_rate = 'x'\" ({path}, line 3): "
     "trainer.OptimizerConfig.learning_rate expects a float, not the str "
     "'x'"),
    ("include 'quickstart.gin'\nTRAIN_STEPS = abc\n", 2,
     "'TRAIN_STEPS = abc' ({path}, line 2): abc is not a value gin can read"),
    ("include 'quickstart.gin'\nbuilders.bert4rec:\n  hiddenn = 3\n", 3,
     "'hiddenn = 3' ({path}, line 3): builders.bert4rec has no parameter "
     "'hiddenn'; did you mean hidden?"),
    ("from __gin__ import dynamic_registration\n"
     "from recsys_jax.core import trainer\ninclude 'quickstart.gin'\n"
     "trainerr.OptimizerConfig.learning_rate = 1\n", 4,
     "'trainerr.OptimizerConfig.learning_rate = 1' ({path}, line 4): "
     "trainerr is not imported in this file; did you mean "
     "trainer.OptimizerConfig?"),
    ("from __gin__ import dynamic_registration\n"
     "from recsys_jax.core import trainer\ninclude 'quickstart.gin'\n"
     "trainer.OptimizerConfigg.learning_rate = 1\n", 4,
     "'trainer.OptimizerConfigg.learning_rate = 1' ({path}, line 4): "
     "recsys_jax.core.trainer has no attribute OptimizerConfigg; did you "
     "mean trainer.OptimizerConfig?"),
    ("include 'quickstart.gin'\nTRAIN_STEPS = (1,\n", None,
     "{path}: unbalanced brackets or quotes"),
    ("include 'no_such_file.gin'\n", 1,
     "\"include 'no_such_file.gin'\" ({path}, line 1): no gin file "
     "no_such_file.gin (searched"),
])
def test_file_mistakes_are_one_line_naming_file_and_line(text, line, expected,
                                                         tmp_path):
  del line  # in `expected`
  path = _write(tmp_path, "mine.gin", text)
  message = _gin_error(["runs/train.gin", path], [MODEL_DIR])
  # Paths outside the working directory are shown as given.
  assert message.startswith(expected.format(path=path)), message


def test_unknown_gin_file_names_the_search_path():
  message = _gin_error(["runs/train.gin", "no_such_run.gin"], [MODEL_DIR])
  assert message.startswith("no gin file no_such_run.gin (searched [")
  assert gin_utils.REPO_GIN_DIR in message


def test_config_validation_message():
  gin_utils.parse_gin(QUICKSTART, [
      MODEL_DIR, "TRAIN_STEPS = 3",
      "trainer.TrainLoopConfig.num_microbatches = 3"])
  with pytest.raises(ValueError) as err:
    gin.get_configurable(trainer.TrainLoopConfig)()
  message = gin_utils.config_validation_message(err.value)
  assert message.startswith("TrainLoopConfig.num_microbatches=3 must divide "
                            "TrainLoopConfig.batch_size=64"), message
  assert "In call to configurable" not in message and "\n" not in message
  assert gin_utils.config_validation_message(ValueError("other")) is None
