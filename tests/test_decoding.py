"""Greedy and beam search: cached vs uncached T5, and exact toy references."""

import itertools

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.models import t5
from recsys_jax.text import decoding
from recsys_jax.text import generation

EOS = 1


def bp(alpha, n):
  return ((5.0 + n) / 6.0) ** alpha


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# A toy model whose logits depend on the whole prefix through a per-row cache
# state s (s <- (7 s + token) mod P), so a wrongly reordered cache shows.
P = 13


class Toy:
  """logits(step t, state s) = table[t, s]; numpy and cached-step views."""

  def __init__(self, vocab, steps, seed, eos_bias=0.0):
    rng = np.random.RandomState(seed)
    self.table = rng.randn(steps, P, vocab).astype(np.float32) * 2
    self.table[..., EOS] += eos_bias
    self.vocab = vocab

  def step(self, tokens, cache):
    s = (cache["state"] * 7 + tokens[:, 0]) % P
    logits = jnp.asarray(self.table)[cache["index"], s]
    return logits, {"state": s, "index": cache["index"] + 1}

  def init_cache(self, states):
    return {"state": jnp.asarray(states, jnp.int32),
            "index": jnp.zeros((), jnp.int32)}

  def logp(self, prefix, s0=0):
    """log p(next | prefix) for a prefix of generated tokens."""
    s = s0
    for tok in (0,) + tuple(prefix):
      s = (s * 7 + tok) % P
    return log_softmax(self.table[len(prefix), s])


def test_expand_for_beams_layout():
  x = jnp.arange(6).reshape(3, 2)
  y = decoding.expand_for_beams(x, 2)
  np.testing.assert_array_equal(y, [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5],
                                    [4, 5]])


def test_greedy_pick_matches_argmax_and_log_softmax():
  rng = np.random.RandomState(0)
  logits = rng.randn(5, 300).astype(np.float32) * 4
  logits[1, [7, 150]] = 50.0  # a tie: the lower id wins, as argmax
  logits[2] = 0.0             # all tied
  token, log_prob = decoding.greedy_pick(jnp.asarray(logits))
  np.testing.assert_array_equal(np.asarray(token), logits.argmax(-1))
  assert int(token[1]) == 7 and int(token[2]) == 0
  want = log_softmax(logits)[np.arange(5), logits.argmax(-1)]
  np.testing.assert_allclose(np.asarray(log_prob), want, rtol=1e-6,
                             atol=1e-6)
  nan_row = logits[:1].copy()
  nan_row[0, 3] = np.nan
  assert int(decoding.greedy_pick(jnp.asarray(nan_row))[0][0]) == 299


def test_greedy_toy_matches_python_loop():
  toy = Toy(vocab=6, steps=7, seed=3, eos_bias=0.0)
  states = [0, 3, 5, 11]
  out = decoding.greedy_search(toy.step, toy.init_cache(states), batch_size=4,
                               max_decode_len=7, return_logits=True)
  for row, s0 in enumerate(states):
    prefix, total = [], 0.0
    while len(prefix) < 7 and (not prefix or prefix[-1] != EOS):
      lp = toy.logp(prefix, s0)
      prefix.append(int(np.argmax(lp)))
      total += lp[prefix[-1]]
    want = prefix + [0] * (7 - len(prefix))
    np.testing.assert_array_equal(np.asarray(out.tokens[row]), want)
    np.testing.assert_allclose(float(out.log_probs[row]), total, rtol=1e-5)
  # This seed has rows that end early and rows that do not.
  ended = (np.asarray(out.tokens) == EOS).any(axis=1)
  assert ended.any() and not ended.all()


def test_greedy_stops_when_all_rows_end():
  toy = Toy(vocab=5, steps=6, seed=1)
  toy.table[1, :, EOS] = 50.0  # every row ends at its second token
  out = decoding.greedy_search(toy.step, toy.init_cache([0, 4]), batch_size=2,
                               max_decode_len=6, return_logits=True)
  tokens = np.asarray(out.tokens)
  assert (tokens[:, 1] == EOS).all() and (tokens[:, 2:] == 0).all()
  # The loop stopped after step 2: later logits were never written.
  assert np.abs(np.asarray(out.logits)[:, :2]).max() > 0
  assert (np.asarray(out.logits)[:, 2:] == 0).all()


