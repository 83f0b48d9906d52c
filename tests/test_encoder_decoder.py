"""EncoderDecoderModel: loss, scores and decoding against step-by-step
references; the soft-token paths against the token path they stand for."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.model_lib import base
from recsys_jax.model_lib import encoder_decoder as ed
from recsys_jax.models import t5 as t5_lib
from recsys_jax.text import decoding

VOCAB = 64
SLOT = 63


def _config(**kw):
  return t5_lib.T5Config.tiny(**{"vocab_size": VOCAB, "dropout_rate": 0.0,
                                 **kw})


def _params(model, seed=0):
  return nn.meta.unbox(model.get_initial_variables(
      jax.random.PRNGKey(seed))["params"])


class _Jitted:
  """The model's functions, jitted once per model (eager Flax is slow)."""

  def __init__(self, model):
    self.logits = jax.jit(model.logits)
    self.score = jax.jit(model.score_batch)
    self.loss = jax.jit(model.loss_fn)


def _shift_right(targets):
  return np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], 1)


def _batch(rng, b=3, length=7, t=5):
  enc = rng.integers(3, SLOT, size=(b, length)).astype(np.int32)
  enc[0, 5:] = 0  # right padding
  enc[1, length - 1] = 1
  tgt = rng.integers(3, SLOT, size=(b, t)).astype(np.int32)
  tgt[0, 3], tgt[0, 4] = 1, 0
  tgt[2, t - 1] = 1
  weights = (tgt != 0).astype(np.int32)
  return {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
          "decoder_input_tokens": _shift_right(tgt),
          "decoder_loss_weights": weights}


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_logits_are_the_modules_teacher_forced_forward():
  model = ed.EncoderDecoderModel(_config())
  params = _params(model)
  fns = _Jitted(model)
  batch = _batch(np.random.default_rng(0))
  got = fns.logits(params, batch)
  want = model.module.apply({"params": params},
                            batch["encoder_input_tokens"],
                            batch["decoder_input_tokens"])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_token_cross_entropy_hand_case():
  # p = [1/4, 1/4, 1/2], target 2.
  logits = jnp.log(jnp.array([[1.0, 1.0, 2.0]]))
  loss, nll, correct = ed.token_cross_entropy(logits, jnp.array([2]))
  np.testing.assert_allclose(nll, [np.log(2)], rtol=1e-6)
  np.testing.assert_allclose(loss, nll)
  assert bool(correct[0])
  # Label smoothing 0.1: soft targets [0.05, 0.05, 0.9], minus their entropy.
  loss, _, _ = ed.token_cross_entropy(logits, jnp.array([2]),
                                      label_smoothing=0.1)
  soft = np.array([0.05, 0.05, 0.9])
  logp = np.log([0.25, 0.25, 0.5])
  want = -(soft * logp).sum() + (soft * np.log(soft)).sum()
  np.testing.assert_allclose(loss, [want], rtol=1e-5)
  # A perfect prediction of the smoothed distribution costs nothing.
  loss, _, _ = ed.token_cross_entropy(jnp.log(jnp.array([soft])),
                                      jnp.array([2]), label_smoothing=0.1)
  np.testing.assert_allclose(loss, [0.0], atol=1e-6)


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3)])
def test_loss_fn_matches_numpy(label_smoothing, z_loss):
  model = ed.EncoderDecoderModel(_config(), label_smoothing=label_smoothing,
                                 z_loss=z_loss)
  params = _params(model)
  fns = _Jitted(model)
  batch = _batch(np.random.default_rng(1))
  batch["decoder_loss_weights"][1, 2] = 0  # a weight the loss must skip
  loss, aux = fns.loss(params, batch, None)
  logits = np.asarray(fns.logits(params, batch), np.float64)
  logp = _log_softmax(logits)
  tgt, w = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  onehot = np.eye(VOCAB)[tgt]
  soft = onehot * (1 - label_smoothing) + (1 - onehot) * (
      label_smoothing / (VOCAB - 1))
  entropy = -(soft * np.log(soft + 1e-20)).sum(-1)
  lse = np.log(np.exp(logits).sum(-1))
  per_token = -(soft * logp).sum(-1) - entropy + z_loss * lse**2
  nll = -(onehot * logp).sum(-1)
  np.testing.assert_allclose(aux["loss_sum"], (per_token * w).sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(aux["nll_sum"], (nll * w).sum(), rtol=1e-5)
  assert float(aux["weight_sum"]) == w.sum()
  assert float(aux["correct_sum"]) == ((logits.argmax(-1) == tgt) * w).sum()
  np.testing.assert_allclose(loss, (per_token * w).sum() / w.sum(),
                             rtol=1e-5)
  summary = model.summarize_metrics({k: float(v) for k, v in aux.items()})
  np.testing.assert_allclose(summary["perplexity"],
                             np.exp((nll * w).sum() / w.sum()), rtol=1e-5)
  assert set(base.check_metric_sums(model)) == set(aux)


def test_loss_weights_default_to_non_padding_targets():
  model = ed.EncoderDecoderModel(_config())
  params = _params(model)
  fns = _Jitted(model)
  batch = _batch(np.random.default_rng(2))
  _, with_w = fns.loss(params, batch, None)
  del batch["decoder_loss_weights"]
  _, without = fns.loss(params, batch, None)
  for k in with_w:
    np.testing.assert_allclose(with_w[k], without[k], rtol=1e-6)


def test_score_batch_is_the_weighted_target_log_likelihood():
  model = ed.EncoderDecoderModel(_config())
  params = _params(model)
  fns = _Jitted(model)
  batch = _batch(np.random.default_rng(3))
  logp = _log_softmax(fns.logits(params, batch))
  tgt = batch["decoder_target_tokens"]
  token_logp = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  want = (token_logp * batch["decoder_loss_weights"]).sum(-1)
  np.testing.assert_allclose(fns.score(params, batch), want,
                             rtol=1e-5)


def _greedy_reference(model, params, enc, steps):
  """Arg-max one token at a time with full teacher-forced forwards."""
  fns = _Jitted(model)
  b = enc.shape[0]
  tokens = np.zeros((b, steps), np.int32)
  logp_sum = np.zeros(b)
  done = np.zeros(b, bool)
  for t in range(steps):
    batch = {"encoder_input_tokens": enc,
             "decoder_input_tokens": _shift_right(tokens)}
    logp = _log_softmax(fns.logits(params, batch))[:, t]
    nxt = logp.argmax(-1)
    logp_sum += np.where(done, 0.0, logp[np.arange(b), nxt])
    tokens[:, t] = np.where(done, 0, nxt)
    done |= nxt == t5_lib.EOS_ID
  return tokens, logp_sum


def test_predict_batch_greedy_equals_stepwise_argmax():
  model = ed.EncoderDecoderModel(_config(), max_decode_len=6)
  params = _params(model, seed=4)
  enc = _batch(np.random.default_rng(4))["encoder_input_tokens"]
  tokens, scores = model.predict_batch(params, {"encoder_input_tokens": enc})
  want_tokens, want_scores = _greedy_reference(model, params, enc, 6)
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-4)


