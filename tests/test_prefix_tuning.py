"""Prefix keys/values (prefix tuning) through attention, T5 and generation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.models import layers
from recsys_jax.models import t5
from recsys_jax.text import generation

CONFIG = t5.T5Config.tiny(dropout_rate=0.0)
H, D = CONFIG.num_heads, CONFIG.d_kv


def _prefix(rng, batch, length, mask=None, scale=1.0):
  k_rng, v_rng = jax.random.split(rng)
  keys = scale * jax.random.normal(k_rng, (batch, length, H, D))
  values = scale * jax.random.normal(v_rng, (batch, length, H, D))
  if mask is None:
    mask = jnp.ones((batch, length), bool)
  return layers.PrefixKV(keys, values, jnp.asarray(mask, bool))


def _stack(rng, batch, length, num_layers, mask=None):
  return tuple(_prefix(r, batch, length, mask)
               for r in jax.random.split(rng, num_layers))


@pytest.fixture(scope="module")
def model_and_params():
  model = t5.T5(CONFIG)
  params = t5.init_params(CONFIG, jax.random.PRNGKey(0))
  return model, nn.meta.unbox(params)


def test_attention_with_prefix_matches_numpy():
  b, q, p = 2, 3, 4
  attn = layers.MultiHeadAttention(num_heads=H, head_dim=D, use_bias=False,
                                   scale_queries=False, joined_kv=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (b, q, CONFIG.d_model))
  prefix = _prefix(jax.random.PRNGKey(2), b, p,
                   mask=[[1, 1, 0, 1], [0, 0, 0, 0]])
  key_mask = jnp.asarray([[1, 1, 1], [1, 1, 0]], bool)
  params = nn.meta.unbox(attn.init(jax.random.PRNGKey(3), x)["params"])
  out = attn.apply({"params": params}, x, mask=layers.key_mask(key_mask),
                   prefix=prefix)
  # NumPy: softmax over [prefix keys ; own keys] per head.
  w = {n: np.asarray(params[n]["kernel"]) for n in ("query", "key", "value",
                                                    "out")}
  xs = np.asarray(x, np.float64)
  qh = (xs @ w["query"]).reshape(b, q, H, D)
  kh = np.concatenate([np.asarray(prefix.keys),
                       (xs @ w["key"]).reshape(b, q, H, D)], axis=1)
  vh = np.concatenate([np.asarray(prefix.values),
                       (xs @ w["value"]).reshape(b, q, H, D)], axis=1)
  allowed = np.concatenate([np.asarray(prefix.mask),
                            np.asarray(key_mask)], axis=1)
  logits = np.einsum("bqhd,bkhd->bhqk", qh, kh)
  logits = np.where(allowed[:, None, None, :], logits, -1e9)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  heads = np.einsum("bhqk,bkhd->bqhd", probs, vh).reshape(b, q, H * D)
  np.testing.assert_allclose(np.asarray(out), heads @ w["out"], rtol=2e-5,
                             atol=2e-5)


def test_masked_prefix_changes_nothing(model_and_params):
  model, params = model_and_params
  tokens = jnp.asarray([[5, 6, 7, 1], [8, 9, 1, 0]])
  dec = jnp.asarray([[0, 4, 5], [0, 6, 0]])
  plain = model.apply({"params": params}, tokens, dec)
  masked = lambda r, n: _stack(r, 2, 3, n, mask=np.zeros((2, 3), bool))
  out = model.apply({"params": params}, tokens, dec,
                    encoder_prefix=masked(jax.random.PRNGKey(4), 2),
                    decoder_prefix=masked(jax.random.PRNGKey(5), 2))
  np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-5,
                             atol=1e-5)
  live = model.apply({"params": params}, tokens, dec,
                     encoder_prefix=_stack(jax.random.PRNGKey(4), 2, 3, 2))
  assert not np.allclose(np.asarray(live), np.asarray(plain), atol=1e-3)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_a_layers_prefix_reaches_that_layer_first(model_and_params, stack):
  """Changing layer i's prefix leaves layers < i exactly as they were and
  changes layer i's output (later layers read it)."""
  model, params = model_and_params
  tokens = jnp.asarray([[5, 6, 7, 1], [8, 9, 1, 0]])
  dec = jnp.asarray([[0, 4, 5], [0, 6, 0]])
  base = _stack(jax.random.PRNGKey(6), 2, 3, 2)

  def layer_outputs(prefix):
    kw = {f"{stack}_prefix": prefix}
    _, state = model.apply({"params": params}, tokens, dec,
                           capture_intermediates=True, **kw)
    inter = state["intermediates"][stack]
    return [np.asarray(inter[f"layers_{i}"]["__call__"][0]) for i in
            range(2)]

  ref = layer_outputs(base)
  for i in range(2):
    changed = list(base)
    changed[i] = _prefix(jax.random.PRNGKey(20 + i), 2, 3)
    got = layer_outputs(tuple(changed))
    for j in range(i):
      np.testing.assert_array_equal(got[j], ref[j])
    assert not np.allclose(got[i], ref[i], atol=1e-4), (stack, i)