def exhaustive(toy, max_len, alpha):
  """All EOS-terminated sequences of <= max_len tokens, best score first."""
  out = []
  for n in range(1, max_len + 1):
    for body in itertools.product(
        [v for v in range(toy.vocab) if v != EOS], repeat=n - 1):
      seq = body + (EOS,)
      total = sum(toy.logp(seq[:i])[seq[i]] for i in range(n))
      out.append((total / bp(alpha, n), seq))
  return sorted(out, reverse=True)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_is_exhaustive_search(alpha):
  # V=4, T=3, K=18 >= every live set, so beam search must be exact.
  toy = Toy(vocab=4, steps=3, seed=2)
  res = decoding.beam_search(toy.step, toy.init_cache([0]), batch_size=1,
                             beam_size=18, max_decode_len=3, alpha=alpha)
  ref = exhaustive(toy, 3, alpha)
  assert len(ref) == 13
  scores = np.asarray(res.scores[0])
  np.testing.assert_allclose(scores[:13], [r[0] for r in ref], rtol=1e-5)
  for k, (_, seq) in enumerate(ref):
    want = list(seq) + [0] * (3 - len(seq))
    np.testing.assert_array_equal(np.asarray(res.tokens[0, k]), want)
  assert (scores[13:] < 0.5 * decoding.NEG_INF).all()  # placeholders last


def python_beam(toy, s0, k, t, alpha):
  """Plain-Python beam search with the same rules, without early stopping."""
  live, finished = [((), 0.0)], []
  for step in range(t):
    cands = sorted(((seq + (v,), lp + toy.logp(seq, s0)[v])
                    for seq, lp in live for v in range(toy.vocab)),
                   key=lambda c: -c[1])[:2 * k]
    live = [c for c in cands if c[0][-1] != EOS][:k]
    finished += [(lp / bp(alpha, step + 1), seq) for seq, lp in cands
                 if seq[-1] == EOS]
    finished = sorted(finished, reverse=True)[:k]
  if finished:
    return finished
  return [(lp / bp(alpha, t), seq) for seq, lp in live]


@pytest.mark.parametrize("alpha,eos_bias", [(0.0, 0.0), (0.6, 1.5),
                                            (1.0, 3.0)])
def test_beam_matches_python_reference(alpha, eos_bias):
  toy = Toy(vocab=7, steps=6, seed=3, eos_bias=eos_bias)
  states = [0, 2, 9]
  res = decoding.beam_search(toy.step, toy.init_cache(states), batch_size=3,
                             beam_size=3, max_decode_len=6, alpha=alpha)
  for row, s0 in enumerate(states):
    ref = python_beam(toy, s0, 3, 6, alpha)
    for k, (score, seq) in enumerate(ref):
      np.testing.assert_allclose(float(res.scores[row, k]), score, rtol=1e-5)
      want = list(seq) + [0] * (6 - len(seq))
      np.testing.assert_array_equal(np.asarray(res.tokens[row, k]), want)


def test_beam_returns_live_hypotheses_when_none_finish():
  toy = Toy(vocab=5, steps=4, seed=4)
  toy.table[..., EOS] = -1e4  # EOS never wins
  res = decoding.beam_search(toy.step, toy.init_cache([0]), batch_size=1,
                             beam_size=2, max_decode_len=4, alpha=0.6)
  ref = python_beam(toy, 0, 2, 4, 0.6)
  assert all(len(seq) == 4 and EOS not in seq for _, seq in ref)
  np.testing.assert_allclose(np.asarray(res.scores[0]), [r[0] for r in ref],
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(res.tokens[0]),
                                [list(r[1]) for r in ref])


# T5 ---------------------------------------------------------------------------