def test_beam_scores_agree_with_score_batch():
  alpha = 0.6
  model = ed.EncoderDecoderModel(_config(), max_decode_len=5, num_beams=3,
                                 alpha=alpha)
  params = _params(model, seed=5)
  fns = _Jitted(model)
  enc = _batch(np.random.default_rng(5))["encoder_input_tokens"]
  tokens, scores = model.predict_batch(params, {"encoder_input_tokens": enc},
                                       return_all_beams=True)
  assert tokens.shape == (3, 3, 5) and scores.shape == (3, 3)
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 1e-6)  # best first
  best, best_score = model.predict_batch(params,
                                         {"encoder_input_tokens": enc})
  np.testing.assert_array_equal(best, tokens[:, 0])
  for k in range(3):
    seqs = np.asarray(tokens[:, k])
    is_eos = seqs == t5_lib.EOS_ID
    lengths = np.where(is_eos.any(1), is_eos.argmax(1) + 1, seqs.shape[1])
    weights = (np.arange(seqs.shape[1])[None] < lengths[:, None])
    logp = fns.score(params, {
        "encoder_input_tokens": enc, "decoder_target_tokens": seqs,
        "decoder_input_tokens": _shift_right(seqs),
        "decoder_loss_weights": weights.astype(np.int32)})
    want = np.asarray(logp) / np.asarray(decoding.brevity_penalty(alpha,
                                                                   lengths))
    np.testing.assert_allclose(scores[:, k], want, rtol=1e-4, atol=1e-5)