def test_cached_decoding_with_prefix_equals_teacher_forcing(
    model_and_params):
  model, params = model_and_params
  tokens = jnp.asarray([[5, 6, 7, 1], [8, 9, 1, 0]])
  mask = tokens != 0
  enc_prefix = _stack(jax.random.PRNGKey(7), 2, 2, 2)
  dec_prefix = _stack(jax.random.PRNGKey(8), 2, 3, 2,
                      mask=[[1, 1, 1], [1, 0, 1]])
  encoded = model.apply({"params": params}, tokens, mask,
                        prefix=enc_prefix, method="encode")
  steps = jnp.asarray([[0, 4, 5, 9], [0, 6, 3, 2]])
  full = model.apply({"params": params}, encoded, mask, steps,
                     prefix=dec_prefix, method="decode")
  fn, init_cache = generation.make_decoding_fns(
      model, params, encoded, mask, 4, decoder_prefix=dec_prefix)
  cache = init_cache(2)
  for t in range(4):
    logits, cache = fn(steps[:, t:t + 1], cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, t]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_prefix_row_by_row(model_and_params, num_beams):
  """Each row's prefix stays with its row (and its beams)."""
  model, params = model_and_params
  tokens = jnp.asarray([[5, 6, 7, 1], [8, 9, 1, 0]])
  enc_prefix = _stack(jax.random.PRNGKey(9), 2, 2, 2)
  dec_prefix = _stack(jax.random.PRNGKey(10), 2, 3, 2)
  both = generation.generate(model, params, tokens, max_decode_len=5,
                             num_beams=num_beams, encoder_prefix=enc_prefix,
                             decoder_prefix=dec_prefix)
  plain = generation.generate(model, params, tokens, max_decode_len=5,
                              num_beams=num_beams)
  assert not np.array_equal(np.asarray(both.scores), np.asarray(plain.scores))
  row = lambda prefix, r: jax.tree.map(lambda x: x[r:r + 1], prefix)
  for r in range(2):
    alone = generation.generate(
        model, params, tokens[r:r + 1], max_decode_len=5,
        num_beams=num_beams, encoder_prefix=row(enc_prefix, r),
        decoder_prefix=row(dec_prefix, r))
    np.testing.assert_array_equal(np.asarray(alone.tokens[0]),
                                  np.asarray(both.tokens[r]))
    np.testing.assert_allclose(np.asarray(alone.scores[0]),
                               np.asarray(both.scores[r]), rtol=1e-5)


def test_bad_prefixes_are_named(model_and_params):
  model, params = model_and_params
  tokens = jnp.asarray([[5, 6, 1]])
  dec = jnp.asarray([[0, 4]])
  with pytest.raises(ValueError, match="encoder prefix has 1 layers"):
    model.apply({"params": params}, tokens, dec,
                encoder_prefix=_stack(jax.random.PRNGKey(0), 1, 2, 1))
  wrong = layers.PrefixKV(jnp.zeros((1, 2, H + 1, D)),
                          jnp.zeros((1, 2, H + 1, D)), jnp.ones((1, 2), bool))
  with pytest.raises(ValueError, match="prefix keys must be"):
    model.apply({"params": params}, tokens, dec,
                decoder_prefix=(wrong, wrong))
