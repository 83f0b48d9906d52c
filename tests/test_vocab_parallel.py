"""Vocab-parallel sharding of the item table: shardings, HLO, equivalence.

One subprocess with 8 emulated CPU devices builds a tiny Bert4Rec with the
real trainer pieces (init_state, make_train_step, jit_train_step) and the
Evaluator, under

  * 'dp':  mesh 8 x 1, rules 'data_parallel' (table replicated),
  * 'vp':  mesh 4 x 2, rules 'vocab_parallel' (table split over `model`),

trains a few steps on the same batches for each loss and writes what the
tests compare: losses, final parameters, state shardings, the compiled HLO's
array shapes and evaluation ranks. (A model axis of 8 runs in
benchmarks/million_items.py.) LLVM optimisation is off: it only changes the
host code, and makes the eight compilations four times faster.
"""

import json

import numpy as np
import pytest

from tests import helpers

NUM_ITEMS = 600   # padded vocabulary 640 = 5 * 128: no other dim has a 5
PADDED_VOCAB = 640

_SCRIPT = r'''
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from recsys_jax.core import partitioning, trainer
from recsys_jax.evaluation import evaluator as evaluation
from recsys_jax.model_lib import sequence as model_lib
from recsys_jax.models import bert4rec as b4

out_dir = sys.argv[1]
N, B, L, STEPS = 600, 16, 12, 2
config = b4.Bert4RecConfig(num_items=N, max_len=L, hidden=16, num_layers=1,
                           num_heads=2, mlp_dim=32, dropout_rate=0.1,
                           attention_dropout_rate=0.1)
gen = np.random.default_rng(0)
log_pop = np.log(np.arange(1, N + 1, dtype=np.float64) ** -0.8)
batches = []
for _ in range(STEPS):
  ids = gen.integers(1, N + 1, (B, L)).astype(np.int32)
  weights = (gen.random((B, L)) < 0.25).astype(np.float32)
  weights[:, -1] = 1.0
  targets = np.where(weights > 0, ids, 0).astype(np.int32)
  item_ids = np.where(weights > 0, config.mask_id, ids).astype(np.int32)
  batches.append({"item_ids": item_ids, "targets": targets,
                  "loss_weights": weights})
eval_ids = gen.integers(1, N + 1, (B, L)).astype(np.int32)
eval_targets = np.zeros_like(eval_ids)
eval_targets[:, -1] = eval_ids[:, -1]
eval_ids[:, -1] = config.mask_id
eval_ids[:3, :4] = 0  # some padding
eval_batch = {"item_ids": eval_ids, "targets": eval_targets,
              "valid": np.ones(B, np.float32)}

SETUPS = {"dp": (1, "data_parallel"), "vp": (2, "vocab_parallel")}
# "full_chunked": the full softmax in 4 chunks of 16 rows (one chunk of
# 64 otherwise).
LOSSES = ("full", "full_chunked", "sampled_uniform", "sampled_popularity",
          "in_batch")


def shapes_in_hlo(text):
  """Every array shape (dims tuple) in an HLO module's text."""
  found = set()
  for m in __import__("re").finditer(r"[a-z0-9]+\[([0-9,]*)\]", text):
    found.add(tuple(int(d) for d in m.group(1).split(",") if d))
  return sorted(found)


def leaf_specs(tree):
  """{path: [partition spec, per-device shard shape]} of an array tree."""
  return {jax.tree_util.keystr(p): [list(x.sharding.spec),
                                    list(x.sharding.shard_shape(x.shape))]
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


result = {}
final_params = {}
for loss in LOSSES:
  model = model_lib.Bert4RecModel(
      config, loss=loss.replace("_chunked", ""), num_negatives=16,
      max_predictions=4,
      item_log_popularity=log_pop if loss == "sampled_popularity" else None,
      loss_chunk_rows=16 if loss == "full_chunked" else None)
  # Adam's step lr * g / (|g| + eps) is ~ lr * g / eps for a gradient below
  # eps: with the default eps = 1e-8, an element whose gradient cancels to
  # ~3e-9 (the median is ~3e-5) turns float-rounding differences of ~1e-12
  # (another summation order under sharding) into ~2e-6 in the parameter.
  # eps = 1e-6 keeps that amplification 100x smaller; the tolerances stay.
  tx, schedule = trainer.make_optimizer(
      trainer.OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                              decay="constant", eps=1e-6), STEPS)
  for name in SETUPS:
    mp, rules_name = SETUPS[name]
    mesh = partitioning.make_mesh(mp)
    rules = partitioning.get_rules(rules_name)
    state, shardings, _ = trainer.init_state(model, tx, jax.random.PRNGKey(0),
                                             mesh, rules)
    step_fn = trainer.jit_train_step(trainer.make_train_step(model, tx,
                                                             schedule),
                                     shardings, mesh)
    rng = jax.random.PRNGKey(1)
    losses = []
    for i, b in enumerate(batches):
      gb = partitioning.host_to_global(b, mesh)
      with partitioning.with_rules(rules, mesh):
        if i == 0:
          step_fn = step_fn.lower(state, gb, rng).compile()
          hlo = step_fn.as_text()
        state, metrics = step_fn(state, gb, rng)
      losses.append(float(metrics["loss"]))
    key = f"{loss}/{name}"
    result[key] = {
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "losses": losses,
        "train_hlo_shapes": shapes_in_hlo(hlo),
        "param_specs": leaf_specs(state.params),
        "opt_specs": leaf_specs(state.opt_state),
        "table_shard_rows": sorted({s.data.shape[0] for s in
            state.params["item_embed"]["embedding"].addressable_shards}),
    }
    final_params[key] = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
                         jax.tree_util.tree_flatten_with_path(
                             state.params)[0]}
    if loss == "full":
      # Evaluation of one fixed set of parameters (dp's init) on this mesh.
      if name == "dp":
        eval_params_np = jax.tree.map(np.asarray, state.params)
      params = jax.device_put(eval_params_np,
                              jax.tree.map(lambda x: x.sharding,
                                           state.params))
      for protocol, exclude in (("full", False), ("full", True),
                                ("sampled", False)):
        cfg = evaluation.EvalConfig(protocol=protocol,
                                    exclude_history=exclude,
                                    negative_sampling="uniform",
                                    num_negatives=50, batch_size=B)
        ev = evaluation.Evaluator(model, mesh, rules, cfg)
        model_batch = {k: v for k, v in eval_batch.items() if k != "valid"}
        model_batch["negatives"] = (
            np.random.default_rng(7).integers(1, N + 1, (B, 50)).astype(
                np.int32) if protocol == "sampled"
            else np.zeros((B, 1), np.int32))
        gb = partitioning.host_to_global(model_batch, mesh)
        negs = gb.pop("negatives")
        with partitioning.with_rules(rules, mesh):
          # (ranks, top-k ids): the top-k of the beyond-accuracy metrics.
          ranks = ev._rank(params, gb, negs)[0]  # pylint: disable=protected-access
          if protocol == "full" and not exclude and name != "dp":
            eval_hlo = ev._rank.lower(params, gb, negs).compile().as_text()  # pylint: disable=protected-access
            result[key]["eval_hlo_shapes"] = shapes_in_hlo(eval_hlo)
        result[key][f"ranks/{protocol}/{exclude}"] = np.asarray(
            ranks).tolist()
        result[key][f"metrics/{protocol}/{exclude}"] = ev.evaluate(
            params, [eval_batch])
np.savez(os.path.join(out_dir, "params.npz"),
         **{f"{k}|{p}": v for k, d in final_params.items()
            for p, v in d.items()})
with open(os.path.join(out_dir, "result.json"), "w") as f:
  json.dump(result, f)
'''


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp("vocab_parallel")
  env = helpers.subprocess_env(xla_devices=8)
  env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
  helpers.run_script(_SCRIPT, [str(out)], env=env, timeout=600).check()
  with open(out / "result.json") as f:
    res = json.load(f)
  npz = np.load(out / "params.npz")
  params = {}
  for k in npz.files:
    run, path = k.split("|", 1)
    params.setdefault(run, {})[path] = npz[k]
  return res, params