def random_params(config, seed=0):
  """Random float32 params with `T5(config)`'s tree, drawn in NumPy."""
  shapes = nn.unbox(jax.eval_shape(
      lambda: t5.init_params(config, jax.random.PRNGKey(0))))
  rng = np.random.RandomState(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "scale":
      return (1 + 0.2 * rng.randn(*s.shape)).astype(np.float32)
    std = 1.0 if name in ("embedding", "rel_embedding") else s.shape[0] ** -0.5
    return (std * rng.randn(*s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


ENC = np.array([[5, 9, 12, 3, 7, 0], [4, 4, 8, 0, 0, 0], [20, 2, 6, 8, 9, 10]],
               np.int32)
T = 7


@pytest.fixture(scope="module", params=["tied", "untied"])
def t5_case(request):
  config = t5.T5Config.tiny(
      relative_attention_max_distance=6,  # buckets saturate within T
      **({} if request.param == "tied" else dict(
          feed_forward_proj="gated-gelu", tie_word_embeddings=False)))
  params = random_params(config, seed=len(request.param))
  model = t5.T5(config)
  mask = ENC != 0
  encoded = jax.jit(lambda p: model.apply({"params": p}, ENC, mask,
                                          method=t5.T5.encode))(params)
  return model, params, encoded, mask


def _full_logits_fn(model, params, encoded, mask):
  """Uncached: recompute the whole (fixed-length, causal) prefix."""
  return jax.jit(lambda dec: model.apply({"params": params}, encoded, mask,
                                         dec, method=t5.T5.decode))


def test_cached_greedy_equals_uncached(t5_case):
  model, params, encoded, mask = t5_case
  fn, init_cache = generation.make_decoding_fns(model, params, encoded, mask,
                                                T)
  out = jax.jit(lambda c: decoding.greedy_search(
      fn, c, batch_size=3, max_decode_len=T, return_logits=True))(
          init_cache(3))
  full = _full_logits_fn(model, params, encoded, mask)
  # Reference loop: the prefix is padded to T; causality makes later
  # positions irrelevant to position i.
  dec = np.zeros((3, T), np.int32)
  done = np.zeros(3, bool)
  for i in range(T):
    logits = np.asarray(full(dec))[:, i]
    np.testing.assert_allclose(np.asarray(out.logits)[:, i], logits,
                               atol=1e-5, rtol=1e-5, err_msg=f"step {i}")
    nxt = np.where(done, 0, logits.argmax(-1))
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, i], nxt)
    done |= nxt == EOS
    if i + 1 < T:
      dec[:, i + 1] = nxt


def test_beam_of_one_equals_greedy(t5_case):
  model, params, encoded, mask = t5_case
  fn, init_cache = generation.make_decoding_fns(model, params, encoded, mask,
                                                T)
  greedy = decoding.greedy_search(fn, init_cache(3), batch_size=3,
                                  max_decode_len=T)
  beam = decoding.beam_search(fn, init_cache(3), batch_size=3, beam_size=1,
                              max_decode_len=T, alpha=0.0)
  np.testing.assert_array_equal(np.asarray(beam.tokens[:, 0]),
                                np.asarray(greedy.tokens))
  np.testing.assert_allclose(np.asarray(beam.scores[:, 0]),
                             np.asarray(greedy.log_probs), rtol=1e-5)


def test_beam_scores_match_uncached_rescoring(t5_case):
  """Every returned hypothesis re-scores to its reported score without cache.

  A cache not reordered along with its beams would break this.
  """
  model, params, encoded, mask = t5_case
  k, alpha, boost = 3, 0.6, 3.0
  eb = decoding.expand_for_beams(encoded, k)
  mb = decoding.expand_for_beams(mask, k)
  fn, init_cache = generation.make_decoding_fns(model, params, eb, mb, T)

  def boosted(tokens, cache):  # EOS made likely so some beams finish
    logits, cache = fn(tokens, cache)
    return logits.at[:, EOS].add(boost), cache
  res = decoding.beam_search(boosted, init_cache(3), batch_size=3,
                             beam_size=k, max_decode_len=T, alpha=alpha)
  tokens, scores = np.asarray(res.tokens), np.asarray(res.scores)
  full = _full_logits_fn(model, params, eb, mb)
  flat = tokens.reshape(3 * k, T)
  dec = np.concatenate([np.zeros((3 * k, 1), np.int32), flat[:, :-1]], 1)
  logits = np.array(full(dec))
  logits[..., EOS] += boost
  lp = np.take_along_axis(log_softmax(logits), flat[..., None], -1)[..., 0]
  n_finished = 0
  for r in range(3 * k):
    eos = np.flatnonzero(flat[r] == EOS)
    n = eos[0] + 1 if eos.size else T
    n_finished += bool(eos.size)
    assert (flat[r, n:] == 0).all()
    np.testing.assert_allclose(scores.reshape(-1)[r],
                               lp[r, :n].sum() / bp(alpha, n), rtol=1e-4,
                               err_msg=f"hypothesis {r}")
  assert n_finished > 0
  assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
  # Distinct hypotheses per example.
  for b in range(3):
    assert len({tuple(x) for x in tokens[b]}) == k


def test_generate_equals_the_search_over_expanded_rows(t5_case):
  """`generate` projects the encoder output once and expands the keys and
  values for the beams: the same hypotheses and scores as a search whose
  step closes over expanded encoder outputs."""
  model, params, encoded, mask = t5_case
  k = 3
  fn, init_cache = generation.make_decoding_fns(
      model, params, decoding.expand_for_beams(encoded, k),
      decoding.expand_for_beams(mask, k), T)
  want = decoding.beam_search(fn, init_cache(3), batch_size=3, beam_size=k,
                              max_decode_len=T, alpha=0.6)
  got = generation.generate(model, params, ENC, max_decode_len=T,
                            num_beams=k, alpha=0.6)
  np.testing.assert_array_equal(np.asarray(got.tokens),
                                np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores),
                             rtol=1e-5)
  greedy = generation.generate(model, params, ENC, max_decode_len=T)
  fn, init_cache = generation.make_decoding_fns(model, params, encoded, mask,
                                                T)
  ref = decoding.greedy_search(fn, init_cache(3), batch_size=3,
                               max_decode_len=T)
  np.testing.assert_array_equal(np.asarray(greedy.tokens[:, 0]),
                                np.asarray(ref.tokens))


