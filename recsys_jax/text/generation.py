"""Generation with an encoder-decoder module: the cached step and `generate`.

Works with any Flax module that has T5's decoding methods (`models.t5.T5`):
`encode(tokens, mask, inputs_embeds=)`, `project_encoded(encoded)` (the
cross-attention keys and values of every decoder layer) and
`decode(encoded, mask, tokens, cross_kv=, decode=True)` with a 'cache'
collection. The search itself is `text.decoding` (greedy, beam).

Per generated token the step runs the decoder on one position: the
self-attention keys and values come from the KV cache and the
cross-attention ones are computed once per source (`project_encoded`), not
once per token.
"""

import functools
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from recsys_jax.models import t5 as t5_lib
from recsys_jax.text import decoding

Array = jax.Array


def project_encoded(model: nn.Module, params, encoded: Array) -> Any:
  """The decoder's per-layer cross-attention (key, value) of `encoded`."""
  return model.apply({"params": params}, encoded, method="project_encoded")


def make_decoding_fns(model: nn.Module, params, encoded: Array,
                      encoder_mask: Optional[Array], max_decode_len: int, *,
                      cross_kv: Any = None, decoder_prefix: Any = None
                      ) -> Tuple[decoding.TokensToLogits, Callable[[int], Any]]:
  """`(tokens_to_logits, init_cache)` for `recsys_jax.text.decoding`.

  `tokens_to_logits(tokens [N, 1], cache) -> (logits [N, vocab], cache)` runs
  one cached step against `encoded` / `encoder_mask`, which must already have
  one row per hypothesis N (`decoding.expand_for_beams` for beam search).
  `init_cache(rows)` gives a zero cache for `rows` rows: pass the batch size
  for greedy and for beam search (which expands the cache itself).

  Args:
    model: the module (e.g. `t5.T5(config)`).
    params: its parameters (unboxed).
    encoded: `[N, L, d_model]` encoder outputs.
    encoder_mask: `[N, L]` bool; None = no padding.
    max_decode_len: length of the self-attention cache (tokens generated).
    cross_kv: `project_encoded(model, params, encoded)` when already computed
      (e.g. on unexpanded rows, then expanded for beams); else computed here.
    decoder_prefix: per decoder layer a `layers.PrefixKV` with the same N
      rows as `encoded` (prefix tuning), or None.
  """
  if encoder_mask is None:
    encoder_mask = jnp.ones(encoded.shape[:2], bool)
  if cross_kv is None:
    cross_kv = project_encoded(model, params, encoded)

  def init_cache(rows):
    # The first decode=True call creates the cache from a full-length input;
    # only its shapes are needed (eval_shape computes nothing).
    first_rows = lambda x: x[:1].repeat(rows, 0)
    shapes = jax.eval_shape(
        lambda: model.apply({"params": params}, first_rows(encoded),
                            first_rows(encoder_mask),
                            jnp.zeros((rows, max_decode_len), jnp.int32),
                            prefix=jax.tree.map(first_rows, decoder_prefix),
                            decode=True, method="decode",
                            mutable=["cache"])[1]["cache"])
    # Every cache variable starts at zero (keys, values and cache_index).
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def tokens_to_logits(tokens, cache):
    logits, mutated = model.apply({"params": params, "cache": cache}, None,
                                  encoder_mask, tokens, cross_kv=cross_kv,
                                  prefix=decoder_prefix,
                                  decode=True, method="decode",
                                  mutable=["cache"])
    return logits[:, -1, :], mutated["cache"]

  return tokens_to_logits, init_cache


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len",
                                             "num_beams", "alpha", "eos_id"))
def generate(model: nn.Module, params, encoder_input_tokens: Optional[Array],
             *, max_decode_len: int, num_beams: int = 1, alpha: float = 0.6,
             encoder_mask: Optional[Array] = None,
             inputs_embeds: Optional[Array] = None,
             eos_id: int = t5_lib.EOS_ID, encoder_prefix: Any = None,
             decoder_prefix: Any = None) -> decoding.BeamResult:
  """Greedy (`num_beams=1`) or beam-search generation with a KV cache (jitted).

  Args:
    model: the module (static: hashable, e.g. `t5.T5(config)`).
    params: its parameters (unboxed).
    encoder_input_tokens: `[B, L]` int ids, 0 = padding; None with
      `inputs_embeds`.
    max_decode_len: T, generated tokens (EOS included).
    num_beams: K; 1 = greedy.
    alpha: beam search's length-penalty exponent.
    encoder_mask: `[B, L]` bool; default `tokens != 0` (all True with
      `inputs_embeds`).
    inputs_embeds: `[B, L, d_model]` soft tokens instead of token ids.
    eos_id: end of sequence; an id outside the vocabulary never ends a row.
    encoder_prefix, decoder_prefix: per layer a `layers.PrefixKV` of B rows
      (prefix tuning: `T5.encode` / `T5.decode`), or None; the decoder's is
      repeated per beam.

  Returns:
    `BeamResult(tokens [B, K, T], scores [B, K])` sorted best first; tokens
    after EOS are 0. Greedy scores are summed log probabilities; beam scores
    are length-penalised (see `decoding`).
  """
  if encoder_mask is None:
    if inputs_embeds is not None:
      encoder_mask = jnp.ones(inputs_embeds.shape[:2], bool)
    else:
      encoder_mask = encoder_input_tokens != t5_lib.PAD_ID
  encoded = model.apply({"params": params}, encoder_input_tokens, encoder_mask,
                        inputs_embeds=inputs_embeds, prefix=encoder_prefix,
                        method="encode")
  batch = encoded.shape[0]
  cross_kv = project_encoded(model, params, encoded)
  if num_beams == 1:
    fn, init_cache = make_decoding_fns(model, params, encoded, encoder_mask,
                                       max_decode_len, cross_kv=cross_kv,
                                       decoder_prefix=decoder_prefix)
    out = decoding.greedy_search(fn, init_cache(batch),
                                 batch_size=batch,
                                 max_decode_len=max_decode_len, eos_id=eos_id)
    return decoding.BeamResult(out.tokens[:, None], out.log_probs[:, None])
  expand = functools.partial(decoding.expand_for_beams, beam_size=num_beams)
  fn, init_cache = make_decoding_fns(
      model, params, expand(encoded), expand(encoder_mask), max_decode_len,
      cross_kv=jax.tree.map(expand, cross_kv),
      decoder_prefix=jax.tree.map(expand, decoder_prefix))
  return decoding.beam_search(fn, init_cache(batch), batch_size=batch,
                              beam_size=num_beams,
                              max_decode_len=max_decode_len, alpha=alpha,
                              eos_id=eos_id)