TABLE = "['item_embed']['embedding']"
BIAS = "['output_bias']"


def _vocab_leaf(path):
  return "item_embed" in path or "output_bias" in path


def test_table_bias_and_their_adam_state_are_split_over_model(result):
  res, _ = result
  for key in ("full/vp", "sampled_uniform/vp", "in_batch/vp"):
    run = res[key]
    model_size = run["mesh"]["model"]
    rows = PADDED_VOCAB // model_size
    specs = run["param_specs"]
    assert specs[TABLE] == [["model", None], [rows, 16]], key
    assert specs[BIAS] == [["model"], [rows]], key
    assert run["table_shard_rows"] == [rows]
    # Adam's mu and nu of the table and bias: same split; everything else
    # (and every leaf under data parallelism) replicated.
    opt = run["opt_specs"]
    vocab_leaves = [p for p in opt if _vocab_leaf(p)]
    assert len(vocab_leaves) == 4, vocab_leaves  # mu, nu x (table, bias)
    for path, (spec, shard) in opt.items():
      if _vocab_leaf(path):
        assert spec[:1] == ["model"], (path, spec)
        assert shard[0] == rows, (path, shard)
      else:
        assert "model" not in spec, (path, spec)
    for path, (spec, _) in specs.items():
      if not _vocab_leaf(path):
        assert "model" not in spec, (path, spec)
  for path, (spec, shard) in res["full/dp"]["opt_specs"].items():
    if path.endswith(TABLE):
      assert shard == [PADDED_VOCAB, 16], (path, spec)


