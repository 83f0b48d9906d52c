"""REGEN's item soft tokens inside the T5 wrapper (in process).

A tiny T5 over the tiny dataset's vocabulary (`builders.t5`) with an
`ItemSoftTokens` module over small random `ItemTables` (items 1..9; item 3
has no CF vector, item 4 no text vector), prefix mode, one soft token per
history item plus one for the next item. Checked against NumPy: the encoder
reads [soft tokens ; token embeddings] with the mask [history > 0 ; next > 0
; tokens != 0]; a history item changes its own row's logits and nothing
else; a masked prefix slot changes nothing; the loss's gradient reaches the
adapter and the learned missing vectors; with the LM frozen one train step
moves only `params['soft_tokens']`; the architecture record holds the module
config and the tables' sizes (also when `builders.item_soft_tokens` loads
them from the tiny data and a tiny text cache).
"""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from recsys_jax.model_lib import builders
from recsys_jax.model_lib import item_embeddings as ie
from recsys_jax.models import item_soft_tokens as ist
from tests import helpers

H = 4            # history slots
S = H + 1        # soft tokens: the history, then the next item
D_MODEL = 16
V = 10           # table rows: padding 0 and items 1..9
DC, DS = 3, 5    # CF and semantic widths
CF_MISSING_ITEM, SEM_MISSING_ITEM = 3, 4
FROZEN = ("token_embedder/.*", "encoder/.*", "decoder/.*")
T5_SIZES = dict(d_model=D_MODEL, num_heads=2, d_kv=8, d_ff=32,
                num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0)

# Row 0 reads item 3 (no CF row) and has a next item; row 1 has padding in
# its history and no next item; row 2 a full history. Item 4 (no text) is
# absent: the semantic missing vector gets no gradient from this batch.
HISTORY = np.array([[1, 2, 3, 0], [5, 6, 0, 0], [7, 8, 9, 2]], np.int32)
NEXT = np.array([[5], [0], [1]], np.int32)
ENCODER_LENGTHS = (5, 3, 2)   # prompt tokens per row (then 0-padding)
TARGET_LENGTHS = (6, 4, 5)    # target tokens per row, EOS included


def _tables():
  rng = np.random.default_rng(0)
  cf = rng.normal(size=(V, DC)).astype(np.float32)
  sem = rng.normal(size=(V, DS)).astype(np.float32)
  cf_missing = np.isin(np.arange(V), [0, CF_MISSING_ITEM])
  sem_missing = np.isin(np.arange(V), [0, SEM_MISSING_ITEM])
  cf[cf_missing] = 0
  sem[sem_missing] = 0
  return ie.ItemTables(cf=cf, semantic=sem, cf_missing=cf_missing,
                       semantic_missing=sem_missing, cf_source="random",
                       semantic_source="random")


TABLES = _tables()
CONFIG = ist.ItemSoftTokensConfig(d_model=D_MODEL, next_item=True)


def _model(with_module=True):
  if not with_module:
    return builders.t5(data_dir=helpers.prepared_dataset(), **T5_SIZES)
  return builders.t5(
      data_dir=helpers.prepared_dataset(), **T5_SIZES,
      soft_token_module=ist.ItemSoftTokens(CONFIG, TABLES),
      soft_token_inputs=builders.item_soft_token_inputs(max_history=H),
      soft_token_mode="prefix")


def _batch(model):
  """History and next items above; random prompt and target tokens."""
  rng = np.random.default_rng(1)
  vocab = model.vocabulary.vocab_size
  b = len(HISTORY)
  tokens = np.zeros((b, max(ENCODER_LENGTHS)), np.int32)
  targets = np.zeros((b, max(TARGET_LENGTHS)), np.int32)
  for r, (n, t) in enumerate(zip(ENCODER_LENGTHS, TARGET_LENGTHS)):
    tokens[r, :n] = rng.integers(3, vocab, n)
    targets[r, :t - 1] = rng.integers(3, vocab, t - 1)
    targets[r, t - 1] = 1  # EOS
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  return {"encoder_input_tokens": tokens, "decoder_input_tokens": inputs,
          "decoder_target_tokens": targets,
          "history_items": HISTORY.copy(), "next_item": NEXT.copy()}


