"""Frozen parameters (OptimizerConfig.frozen): no update, no optimizer state,
no gradient; on the tiny Bert4Rec of tests/test_trainer.py with its encoder
block frozen (about half of its parameters)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recsys_jax.core import optimizer
from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from recsys_jax.model_lib import base
from tests import helpers
from tests.test_trainer import accumulation_case
from tests.test_trainer import favour_easy_item

FROZEN = ("blocks_.*",)  # the Transformer block of the one-layer model


def _config(frozen=FROZEN):
  # As accumulation_case's optimizer (eps=1e-6: see there), plus `frozen`.
  return optimizer.OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                   decay="constant", eps=1e-6, frozen=frozen)


def _mesh_and_rules():
  return (partitioning.make_mesh(1, devices=jax.devices()[:1]),
          partitioning.get_rules("data_parallel"))


def _init(model, tx):
  mesh, rules = _mesh_and_rules()
  state, _, _ = trainer.init_state(model, tx, jax.random.PRNGKey(0), mesh,
                                   rules)
  return state


def _is_frozen(path):
  return path.startswith("['blocks_0']")


def _nbytes(tree):
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def case():
  model, _, _, batch = accumulation_case()
  tx, schedule = optimizer.make_optimizer(_config(), 10)
  return model, tx, schedule, batch, favour_easy_item(_init(model, tx))


@pytest.fixture(scope="module")
def whole_batch_step(case):
  """The jitted step of `case` (num_microbatches=1), compiled once."""
  model, tx, schedule, _, _ = case
  return jax.jit(trainer.make_train_step(model, tx, schedule, frozen=FROZEN))


def test_half_frozen_training_keeps_frozen_leaves_bit_identical(
    case, whole_batch_step):
  model, _, _, batch, state = case
  before = helpers.flat(state.params)
  frozen = {k for k in before if _is_frozen(k)}
  sizes = {k: v.size for k, v in before.items()}
  share = sum(sizes[k] for k in frozen) / sum(sizes.values())
  assert 0.3 < share < 0.7, share  # about half of the parameters
  step = whole_batch_step
  rng = jax.random.PRNGKey(1)
  first, metrics = step(state, batch, rng)
  new = state
  for _ in range(3):
    new, _ = step(new, batch, rng)
  after = helpers.flat(new.params)
  for k in before:
    if k in frozen:
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)
      assert after[k].tobytes() == before[k].tobytes(), k  # bit-identical
    else:
      assert np.abs(after[k] - before[k]).max() > 0, f"{k} did not train"

  # The first step's trainable leaves are AdamW's (same clipping, decay,
  # moments) applied to the trainable leaves alone with their full-model
  # gradients: freezing changes nothing else.
  grads = jax.jit(jax.grad(lambda p: model.loss_fn(
      p, batch, jax.random.fold_in(rng, 0))[0]))(state.params)
  flat_grads = {k: v for k, v in helpers.flat(grads).items()
                if k not in frozen}
  flat_params = {k: jnp.asarray(v) for k, v in before.items()
                 if k not in frozen}
  ref_tx, _ = optimizer.make_optimizer(_config(frozen=()), 10)
  want = jax.jit(lambda g, p: optax.apply_updates(
      p, ref_tx.update(g, ref_tx.init(p), p)[0]))(flat_grads, flat_params)
  got = helpers.flat(first.params)
  for k in want:
    # Adam's first step is ~lr * g / (|g| + eps): float rounding of a
    # near-zero gradient element moves it by up to ~1e-6 (lr = 1e-2).
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5,
                               err_msg=k)
  # The gradient norm is that of the trainable gradients.
  np.testing.assert_allclose(metrics["grad_norm"],
                             optax.global_norm(flat_grads), rtol=1e-5)


def test_frozen_leaves_get_no_optimizer_state(case):
  model, tx, _, _, state = case
  params = state.params
  full_tx, _ = optimizer.make_optimizer(_config(frozen=()), 10)
  full = jax.eval_shape(full_tx.init, params)
  frozen = jax.eval_shape(tx.init, params)
  frozen_bytes = _nbytes([v for k, v in helpers.flat(params).items()
                          if _is_frozen(k)])
  # Adam keeps two moments per trained value; the frozen ones have none.
  assert _nbytes(full) - _nbytes(frozen) == 2 * frozen_bytes
  assert _nbytes(state.opt_state) == _nbytes(frozen)
  del model


def test_accumulating_steps_freeze_alike_and_reduce_only_trainable(
    case, whole_batch_step):
  """num_microbatches=2 and local accumulation equal the whole-batch step
  under freezing; local accumulation all-reduces the trainable gradients
  only (plus the model's 3 metric sums)."""
  model, tx, schedule, batch, state = case
  mesh, _ = _mesh_and_rules()
  rng = jax.random.PRNGKey(1)
  want, want_metrics = whole_batch_step(state, batch, rng)
  want = helpers.flat(want.params)
  before = helpers.flat(state.params)
  for local in (False, True):
    step = jax.jit(trainer.make_train_step(
        model, tx, schedule, num_microbatches=2, local_accumulation=local,
        mesh=mesh, frozen=FROZEN))
    new, metrics = step(state, batch, rng)
    got = helpers.flat(new.params)
    for k in want:
      if _is_frozen(k):
        assert got[k].tobytes() == before[k].tobytes(), (local, k)
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6,
                                 err_msg=f"local={local} {k}")
    for k in ("loss", "loss_sum", "weight_sum", "correct_sum", "grad_norm"):
      np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-5,
                                 err_msg=f"local={local} {k}")
    if local:
      hlo = step.lower(state, batch, rng).as_text()
      reduced = re.findall(r'"stablehlo\.all_reduce".*?\}\) : '
                           r"\(tensor<(\d+)xf32>\)", hlo, re.S)
      trainable, _ = optimizer.ParamPartition(
          state.params, FROZEN).counts(state.params)
      assert reduced == [str(trainable + 3)], reduced


