"""Bert4Rec module and layers: references, masking, packing, logical axes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.models import bert4rec
from recsys_jax.models import layers

N = 20
CFG = bert4rec.Bert4RecConfig(num_items=N, max_len=8, hidden=16, num_layers=2,
                              num_heads=2, mlp_dim=32, dropout_rate=0.1,
                              attention_dropout_rate=0.1)
ALLOWED_AXES = {"vocab", "embed", "mlp", "heads", "kv", "joined_kv", "length",
                "latents", "queries"}




def jitted(module, fn="apply"):
  """module.apply / module.init under jit: eager Flax is slow on CPU."""
  return jax.jit(getattr(module, fn),
                 static_argnames=("method", "deterministic"))


@pytest.fixture(scope="module")
def apply():
  """One jitted apply shared by the tests, so equal signatures compile once."""
  return jitted(bert4rec.Bert4Rec(CFG))


@pytest.fixture(scope="module")
def params():
  module = bert4rec.Bert4Rec(CFG)
  variables = jitted(module, "init")(jax.random.PRNGKey(0),
                                     jnp.ones((2, CFG.max_len), jnp.int32),
                                     method=bert4rec.Bert4Rec.all_logits)
  return variables["params"]


def boxed_leaves(tree):
  return jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def test_config_vocab_padding_and_validation():
  assert CFG.mask_id == N + 1
  assert CFG.padded_vocab == 128
  assert bert4rec.Bert4RecConfig(num_items=126).padded_vocab == 128
  assert bert4rec.Bert4RecConfig(num_items=127).padded_vocab == 256
  assert bert4rec.Bert4RecConfig(num_items=5,
                                 vocab_pad_multiple=4).padded_vocab == 8
  with pytest.raises(ValueError, match="divisible by num_heads"):
    bert4rec.Bert4RecConfig(num_items=5, hidden=10, num_heads=3)
  with pytest.raises(ValueError, match="num_items"):
    bert4rec.Bert4RecConfig(num_items=0)
  with pytest.raises(ValueError, match="dtype"):
    bert4rec.Bert4RecConfig(num_items=5, dtype=jnp.float16)
  with pytest.raises(ValueError, match=r"Bert4RecConfig\.dropout_rate=1\.0"):
    bert4rec.Bert4RecConfig(num_items=5, dropout_rate=1.0)
  with pytest.raises(ValueError, match="attention_dropout_rate=-0.1"):
    bert4rec.Bert4RecConfig(num_items=5, attention_dropout_rate=-0.1)


def test_every_parameter_has_logical_axes(params):
  leaves = boxed_leaves(params)
  by_name = {}
  for path, leaf in leaves:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{name} is not boxed"
    assert len(leaf.names) == leaf.value.ndim, name
    assert set(leaf.names) <= ALLOWED_AXES, (name, leaf.names)
    assert leaf.value.dtype == jnp.float32, name
    by_name[name] = leaf.names
  assert by_name["item_embed/embedding"] == ("vocab", "embed")
  assert by_name["position_embed/embedding"] == ("length", "embed")
  assert by_name["output_bias"] == ("vocab",)
  assert by_name["blocks_0/attention/query/kernel"] == ("embed", "heads", "kv")
  assert by_name["blocks_0/attention/out/kernel"] == ("heads", "kv", "embed")
  assert by_name["blocks_1/mlp/wi/kernel"] == ("embed", "mlp")
  assert by_name["blocks_1/mlp/wo/kernel"] == ("mlp", "embed")
  assert by_name["embed_norm/scale"] == ("embed",)
  assert params["item_embed"]["embedding"].value.shape == (128, 16)
  # The partition specs the trainer derives resolve for every leaf.
  specs = nn.get_partition_spec(params)
  assert len(jax.tree_util.tree_leaves(specs)) == len(leaves)


# Every parameter of CFG's Bert4Rec (blocks_1 repeats blocks_0): a golden of
# names and shapes, so a refactor of the shared layers cannot silently break
# the quick start's checkpoints and exports.
PARAM_SHAPES = {
    "embed_norm/bias": (16,),
    "embed_norm/scale": (16,),
    "final_norm/bias": (16,),
    "final_norm/scale": (16,),
    "item_embed/embedding": (128, 16),
    "output_bias": (128,),
    "position_embed/embedding": (8, 16),
    "transform_dense/bias": (16,),
    "transform_dense/kernel": (16, 16),
    "transform_norm/bias": (16,),
    "transform_norm/scale": (16,),
}
for _block in ("blocks_0", "blocks_1"):
  PARAM_SHAPES.update({
      f"{_block}/attention/{proj}/kernel": (16, 2, 8)
      for proj in ("query", "key", "value")})
  PARAM_SHAPES.update({
      f"{_block}/attention/{proj}/bias": (2, 8)
      for proj in ("query", "key", "value")})
  PARAM_SHAPES.update({
      f"{_block}/attention/out/kernel": (2, 8, 16),
      f"{_block}/attention/out/bias": (16,),
      f"{_block}/attention_norm/bias": (16,),
      f"{_block}/attention_norm/scale": (16,),
      f"{_block}/mlp/wi/bias": (32,),
      f"{_block}/mlp/wi/kernel": (16, 32),
      f"{_block}/mlp/wo/bias": (16,),
      f"{_block}/mlp/wo/kernel": (32, 16),
      f"{_block}/mlp_norm/bias": (16,),
      f"{_block}/mlp_norm/scale": (16,),
  })


def test_parameter_tree_golden(params):
  got = {"/".join(str(k.key) for k in path): tuple(leaf.shape)
         for path, leaf in jax.tree_util.tree_leaves_with_path(
             nn.meta.unbox(params))}
  assert got == PARAM_SHAPES


def test_gelu_and_mlp_match_numpy():
  """layers.gelu (erf form) against float64 erf; the MLP (2-D matmuls over
  flattened rows) against NumPy on a [B, L, E] input."""
  import math  # pylint: disable=g-import-not-at-top
  erf = np.vectorize(math.erf)
  x = np.linspace(-8.0, 8.0, 4001)
  ref = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
  got = np.asarray(layers.gelu(jnp.asarray(x, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(
      got, np.asarray(jax.nn.gelu(jnp.asarray(x, jnp.float32),
                                  approximate=False)), atol=1e-6)

  xb = np.random.default_rng(4).normal(size=(2, 5, 8)).astype(np.float32)
  mlp = layers.Mlp(mlp_dim=12)
  p = nn.meta.unbox(jitted(mlp, "init")(jax.random.PRNGKey(0), xb)["params"])
  p = jax.tree.map(
      lambda a: a + 0.1 * np.random.default_rng(5).normal(size=a.shape), p)
  out = np.asarray(jitted(mlp)({"params": p}, xb))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  h = xb @ p["wi"]["kernel"] + p["wi"]["bias"]
  h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
  ref = h @ p["wo"]["kernel"] + p["wo"]["bias"]
  assert out.shape == xb.shape
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_packing_matches_separate_rows(params, apply):
  user_a = [3, 7, 21, 9]
  user_b = [12, 21, 5]
  packed = np.array([user_a + user_b + [0]])
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0]])
  alone = np.array([user_a + [0] * 4, user_b + [0] * 5])
  h_packed = np.asarray(apply({"params": params}, packed,
                                     segment_ids=seg, positions=pos))
  h_alone = np.asarray(apply({"params": params}, alone))
  np.testing.assert_allclose(h_packed[0, :4], h_alone[0, :4], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(h_packed[0, 4:7], h_alone[1, :3], rtol=1e-5,
                             atol=1e-5)
  # Without the segment mask the users would see each other.
  h_leaky = np.asarray(apply({"params": params}, packed, positions=pos))
  assert np.abs(h_leaky[0, :4] - h_alone[0, :4]).max() > 1e-3
  # Trailing padding does not change the hidden states of real items.
  h_short = np.asarray(apply({"params": params},
                                    np.array([user_a])))
  np.testing.assert_allclose(h_short[0], h_alone[0, :4], rtol=1e-5,
                             atol=1e-5)


def test_logits_never_select_pad_mask_or_padding_rows(params, apply):
  p = nn.meta.unbox(params)
  invalid = np.r_[0, N + 1:CFG.padded_vocab]
  # Make the non-item rows as attractive as possible.
  bias = p["output_bias"].at[invalid].set(1e6)
  table = p["item_embed"]["embedding"].at[invalid].multiply(100.0)
  p = {**p, "output_bias": bias, "item_embed": {"embedding": table}}
  ids = np.array([[1, 2, 21, 4, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11, 21]])
  logits = np.asarray(apply({"params": p}, ids,
                                   method=bert4rec.Bert4Rec.all_logits))
  assert logits.shape == (2, 8, CFG.padded_vocab)
  assert np.all(logits[..., invalid] <= -1e8)
  assert np.all(logits[..., 1:N + 1] > -1e8)
  top = logits.argmax(-1)
  assert np.all((top >= 1) & (top <= N))
  # The tied output: logits = output_query(h) @ table.T + bias at items.
  h = apply({"params": p}, ids)
  q = np.asarray(apply({"params": p}, h,
                              method=bert4rec.Bert4Rec.output_query))
  ref = q @ np.asarray(table).T + np.asarray(bias)
  np.testing.assert_allclose(logits[..., 1:N + 1], ref[..., 1:N + 1],
                             rtol=1e-4, atol=1e-4)


def test_dropout_and_errors(params, apply):
  ids = np.array([[1, 2, 21, 4, 0, 0, 0, 0]])
  det1 = apply({"params": params}, ids)
  det2 = apply({"params": params}, ids)
  np.testing.assert_array_equal(det1, det2)
  drop = apply({"params": params}, ids, deterministic=False,
                      rngs={"dropout": jax.random.PRNGKey(3)})
  assert np.abs(np.asarray(drop) - np.asarray(det1)).max() > 1e-3
  with pytest.raises(ValueError, match="max_len=8"):
    apply({"params": params}, np.ones((1, 9), np.int32))


def test_bfloat16_and_post_layer_norm(params, apply):
  ids = np.array([[1, 2, 21, 4, 5, 0, 0, 0]])
  f32 = np.asarray(apply({"params": params}, ids,
                         method=bert4rec.Bert4Rec.all_logits))
  bf16_cfg = bert4rec.Bert4RecConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  bf16 = bert4rec.Bert4Rec(bf16_cfg)
  h = jax.eval_shape(lambda p: bf16.apply({"params": p}, ids), params)
  assert h.dtype == jnp.bfloat16
  logits = jitted(bf16)({"params": params}, ids,
                        method=bert4rec.Bert4Rec.all_logits)
  assert logits.dtype == jnp.float32  # loss-side math stays float32
  vocab_ids = np.arange(CFG.padded_vocab)
  valid = (vocab_ids >= 1) & (vocab_ids <= CFG.num_items)  # items 1..N
  np.testing.assert_array_equal(np.asarray(logits)[..., ~valid], -1e9)
  np.testing.assert_allclose(np.asarray(logits)[..., valid], f32[..., valid],
                             atol=0.05)
  post_cfg = bert4rec.Bert4RecConfig(**{**CFG.__dict__,
                                        "pre_layer_norm": False})
  post_params = jax.eval_shape(
      lambda r: bert4rec.Bert4Rec(post_cfg).init(
          r, ids, method=bert4rec.Bert4Rec.all_logits),
      jax.random.PRNGKey(0))["params"]
  assert "final_norm" not in post_params and "final_norm" in params


def _numpy_positions_from_end(ids, seg=None):
  ids = np.asarray(ids)
  seg = (ids != 0).astype(int) if seg is None else np.asarray(seg)
  out = np.zeros_like(ids)
  for b in range(ids.shape[0]):
    for i in range(ids.shape[1]):
      if ids[b, i]:
        out[b, i] = sum(1 for j in range(i + 1, ids.shape[1])
                        if ids[b, j] and seg[b, j] == seg[b, i])
  return out


def test_positions_from_end_against_numpy():
  rng = np.random.default_rng(0)
  ids = np.array([[5, 6, 7, 0, 0, 0], [0, 0, 3, 4, 9, 2], [1, 2, 3, 4, 9, 2]])
  np.testing.assert_array_equal(bert4rec.positions_from_end(ids),
                                _numpy_positions_from_end(ids))
  seg = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 2, 3]])
  np.testing.assert_array_equal(bert4rec.positions_from_end(ids, seg),
                                _numpy_positions_from_end(ids, seg))
  lengths = rng.integers(0, 7, size=16)
  ids = np.where(np.arange(6)[None] < lengths[:, None],
                 rng.integers(1, N + 2, size=(16, 6)), 0)
  np.testing.assert_array_equal(bert4rec.positions_from_end(ids),
                                _numpy_positions_from_end(ids))


def test_positions_from_end_same_for_any_padding_or_packing():
  cfg = dataclasses.replace(CFG, positions_from_end=True)
  module = bert4rec.Bert4Rec(cfg)
  variables = jitted(module, "init")(jax.random.PRNGKey(1),
                                     jnp.ones((2, cfg.max_len), jnp.int32),
                                     method=bert4rec.Bert4Rec.all_logits)
  run = jitted(module)
  user_a, user_b = [3, 7, 21, 9], [12, 21, 5]
  right = np.array([user_a + [0] * 4, user_b + [0] * 5])
  left = np.array([[0] * 4 + user_a, [0] * 5 + user_b])
  packed = np.array([user_a + user_b + [0]])
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  h_right = np.asarray(run(variables, right))
  h_left = np.asarray(run(variables, left))
  # Packed rows' `positions` (counted from the start) are ignored.
  h_packed = np.asarray(run(variables, packed, segment_ids=seg,
                            positions=np.zeros_like(packed)))
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_left[0, 4:], h_right[0, :4], **tol)
  np.testing.assert_allclose(h_left[1, 5:], h_right[1, :3], **tol)
  np.testing.assert_allclose(h_packed[0, :4], h_right[0, :4], **tol)
  np.testing.assert_allclose(h_packed[0, 4:7], h_right[1, :3], **tol)


def test_dropout_rate_scale_and_determinism():
  assert [layers.dropout_threshold(r) for r in (0.0, 0.001, 0.2, 0.5)] == [
      0, 1, 51, 128]
  with pytest.raises(ValueError, match="expected 0 <= rate < 1"):
    layers.dropout_threshold(1.0)
  x = jnp.ones((64, 50, 37), jnp.float32)  # last dim not a multiple of 4
  drop = layers.Dropout(0.2)
  apply = jax.jit(lambda rng: drop.apply({}, x, deterministic=False,
                                         rngs={"dropout": rng}))
  y = np.asarray(apply(jax.random.PRNGKey(0)))
  kept = y != 0
  scale = 256 / (256 - 51)
  np.testing.assert_allclose(y[kept], scale, rtol=1e-6)
  # 118,400 draws: the drop fraction within 4 standard deviations of 51/256.
  p = 51 / 256
  assert abs((1 - kept.mean()) - p) < 4 * np.sqrt(p * (1 - p) / y.size)
  assert abs(y.mean() - 1.0) < 0.01  # the expectation is preserved
  # Draws are not repeated along the padded last axis or across rows.
  assert not np.array_equal(kept[0], kept[1])
  np.testing.assert_array_equal(y, np.asarray(apply(jax.random.PRNGKey(0))))
  assert not np.array_equal(y, np.asarray(apply(jax.random.PRNGKey(1))))
  np.testing.assert_array_equal(
      drop.apply({}, x, deterministic=True), x)


def test_fan_in_init_scales_by_the_input_dims():
  key = jax.random.PRNGKey(3)
  for shape, input_dims, fan_in in [((64, 4, 16), 1, 64),     # q/k/v
                                    ((4, 16, 64), -1, 64),    # attn output
                                    ((64, 256), 1, 64),       # MLP in
                                    ((256, 64), -1, 256)]:    # MLP out
    w = np.asarray(layers.fan_in_init(input_dims)(key, shape))
    np.testing.assert_allclose(w.std(), fan_in ** -0.5, rtol=0.05)
    # Truncated at 2 sd of the underlying normal (stddev / 0.8796).
    assert np.abs(w).max() <= 2 * fan_in ** -0.5 / 0.8796 + 1e-6
  with pytest.raises(ValueError, match="input dims"):
    layers.fan_in_init(3)(key, (4, 4))


def test_init_option_sets_block_kernels_only():
  big = dataclasses.replace(CFG, hidden=64, mlp_dim=256, num_items=500)
  tokens = jnp.ones((2, big.max_len), jnp.int32)
  stds = {}
  for init in bert4rec.INITS:
    cfg = dataclasses.replace(big, init=init)
    p = nn.meta.unbox(jitted(bert4rec.Bert4Rec(cfg), "init")(
        jax.random.PRNGKey(0), tokens,
        method=bert4rec.Bert4Rec.all_logits)["params"])
    stds[init] = {
        "query": float(np.std(p["blocks_0"]["attention"]["query"]["kernel"])),
        "out": float(np.std(p["blocks_1"]["attention"]["out"]["kernel"])),
        "mlp_wo": float(np.std(p["blocks_0"]["mlp"]["wo"]["kernel"])),
        "transform": float(np.std(p["transform_dense"]["kernel"])),
        "items": float(np.std(p["item_embed"]["embedding"]))}
  # jax's truncated_normal(0.02) has stddev 0.02 * 0.88.
  for name in ("query", "out", "mlp_wo", "transform", "items"):
    np.testing.assert_allclose(stds["bert"][name], 0.0176, rtol=0.1)
  np.testing.assert_allclose(stds["fan_in"]["query"], 1 / 8, rtol=0.1)
  np.testing.assert_allclose(stds["fan_in"]["out"], 1 / 8, rtol=0.1)
  np.testing.assert_allclose(stds["fan_in"]["mlp_wo"], 1 / 16, rtol=0.1)
  np.testing.assert_allclose(stds["fan_in"]["transform"], 1 / 8, rtol=0.1)
  np.testing.assert_allclose(stds["fan_in"]["items"], 0.0176, rtol=0.1)
  with pytest.raises(ValueError, match=r"Bert4RecConfig\.init='xavier'"):
    dataclasses.replace(CFG, init="xavier")