def _np_soft_tokens(soft_params, history, nxt):
  """NumPy: per item [cf / |cf| ; sem / |sem|] (learned vector where
  missing) through the linear adapter, the marker on the next item, zeros
  where the id is 0."""
  p = nn.meta.unbox(soft_params)
  ids = np.concatenate([history, nxt], axis=1)
  y = np.asarray(p["bias"], np.float64)
  for source in ("cf", "semantic"):
    missing = np.asarray(getattr(TABLES, f"{source}_missing"))[ids]
    x = np.where(missing[..., None], np.asarray(p[f"{source}_missing"]),
                 np.asarray(getattr(TABLES, source))[ids])
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = y + x @ np.asarray(p[f"{source}_proj"]["kernel"], np.float64)
  y[:, -1] += np.asarray(p["next_marker"])
  return np.where((ids > 0)[..., None], y, 0.0)


@pytest.fixture(scope="module")
def setup():
  model = _model()
  params = nn.meta.unbox(jax.jit(model.get_initial_variables)(
      jax.random.PRNGKey(0)))["params"]
  return model, params, _batch(model)


_JITTED = {}


def _jitted(model, name):
  """`model.<name>` jitted once per model (each compiles once per shape)."""
  key = (id(model), name)
  if key not in _JITTED:
    _JITTED[key] = (model, jax.jit(getattr(model, name)))
  return _JITTED[key][1]


def _logits(model, params, batch):
  return np.asarray(_jitted(model, "logits")(params, batch))


def _loss(model, params, batch):
  return float(_jitted(model, "loss_fn")(params, batch, None)[0])


def _assert_rows(a, b, changed_rows):
  """Rows in `changed_rows` differ, every other row is equal."""
  for r in range(a.shape[0]):
    if r in changed_rows:
      assert np.abs(a[r] - b[r]).max() > 1e-4, f"row {r} did not change"
    else:
      np.testing.assert_allclose(a[r], b[r], rtol=0, atol=1e-6,
                                 err_msg=f"row {r} changed")


# -- where the soft tokens go -------------------------------------------------


def test_encoder_inputs_are_soft_tokens_then_token_embeddings(setup):
  model, params, batch = setup
  embeds, mask = jax.jit(model.encoder_inputs)(params, batch)
  embeds, mask = np.asarray(embeds), np.asarray(mask)
  tokens = batch["encoder_input_tokens"]
  assert embeds.shape == (3, S + tokens.shape[1], D_MODEL)
  np.testing.assert_array_equal(mask, np.concatenate(
      [HISTORY > 0, NEXT > 0, tokens != 0], axis=1))
  # The first S positions: the module's output (and its NumPy reference),
  # zeros at the masked slots.
  want = _np_soft_tokens(params["soft_tokens"], HISTORY, NEXT)
  np.testing.assert_allclose(embeds[:, :S], want, rtol=1e-5, atol=1e-6)
  soft, soft_mask = model.soft_token_module.apply(
      {"params": params["soft_tokens"]}, batch)
  # (jitted here, eager there: float rounding only)
  np.testing.assert_allclose(embeds[:, :S], soft, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mask[:, :S], soft_mask)
  assert np.all(embeds[:, :S][~mask[:, :S]] == 0)
  # The rest: the prompt's token embeddings (unscaled rows of the table).
  table = np.asarray(params["token_embedder"]["embedding"])
  np.testing.assert_array_equal(embeds[:, S:], table[tokens])


def test_history_and_next_items_change_their_rows_logits(setup):
  model, params, batch = setup
  base = _logits(model, params, batch)
  base_loss = _loss(model, params, batch)
  assert np.all(np.isfinite(base))
  changed = dict(batch, history_items=HISTORY.copy())
  changed["history_items"][1, 0] = 9  # row 1: [5, 6, 0, 0] -> [9, 6, 0, 0]
  _assert_rows(base, _logits(model, params, changed), {1})
  assert _loss(model, params, changed) != base_loss
  # A missing item (its learned vector) in place of a known one.
  missing = dict(batch, history_items=HISTORY.copy())
  missing["history_items"][2, 3] = CF_MISSING_ITEM
  _assert_rows(base, _logits(model, params, missing), {2})
  # The next item's soft token is read too.
  other_next = dict(batch, next_item=np.array([[6], [0], [1]], np.int32))
  _assert_rows(base, _logits(model, params, other_next), {0})