def _embedding(params):
  return np.asarray(params["token_embedder"]["embedding"])


def test_soft_prefix_of_token_embeddings_equals_the_token_path():
  model = ed.EncoderDecoderModel(_config(), max_decode_len=5)
  params = _params(model, seed=6)
  fns = _Jitted(model)
  rng = np.random.default_rng(6)
  batch = _batch(rng)
  prefix = rng.integers(3, SLOT, size=(3, 3)).astype(np.int32)
  token_batch = dict(batch, encoder_input_tokens=np.concatenate(
      [prefix, batch["encoder_input_tokens"]], 1))
  soft_batch = dict(batch, soft_prefix=_embedding(params)[prefix])
  np.testing.assert_allclose(fns.logits(params, soft_batch),
                             fns.logits(params, token_batch), atol=1e-6)
  np.testing.assert_allclose(fns.score(params, soft_batch),
                             fns.score(params, token_batch),
                             atol=1e-5)
  np.testing.assert_array_equal(
      model.predict_batch(params, soft_batch)[0],
      model.predict_batch(params, token_batch)[0])
  # A masked-out prefix position is the same as a padding token there.
  mask = np.ones((3, 3), bool)
  mask[:, 1] = False
  padded = token_batch["encoder_input_tokens"].copy()
  padded[:, 1] = 0
  np.testing.assert_allclose(
      fns.logits(params, dict(soft_batch, soft_prefix_mask=mask)),
      fns.logits(params, dict(batch, encoder_input_tokens=padded)),
      atol=1e-6)


def test_slots_take_soft_tokens_in_order_and_mask_the_rest():
  model = ed.EncoderDecoderModel(_config(), soft_token_mode="slots",
                                 slot_id=SLOT)
  params = _params(model, seed=7)
  fns = _Jitted(model)
  batch = _batch(np.random.default_rng(7))
  enc = np.array([[5, SLOT, 7, SLOT, 1, 0, 0],
                  [SLOT, 4, SLOT, SLOT, 9, 1, 0],   # 3 slots, 2 soft tokens
                  [8, 9, 10, 11, 12, 1, 0]], np.int32)  # no slot
  fill = np.array([[20, 21], [30, 31], [40, 41]], np.int32)
  soft_mask = np.array([[True, True], [True, False], [True, True]])
  tokens = np.array([[5, 20, 7, 21, 1, 0, 0],
                     [30, 4, 0, 0, 9, 1, 0],
                     [8, 9, 10, 11, 12, 1, 0]], np.int32)
  slot_batch = dict(batch, encoder_input_tokens=enc,
                    soft_prefix=_embedding(params)[fill],
                    soft_prefix_mask=soft_mask)
  np.testing.assert_allclose(
      fns.logits(params, slot_batch),
      fns.logits(params, dict(batch, encoder_input_tokens=tokens)),
      atol=1e-6)


class _FeatureProjector(nn.Module):
  """A stand-in adapter: `[B, S, F]` features -> soft tokens, with mask."""
  d_model: int

  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    feats = batch["item_features"]
    x = nn.Dense(self.d_model, name="proj")(feats)
    x = nn.Dropout(0.5)(x, deterministic=deterministic)
    return x, jnp.any(feats != 0, axis=-1)