@pytest.mark.parametrize("loss", ["full", "full_chunked", "sampled_uniform",
                                  "in_batch", "sampled_popularity"])
def test_train_step_holds_no_full_vocab_dimension(result, loss):
  """Compiled per-device HLO: no array has a padded-vocab or catalogue-size
  axis, so no [batch, items] logits (nor the table) are gathered.

  The popularity sampler is the one exception, by design: its alias table
  and log-q vector are replicated per-item vectors ([N] and [V], 4 bytes an
  item each, like one more bias), never [K, N] noise or [batch, N] logits.
  """
  res, _ = result
  key = f"{loss}/vp"
  shapes = [tuple(s) for s in res[key]["train_hlo_shapes"]]
  rows = PADDED_VOCAB // res[key]["mesh"]["model"]
  assert (rows, 16) in shapes, key  # the local table shard is there
  full = [s for s in shapes if PADDED_VOCAB in s or NUM_ITEMS in s]
  if loss == "sampled_popularity":
    full = [s for s in full if len(s) != 1]
  assert not full, (key, full)


def test_eval_step_holds_no_full_vocab_dimension(result):
  res, _ = result
  shapes = [tuple(s) for s in res["full/vp"]["eval_hlo_shapes"]]
  assert not [s for s in shapes if PADDED_VOCAB in s or NUM_ITEMS in s], shapes
  assert (4, NUM_ITEMS // 2) in shapes  # each device: its rows' half scores
  # The check can see a full axis: data parallelism has one.
  dp = [tuple(s) for s in res["full/dp"]["train_hlo_shapes"]]
  assert any(PADDED_VOCAB in s for s in dp)


@pytest.mark.parametrize("loss", ["full", "full_chunked", "sampled_uniform",
                                  "sampled_popularity", "in_batch"])
def test_vocab_sharded_training_equals_replicated(result, loss):
  res, params = result
  runs = [k for k in res if k.startswith(loss + "/")]
  ref = res[f"{loss}/dp"]
  assert np.all(np.isfinite(ref["losses"]))
  assert ref["losses"][0] != ref["losses"][-1]
  for key in runs:
    np.testing.assert_allclose(res[key]["losses"], ref["losses"], rtol=2e-5,
                               err_msg=key)
    # atol 1e-5 against parameter updates of ~lr x steps = 2e-2: Adam
    # turns another summation order's ~1e-12 into up to ~5e-6 on the odd
    # element whose gradient nearly cancels (seen: 1 of 256 output-transform
    # kernel elements once its matmul became 2-D, layers.matmul_2d).
    for path, want in params[f"{loss}/dp"].items():
      np.testing.assert_allclose(params[key][path], want, rtol=1e-4,
                                 atol=1e-5, err_msg=f"{key} {path}")


def test_sharded_evaluation_ranks_equal_unsharded_exactly(result):
  res, _ = result
  ref = res["full/dp"]
  keys = [k for k in ref if k.startswith(("ranks/", "metrics/"))]
  assert len(keys) == 6
  for k in keys:
    assert res["full/vp"][k] == ref[k], k
  ranks = np.asarray(ref["ranks/full/False"])
  assert ranks.min() >= 0 and ranks.max() < NUM_ITEMS
  assert len(set(ranks.tolist())) > 4  # not a degenerate constant
  # Excluding history can only improve a rank.
  assert np.all(np.asarray(ref["ranks/full/True"]) <= ranks)


def test_chunked_full_softmax_trains_as_one_chunk(result):
  """4 chunks of 16 rows (a scan whose gradients are taken in the forward
  pass) train to the same losses and parameters as one chunk of 64."""
  res, params = result
  for mesh in ("dp", "vp"):
    np.testing.assert_allclose(res[f"full_chunked/{mesh}"]["losses"],
                               res[f"full/{mesh}"]["losses"], rtol=2e-5)
    for path, want in params[f"full/{mesh}"].items():
      np.testing.assert_allclose(params[f"full_chunked/{mesh}"][path], want,
                                 rtol=1e-4, atol=1e-6, err_msg=path)