def test_masked_prefix_slots_are_ignored(setup):
  """Soft tokens as `soft_prefix` batch features (no module): the module's
  output gives the module model's logits; anything at a slot whose
  `soft_prefix_mask` is False changes nothing, at an unmasked slot it
  changes that row."""
  model, params, batch = setup
  plain = _model(with_module=False)
  t5_params, soft_params = model.split_params(params)
  soft, soft_mask = model.soft_token_module.apply({"params": soft_params},
                                                  batch)
  soft, soft_mask = np.asarray(soft), np.asarray(soft_mask)
  tokens_only = {k: v for k, v in batch.items()
                 if k not in ("history_items", "next_item")}
  prefix = dict(tokens_only, soft_prefix=soft, soft_prefix_mask=soft_mask)
  base = _logits(plain, t5_params, prefix)
  np.testing.assert_allclose(base, _logits(model, params, batch), rtol=1e-5,
                             atol=1e-5)
  # Large values at every masked slot (rows 1 and 2 each have some).
  assert (~soft_mask).sum() == 4
  noise = np.random.default_rng(2).normal(size=soft.shape) * 100
  garbage = np.where(~soft_mask[..., None], noise, soft).astype(np.float32)
  got = _logits(plain, t5_params, dict(prefix, soft_prefix=garbage))
  np.testing.assert_allclose(got, base, rtol=0, atol=1e-6)
  # The same change at an unmasked slot of row 0 is read.
  visible = soft.copy()
  visible[0, 1] += noise[0, 1].astype(np.float32)
  _assert_rows(base, _logits(plain, t5_params,
                             dict(prefix, soft_prefix=visible)), {0})


# -- training -----------------------------------------------------------------


def test_loss_gradient_reaches_the_soft_token_parameters(setup):
  model, params, batch = setup

  grad_fn = jax.jit(jax.grad(lambda p, b: model.loss_fn(p, b, None)[0]))

  def grads(b):
    g = grad_fn(params, b)
    return {k: np.asarray(v) for k, v in
            helpers.flat(g["soft_tokens"]).items()}

  g = grads(batch)
  assert set(g) == {"['bias']", "['cf_missing']", "['cf_proj']['kernel']",
                    "['next_marker']", "['semantic_missing']",
                    "['semantic_proj']['kernel']"}
  for k in ("['bias']", "['cf_proj']['kernel']", "['semantic_proj']['kernel']",
            "['next_marker']", "['cf_missing']"):  # item 3 is in the batch
    assert np.all(np.isfinite(g[k])) and np.abs(g[k]).max() > 0, k
  # No item without text in the batch (padding is masked): no gradient.
  np.testing.assert_array_equal(g["['semantic_missing']"], 0)
  # Item 4 (no text) instead of item 3 (no CF): the other way round.
  swapped = dict(batch, history_items=np.where(
      HISTORY == CF_MISSING_ITEM, SEM_MISSING_ITEM, HISTORY))
  g = grads(swapped)
  np.testing.assert_array_equal(g["['cf_missing']"], 0)
  assert np.abs(g["['semantic_missing']"]).max() > 0
  # No next item anywhere: the marker gets no gradient.
  g = grads(dict(batch, next_item=np.zeros_like(NEXT)))
  np.testing.assert_array_equal(g["['next_marker']"], 0)


def _nbytes(tree):
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def test_frozen_lm_trains_only_the_soft_tokens(setup):
  model, _, batch = setup
  cfg = trainer.OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                decay="constant", frozen=FROZEN)
  tx, schedule = trainer.make_optimizer(cfg, 10)
  mesh = partitioning.make_mesh(1, devices=jax.devices()[:1])
  rules = partitioning.get_rules("data_parallel")
  state, _, _ = trainer.init_state(model, tx, jax.random.PRNGKey(0), mesh,
                                   rules)
  # Both missing items in the batch: every soft-token leaf gets a gradient.
  both = dict(batch, history_items=np.where(
      HISTORY == 2, SEM_MISSING_ITEM, HISTORY))
  assert {CF_MISSING_ITEM, SEM_MISSING_ITEM} <= set(both["history_items"].flat)
  step = jax.jit(trainer.make_train_step(model, tx, schedule,
                                         frozen=cfg.frozen))
  with partitioning.with_rules(rules, mesh):
    new, metrics = step(state, both, jax.random.PRNGKey(1))
  assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
  before, after = helpers.flat(state.params), helpers.flat(new.params)
  assert {k.split("']")[0] + "']" for k in before} == {
      "['token_embedder']", "['encoder']", "['decoder']", "['soft_tokens']"}
  soft = [k for k in before if k.startswith("['soft_tokens']")]
  assert len(soft) == 6
  for k in before:
    if k in soft:
      assert np.abs(after[k] - before[k]).max() > 0, f"{k} did not train"
    else:
      assert after[k].tobytes() == before[k].tobytes(), f"{k} changed"
  # Adam moments only for the soft-token parameters.
  full_tx, _ = trainer.make_optimizer(
      dataclasses.replace(cfg, frozen=()), 10)
  frozen_bytes = _nbytes([before[k] for k in before if k not in soft])
  assert (_nbytes(jax.eval_shape(full_tx.init, state.params)) -
          _nbytes(state.opt_state)) == 2 * frozen_bytes