class _SqrtModel(base.BaseModel):
  """Least squares plus sum(sqrt(s)) with s = 0: the gradient of s is
  infinite, so computing it would show in the gradient norm."""

  def get_initial_variables(self, rng, batch_size=2):
    del batch_size
    return {"params": {"w": jax.random.normal(rng, (4,)),
                       "s": jnp.zeros((3,))}}

  def loss_fn(self, params, batch, rng):
    del rng
    err = batch["x"] @ params["w"] - batch["y"]
    loss_sum = jnp.sum(err ** 2) + jnp.sum(jnp.sqrt(params["s"]))
    n = jnp.asarray(err.shape[0], jnp.float32)
    return loss_sum / n, {"loss_sum": loss_sum, "weight_sum": n}


def test_no_gradient_is_computed_for_frozen_leaves():
  model = _SqrtModel()
  gen = np.random.default_rng(0)
  batch = {"x": gen.normal(size=(4, 4)).astype(np.float32),
           "y": gen.normal(size=(4,)).astype(np.float32)}
  rng = jax.random.PRNGKey(0)
  for frozen, finite in (((), False), (("s",), True)):
    tx, schedule = optimizer.make_optimizer(
        optimizer.OptimizerConfig(warmup_steps=0, frozen=frozen), 10)
    params = model.get_initial_variables(rng)["params"]
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))
    for n in (1, 2):
      new, metrics = jax.jit(trainer.make_train_step(
          model, tx, schedule, num_microbatches=n, frozen=frozen))(
              state, batch, rng)
      assert bool(np.isfinite(metrics["grad_norm"])) == finite, (frozen, n)
      if finite:
        assert np.all(np.isfinite(new.params["w"]))
        assert np.abs(new.params["w"] - params["w"]).max() > 0
        np.testing.assert_array_equal(new.params["s"], params["s"])


def test_frozen_patterns_are_checked(case):
  _, _, _, _, state = case
  tx, _ = optimizer.make_optimizer(_config(("blocks_.*", "encoder/.*")), 10)
  with pytest.raises(ValueError) as err:
    tx.init(state.params)
  msg = str(err.value)
  assert "'encoder/.*' matches no parameter" in msg, msg
  assert "blocks_0/attention/key/bias" in msg, msg  # lists real paths
  assert "'blocks_.*'" not in msg, msg  # that one matched
  # A pattern matches the whole path, not a part of it.
  with pytest.raises(ValueError, match="'attention' matches no parameter"):
    optimizer.frozen_mask(state.params, ("attention",))
  with pytest.raises(ValueError, match="not a regular expression"):
    optimizer.OptimizerConfig(frozen=("blocks_(",))
  with pytest.raises(ValueError, match="expected a tuple"):
    optimizer.OptimizerConfig(frozen="blocks_.*")


def test_train_loop_prints_trainable_and_frozen_counts(tmp_path, capsys):
  model, _, _, batch = accumulation_case()
  mesh, rules = _mesh_and_rules()
  cfg = trainer.TrainLoopConfig(train_steps=1, batch_size=8, log_every=1,
                                checkpoint_every=1, keep_checkpoints=1)

  def batches(start):
    del start
    while True:
      yield batch

  state = trainer.train_loop(model, _config(), batches, cfg,
                             model_dir=str(tmp_path), mesh=mesh, rules=rules)
  out = capsys.readouterr().out
  flat = helpers.flat(state.params)
  frozen = sum(v.size for k, v in flat.items() if _is_frozen(k))
  total = sum(v.size for v in flat.values())
  assert (f"Parameters: {total:,} ({total - frozen:,} trainable, "
          f"{frozen:,} frozen by OptimizerConfig.frozen=('blocks_.*',))"
          in out), out
  # The progress line is built from the model's summary.
  assert re.search(r"^step 1/1 \| loss \d+\.\d{4} \| masked_accuracy "
                   r"\d\.\d{4} \| grad_norm \d+\.\d{3} \| lr ", out, re.M), out
