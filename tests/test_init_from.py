"""Initialising a fresh run from another run's export, checkpoint or an
HF import (core/init_from.py), and the errors that name every misfit."""

import os
import re

import jax
import numpy as np
import pytest

from recsys_jax.core import checkpoints
from recsys_jax.core import init_from
from recsys_jax.core import optimizer
from recsys_jax.core import param_tree
from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from recsys_jax.model_lib import sequence as model_lib
from recsys_jax.models import bert4rec as bert4rec_lib
from recsys_jax import runs
from tests import helpers

# Same blocks and positions, different catalogues: 50 items (a 128-row item
# table) in the source, 130 (256 rows) in the target.
_SOURCE_ITEMS, _TARGET_ITEMS = 50, 130
_ROWS, _LEN = 8, 8
_COPIED = re.compile(r"blocks_0/.*|position_embed/embedding")


def _model(num_items):
  return model_lib.Bert4RecModel(bert4rec_lib.Bert4RecConfig(
      num_items=num_items, max_len=_LEN, hidden=16, num_layers=1,
      num_heads=2, mlp_dim=32, dropout_rate=0.0,
      attention_dropout_rate=0.0), max_predictions=4)


def _batches(num_items):
  def batches(start):
    gen = np.random.default_rng(start)
    while True:
      ids = gen.integers(1, num_items + 1, (_ROWS, _LEN)).astype(np.int32)
      weights = np.zeros((_ROWS, _LEN), np.float32)
      weights[:, -2:] = 1.0
      yield {"item_ids": np.where(weights > 0, num_items + 1, ids),
             "targets": np.where(weights > 0, ids, 0).astype(np.int32),
             "loss_weights": weights}
  return batches