# -- the architecture record --------------------------------------------------


def test_architecture_records_module_config_and_table_sizes(setup):
  model, _, _ = setup
  arch = model.architecture()
  assert arch["soft_token_module"] == {
      "class": "ItemSoftTokens", "config": {
          k: v for k, v in dataclasses.asdict(CONFIG).items()
          if k != "items_feature"},  # left out at its default (old runs)
      "tables": {"num_items": V - 1, "cf_dim": DC, "semantic_dim": DS}}
  # Another items feature (CoLLM in ILM's slots) is another architecture.
  slots = builders.t5(
      data_dir=helpers.prepared_dataset(), **T5_SIZES,
      soft_token_module=ist.ItemSoftTokens(
          dataclasses.replace(CONFIG, items_feature="slot_items"), TABLES),
      soft_token_inputs=builders.item_soft_token_inputs(max_history=H))
  assert slots.architecture()["soft_token_module"]["config"][
      "items_feature"] == "slot_items"
  assert arch["soft_token_mode"] == "prefix"
  assert arch["d_model"] == D_MODEL
  assert json.loads(json.dumps(arch)) == arch  # stored as JSON
  # Another CF width is another architecture (a checkpoint restore check).
  wider = dataclasses.replace(
      TABLES, cf=np.zeros((V, DC + 1), np.float32))
  other = builders.t5(
      data_dir=helpers.prepared_dataset(), **T5_SIZES,
      soft_token_module=ist.ItemSoftTokens(CONFIG, wider),
      soft_token_inputs=builders.item_soft_token_inputs(max_history=H))
  assert other.architecture()["soft_token_module"]["tables"]["cf_dim"] == (
      DC + 1)
  assert other.architecture() != arch


def test_builder_tables_from_the_tiny_data(tmp_path):
  data_dir = helpers.prepared_dataset()
  _, train_items, num_items = ie.read_train_interactions(data_dir)
  assert num_items == 150
  pooled = np.random.default_rng(3).normal(size=(num_items, 6)).astype(
      np.float32)
  pooled[10] = 0  # item 11: no text vector
  cache = str(tmp_path / "cache")
  helpers.write_item_text_cache(cache, pooled)
  module = builders.item_soft_tokens(
      data_dir=data_dir, d_model=D_MODEL, cf_dim=4, als_iterations=1,
      item_text_cache=cache)
  tables = module.tables
  np.testing.assert_array_equal(np.asarray(tables.semantic)[1:], pooled)
  np.testing.assert_array_equal(
      np.flatnonzero(np.asarray(tables.semantic_missing)), [0, 11])
  # CF missing: items never in the leave-one-out train parts.
  untrained = np.bincount(train_items, minlength=num_items + 1) == 0
  np.testing.assert_array_equal(np.asarray(tables.cf_missing), untrained)
  model = builders.t5(
      data_dir=data_dir, **T5_SIZES, soft_token_module=module,
      soft_token_inputs=builders.item_soft_token_inputs(max_history=H))
  record = model.architecture()["soft_token_module"]
  assert record["tables"] == {"num_items": 150, "cf_dim": 4,
                              "semantic_dim": 6}
  assert record["config"]["next_item"] is True  # the builder's default
  # The CF-only ablation loads no text table (and needs no cache).
  cf_only = builders.item_soft_tokens(data_dir=data_dir, d_model=D_MODEL,
                                      sources="cf", cf_dim=4,
                                      als_iterations=1)
  assert np.shape(cf_only.tables.semantic) == (151, 0)
  with pytest.raises(ValueError, match="needs item_text_cache"):
    builders.item_soft_tokens(data_dir=data_dir, d_model=D_MODEL)