def test_gradient_reaches_the_soft_token_module():
  config = _config()
  module = _FeatureProjector(config.d_model)
  model = ed.EncoderDecoderModel(
      config, soft_token_module=module,
      soft_token_inputs={"item_features": ((2, 6), "float32")})
  variables = model.get_initial_variables(jax.random.PRNGKey(8))
  params = nn.meta.unbox(variables["params"])
  fns = _Jitted(model)
  assert set(params) == {"token_embedder", "encoder", "decoder",
                         ed.SOFT_TOKENS_KEY}
  # The T5 subtrees keep the layout of a plain T5 (checkpoint import).
  plain = t5_lib.init_params(config, jax.random.PRNGKey(0))
  assert (jax.tree.structure(nn.meta.unbox(plain)) ==
          jax.tree.structure(ed.EncoderDecoderModel.split_params(params)[0]))
  rng = np.random.default_rng(8)
  batch = dict(_batch(rng),
               item_features=rng.normal(size=(3, 2, 6)).astype(np.float32))

  def loss(p):
    return model.loss_fn(p, batch, None)[0]
  loss = jax.jit(loss)
  grads = jax.jit(jax.grad(loss))(params)
  kernel_grad = np.asarray(grads[ed.SOFT_TOKENS_KEY]["proj"]["kernel"])
  assert np.abs(kernel_grad).max() > 0
  # Directional finite difference along the module's kernel gradient.
  direction = kernel_grad / np.linalg.norm(kernel_grad)

  def shifted(eps):
    p = jax.tree.map(lambda x: x, params)
    p[ed.SOFT_TOKENS_KEY] = {"proj": dict(
        params[ed.SOFT_TOKENS_KEY]["proj"],
        kernel=params[ed.SOFT_TOKENS_KEY]["proj"]["kernel"] + eps * direction)}
    return float(loss(p))
  eps = 1e-2
  numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
  np.testing.assert_allclose(numeric, np.linalg.norm(kernel_grad), rtol=2e-2)
  # Dropout inside the soft-token module follows the training rng.
  a = fns.loss(params, batch, jax.random.PRNGKey(1))[0]
  b = fns.loss(params, batch, jax.random.PRNGKey(1))[0]
  c = fns.loss(params, batch, jax.random.PRNGKey(2))[0]
  assert float(a) == float(b) and float(a) != float(c)
  arch = model.architecture()
  assert arch["soft_token_module"]["class"] == "_FeatureProjector"
  json.dumps(arch)


def test_soft_token_shape_errors_name_the_source():
  model = ed.EncoderDecoderModel(_config())
  params = _params(model)
  fns = _Jitted(model)
  batch = dict(_batch(np.random.default_rng(9)),
               soft_prefix=np.zeros((3, 2, 5), np.float32))
  with pytest.raises(ValueError, match=r"batch\['soft_prefix'\] must be "
                     r"\[batch, S, 32\]"):
    fns.loss(params, batch, None)


def test_constructor_validates_its_arguments():
  with pytest.raises(ValueError, match="slot_id"):
    ed.EncoderDecoderModel(_config(), soft_token_mode="slots")
  with pytest.raises(ValueError, match="soft_token_mode"):
    ed.EncoderDecoderModel(_config(), soft_token_mode="middle")
  with pytest.raises(ValueError, match="label_smoothing"):
    ed.EncoderDecoderModel(_config(), label_smoothing=1.0)


def test_architecture_and_meta_are_json():
  model = ed.EncoderDecoderModel(_config(dropout_rate=0.3))
  arch = model.architecture()
  assert arch["module"] == "T5" and arch["vocab_size"] == VOCAB
  assert "dropout_rate" not in arch and "soft_token_mode" not in arch
  assert json.loads(json.dumps(model.checkpoint_meta())) == {
      "vocab_size": VOCAB}