def _train(model, model_dir, steps, **kwargs):
  mesh = partitioning.make_mesh(1, devices=jax.devices()[:1])
  cfg = trainer.TrainLoopConfig(train_steps=steps, batch_size=_ROWS,
                                log_every=1, checkpoint_every=1,
                                keep_checkpoints=2)
  opt = optimizer.OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                  decay="constant")
  return trainer.train_loop(model, opt, _batches(model.num_items), cfg,
                            model_dir=str(model_dir), mesh=mesh,
                            rules=partitioning.get_rules("data_parallel"),
                            **kwargs)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A source run trained 2 steps and exported: (run dir, export dir)."""
  run_dir = tmp_path_factory.mktemp("source_run")
  _train(_model(_SOURCE_ITEMS), run_dir, 2)
  export_dir = runs.export(model_dir=str(run_dir),
                           model=_model(_SOURCE_ITEMS),
                           mesh_config=partitioning.MeshConfig())
  return str(run_dir), export_dir


def _flat(tree):
  return {k: np.asarray(v) for k, v in param_tree.flatten(tree).items()}


def test_fresh_run_initialised_from_export(source, tmp_path, capsys):
  _, export_dir = source
  exported = _flat(checkpoints.restore_to_host(
      os.path.join(export_dir, "params")))
  model = _model(_TARGET_ITEMS)
  spec = init_from.InitFrom(
      path=export_dir,
      mapping=[("blocks_0/(.*)", r"blocks_0/\1"),
               ("position_embed/.*", r"\0")])
  # train_steps=0: the loop returns the state it starts from.
  fresh = _flat(_train(model, tmp_path / "fresh", 0).params)
  state = _train(model, tmp_path / "run", 0, init_from=spec)
  out = capsys.readouterr().out
  got = _flat(state.params)
  copied = {k for k in got if _COPIED.fullmatch(k)}
  assert len(copied) == 17, sorted(copied)  # 16 block arrays + positions
  for k in got:
    if k in copied:
      np.testing.assert_array_equal(got[k], exported[k], err_msg=k)
      # Not trivially equal: the fresh value differs.
      assert np.abs(fresh[k] - exported[k]).max() > 0, k
    else:
      np.testing.assert_array_equal(got[k], fresh[k], err_msg=k)
  assert got["item_embed/embedding"].shape == (256, 16)
  values = sum(got[k].size for k in copied)
  assert (f"Initialised 17 of {len(got)} parameter arrays ({values:,} of "
          f"{sum(v.size for v in got.values()):,} values) from "
          f"{export_dir} (export)") in out, out


def test_resume_wins_over_init_from(source, tmp_path, capsys):
  model = _model(_TARGET_ITEMS)
  trained = _flat(_train(model, tmp_path, 1).params)
  capsys.readouterr()
  # A path that does not exist: never read, because the run resumes.
  spec = init_from.InitFrom(path=str(tmp_path / "nonexistent"))
  state = _train(model, tmp_path, 1, init_from=spec)
  assert "Resuming from checkpoint_1" in capsys.readouterr().out
  helpers.assert_trees_equal(_flat(state.params), trained, "resumed")
  del source


def test_sources_run_dir_params_dir_and_steps(source):
  run_dir, export_dir = source
  exported = _flat(checkpoints.restore_to_host(
      os.path.join(export_dir, "params")))
  # The export was made from the latest checkpoint (2) of the run.
  what, latest = init_from.load_source(init_from.InitFrom(path=run_dir))
  assert what == f"{run_dir} (checkpoint_2)"
  helpers.assert_trees_equal(latest, exported, "run dir")
  # checkpoint_1 (kept: keep_checkpoints=2) holds other values.
  _, first = init_from.load_source(init_from.InitFrom(path=run_dir, step=1))
  assert first.keys() == latest.keys()
  assert any(np.abs(first[k] - latest[k]).max() > 0 for k in first)
  what, params = init_from.load_source(init_from.InitFrom(
      path=os.path.join(export_dir, "params")))
  assert what.endswith("(params checkpoint)")
  helpers.assert_trees_equal(params, exported, "params dir")
  with pytest.raises(FileNotFoundError, match=r"checkpoint_7 does not "
                     r"exist; steps: \[1, 2\]"):
    init_from.load_source(init_from.InitFrom(path=run_dir, step=7))
  with pytest.raises(ValueError, match=r"InitFrom\.step=1 applies to a run "
                     "directory"):
    init_from.load_source(init_from.InitFrom(path=export_dir, step=1))
  empty = os.path.join(run_dir, "checkpoint_1", "meta")
  with pytest.raises(FileNotFoundError, match=r"is not a run directory "
                     r".*an export .*Hugging Face directory"):
    init_from.load_source(init_from.InitFrom(path=empty))


def test_errors_list_unmatched_missing_and_mismatched(source, tmp_path):
  _, export_dir = source
  params = _train(_model(_TARGET_ITEMS), tmp_path, 0).params
  spec = init_from.InitFrom(path=export_dir, mapping=[
      ("encoder/.*", r"\0"),                      # matches no target
      ("blocks_0/mlp/(.*)", r"blocks_7/mlp/\1"),  # no such source
      ("item_embed/embedding", r"\0"),            # 256 vs 128 rows
      ("blocks_0/.*", r"\g<0>"),                  # fine
  ])
  with pytest.raises(init_from.InitFromError) as err:
    init_from.initialise(params, spec)
  msg = str(err.value)
  assert isinstance(err.value, checkpoints.CheckpointError)  # entry: 1 msg
  assert msg.startswith(f"InitFrom {export_dir} (export):"), msg
  assert ("target patterns matching no parameter: 'encoder/.*' "
          "(parameters: blocks_0/") in msg, msg
  assert re.search(r"source parameters missing: blocks_7/mlp/wi/bias for "
                   r"blocks_0/mlp/wi/bias \(closest: blocks_0/mlp/wi/bias",
                   msg), msg
  assert ("shape mismatches (target <- source): item_embed/embedding "
          "[256, 16] <- item_embed/embedding [128, 16]") in msg, msg
  # The fitting rule's parameters are not reported.
  assert "for blocks_0/attention" not in msg, msg
  assert "blocks_0/attention/key/bias [" not in msg, msg

  with pytest.raises(init_from.InitFromError, match="mapping is empty"):
    init_from.initialise(params, init_from.InitFrom(path=export_dir,
                                                    mapping=()))
  with pytest.raises(init_from.InitFromError, match="not a .*pair"):
    init_from.InitFrom(path=export_dir, mapping=[("a",)]).rules()
  with pytest.raises(init_from.InitFromError, match="not a regular"):
    init_from.InitFrom(path=export_dir, mapping={"a(": "b"}).rules()


def test_plan_first_rule_wins_and_dict_mapping():
  target = {"enc/a": (2,), "enc/b": (3,), "head/w": (4,)}
  src = {"pre/a": (2,), "enc/b": (3,), "w": (4,)}
  copies = init_from.plan(target, src, init_from.InitFrom(
      path="x", mapping={"enc/a": r"pre/a", "enc/(.*)": r"enc/\1",
                         "head/(w)": r"\1"}))
  assert copies == {"enc/a": "pre/a", "enc/b": "enc/b", "head/w": "w"}


def test_hf_bert_into_a_subtree(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  # pylint: disable=g-import-not-at-top
  from recsys_jax.checkpoint_import import bert as bert_import
  from recsys_jax.checkpoint_import import common
  torch.manual_seed(0)
  hf = transformers.BertModel(transformers.BertConfig(
      vocab_size=30, hidden_size=16, num_hidden_layers=1,
      num_attention_heads=2, intermediate_size=24,
      max_position_embeddings=16))
  hf.save_pretrained(str(tmp_path))
  _, want = bert_import.load_hf_bert(str(tmp_path))
  want = _flat(want)
  # A model holding a BERT encoder under `text/` and a head of its own.
  abstract = bert_import.abstract_params(
      bert_import.load_bert_config(str(tmp_path)))
  params = common.unflatten_tree(
      {f"text/{k}": jax.numpy.zeros(v.shape, v.dtype)
       for k, v in param_tree.flatten(abstract).items()})
  params["head"] = {"w": jax.numpy.ones(3)}
  new, summary = init_from.initialise(params, init_from.InitFrom(
      path=str(tmp_path), mapping=[("text/(.*)", r"\1")]))
  got = _flat(new)
  assert summary.endswith(f"from {tmp_path} (Hugging Face checkpoint)")
  for k, v in want.items():
    np.testing.assert_array_equal(got[f"text/{k}"], v, err_msg=k)
  np.testing.assert_array_equal(got["head/w"], np.ones(3))



def test_gin_binding_and_whole_match_spellings():
  """As gin/runs/train.gin shows it; `\\0`, `\\g<0>` and a '\0' that gin
  (like Python) read as NUL all mean the whole target path."""
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin.parse_config(r"""
from __gin__ import dynamic_registration
from recsys_jax.core import init_from
init_from.InitFrom.path = '/runs/pretrain/export'
init_from.InitFrom.mapping = [('a/.*', '\\g<0>'), ('b/.*', r'\0'),
                              ('c/.*', '\0'), ('d/(.*)', 'e/\\1')]
""")
    spec = gin.get_configurable(init_from.InitFrom)()
  finally:
    gin.clear_config()
  assert spec.path == "/runs/pretrain/export"
  shapes = {"a/x": (1,), "b/y": (2,), "c/z": (3,), "d/w": (4,)}
  src = {"a/x": (1,), "b/y": (2,), "c/z": (3,), "e/w": (4,)}
  assert init_from.plan(shapes, src, spec) == {
      "a/x": "a/x", "b/y": "b/y", "c/z": "c/z", "d/w": "e/w"}


def test_several_sources_apply_in_order_and_bad_entries_are_named(tmp_path):
  from recsys_jax.core import init_from as lib  # pylint: disable=g-import-not-at-top
  a, b = lib.InitFrom(path="runs/a"), lib.InitFrom(path="runs/b")
  assert lib.as_list(None) == []
  assert lib.as_list(a) == [a]
  assert lib.as_list([a, b]) == [a, b]
  with pytest.raises(TypeError, match=r"got str .*@a/init_from.InitFrom"):
    lib.as_list([a, "runs/b"])