def test_cached_step_does_not_project_the_encoder_output(t5_case):
  """Cross-attention keys/values are computed once per source: no matmul of
  a step reads `[N, L, d_model]` encoder rows."""
  model, params, encoded, mask = t5_case
  fn, init_cache = generation.make_decoding_fns(model, params, encoded, mask,
                                                T)
  jaxpr = jax.make_jaxpr(fn)(jnp.zeros((3, 1), jnp.int32), init_cache(3))
  rows = encoded.shape[0] * encoded.shape[1]

  def dots(eqns):
    for e in eqns:
      if e.primitive.name == "dot_general":
        yield e
      for sub in jax_core.jaxprs_in_params(e.params):
        yield from dots(sub.eqns)
  shapes = [tuple(v.aval.shape) for e in dots(jaxpr.jaxpr.eqns)
            for v in e.invars]
  assert shapes  # the step's matmuls were found
  d_model = encoded.shape[-1]
  assert not [s for s in shapes if s[-1] == d_model and
              int(np.prod(s[:-1])) == rows], shapes
  # ...whereas projecting the encoder output does read them.
  proj = jax.make_jaxpr(lambda x: generation.project_encoded(
      model, params, x))(encoded)
  assert any(int(np.prod(v.aval.shape[:-1])) == rows
             for e in dots(proj.jaxpr.eqns) for v in e.invars)


def test_generate_beam_and_bfloat16_run():
  config = t5.T5Config.tiny(dtype="bfloat16")
  params = random_params(config, seed=7)
  out = generation.generate(t5.T5(config), params, ENC, max_decode_len=5,
                            num_beams=2)
  assert out.tokens.shape == (3, 2, 5) and out.scores.shape == (3, 2)
  assert np.isfinite(np.asarray(out.scores)).all()


def test_bad_step_output_is_reported():
  with pytest.raises(ValueError, match="vocab"):
    decoding.greedy_search(lambda t, c: (jnp.zeros((2, 3, 4)), c), {},
                           batch_size=2, max_decode_len=3)
  with pytest.raises(ValueError, match="one token per step"):
    config = t5.T5Config.tiny()
    model = t5.T5(config)
    params = random_params(config)
    encoded = jnp.zeros((1, 3, config.d_model))
    fn, init_cache = generation.make_decoding_fns(model, params, encoded,
                                                  None, 4)
    fn(jnp.zeros((1, 2), jnp.int32), init_cache(1))
