"""LANCER's text -> item mapping: pooled token embeddings against NumPy,
the mapper it makes, and GenerationEvaluator(item_vectors='token_embeddings')
on a tiny T5 (metrics against a reference, re-pooled when params change)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from recsys_jax.core import partitioning
from recsys_jax.evaluation import generation
from recsys_jax.evaluation import item_mapping
from recsys_jax.evaluation import token_embedding_mapping as tem
from recsys_jax.model_lib import encoder_decoder as ed
from recsys_jax.models import t5 as t5_lib
from recsys_jax.text import item_texts
from tests import helpers

# Item id -> title (lower case: the word vocabulary is case-sensitive); 6 has
# no title.
TITLES = ["", "red running shoe", "blue wool hat", "big red shoe",
          "green cotton sock", "blue hat", ""]
EMBED_DIM = 32  # the tiny T5's d_model


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  """A word-level SentencePiece model of TITLES' words (+ 'purple'), with
  T5's pad 0 / EOS 1 / unk 2."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  words = {w for t in TITLES for w in t.split()} | {"purple"}
  prefix = str(tmp_path_factory.mktemp("vocab") / "words")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([t for t in TITLES if t] + ["purple"]),
      model_prefix=prefix, vocab_size=len(words) + 3, model_type="word",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
      minloglevel=2)
  return seqio.SentencePieceVocabulary(prefix + ".model")


@pytest.fixture(scope="module")
def t5(vocab):
  """(a tiny T5 wrapper of `vocab`, its boxed initial variables)."""
  model = ed.EncoderDecoderModel(
      t5_lib.T5Config.tiny(dropout_rate=0.0, tie_word_embeddings=False),
      vocabulary=vocab, max_decode_len=4, num_beams=2)
  return model, model.get_initial_variables(jax.random.PRNGKey(1))


def _word_id(vocab, word):
  (i,) = vocab.encode(word)
  return i


def _random_embedding(rows, seed=0):
  return np.random.default_rng(seed).normal(size=(rows, 8)).astype(
      np.float32)


def _pooled(embedding, vocab, text, how):
  """NumPy reference: the text's rows (padding / EOS dropped) pooled."""
  ids = [i for i in vocab.encode(text) if i not in (0, 1)]
  if not ids:
    return np.zeros(embedding.shape[1], np.float32)
  rows = embedding[ids]
  return rows.max(0) if how == "max" else rows.mean(0)


def _reference_ids(embedding, vocab, texts, how):
  """NumPy reference of `match`: exact normalised title, else the highest
  cosine over items with a non-zero vector (lowest id on ties), else 0."""
  items = np.stack([_pooled(embedding, vocab, t, how) if j else
                    np.zeros(embedding.shape[1]) for j, t in
                    enumerate(TITLES)])
  norms = np.linalg.norm(items, axis=1)
  out = []
  for text in texts:
    key = item_mapping.normalize_title(text)
    exact = [j for j in range(1, len(TITLES))
             if key and item_mapping.normalize_title(TITLES[j]) == key]
    v = _pooled(embedding, vocab, text, how)
    if exact:
      out.append(exact[0])
    elif not key or not np.linalg.norm(v):
      out.append(0)
    else:
      cos = np.where(norms > 0, items @ v / np.maximum(
          norms * np.linalg.norm(v), 1e-12), -np.inf)
      cos[0] = -np.inf
      out.append(int(np.flatnonzero(cos >= cos.max() - 1e-6)[0]))
  return out


# -- pooling ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["max", "mean"])
def test_encoder_pools_the_token_rows_like_numpy(vocab, how):
  embedding = _random_embedding(vocab.vocab_size)
  encode = tem.token_embedding_encoder(vocab, embedding, how)
  texts = ["red running shoe", "", "hat", "blue blue hat", "purple sock"]
  got = encode(texts)
  assert got.shape == (5, 8) and got.dtype == np.float32
  want = np.stack([_pooled(embedding, vocab, t, how) for t in texts])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # By hand: 'blue blue hat' is rows (blue, blue, hat).
  blue, hat = (embedding[_word_id(vocab, w)] for w in ("blue", "hat"))
  by_hand = (np.maximum(blue, hat) if how == "max"
             else (2 * blue + hat) / 3)
  np.testing.assert_allclose(got[3], by_hand, rtol=1e-6)
  assert not got[1].any()  # no tokens: the zero vector


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1 << 14])
def test_pooling_in_chunks_keeps_every_texts_order(vocab, monkeypatch,
                                                   chunk_tokens):
  # One text per chunk, several, all at once (texts are pooled shortest
  # first: the output must still be in the input's order).
  monkeypatch.setattr(tem, "_CHUNK_TOKENS", chunk_tokens)
  embedding = _random_embedding(vocab.vocab_size, seed=1)
  texts = ["red running shoe", "", "blue hat", "", "green cotton sock",
           "hat", "big red shoe blue wool hat"] * 3
  ids, offsets = tem.tokenize(vocab, texts)
  assert offsets[-1] == len(ids) and offsets[2] == offsets[1]
  for how in tem.POOLINGS:
    want = np.stack([_pooled(embedding, vocab, t, how) for t in texts])
    np.testing.assert_allclose(tem.pool(embedding, ids, offsets, how), want,
                               rtol=1e-6, atol=1e-7)


def test_pad_and_eos_ids_are_dropped(vocab):

  class EosOnly:
    """A vocabulary that tokenises 'stop' to EOS and padding only."""
    vocab_size = vocab.vocab_size

    def encode(self, text):
      return [1, 0] if text == "stop" else vocab.encode(text)

  embedding = _random_embedding(vocab.vocab_size)
  got = tem.token_embedding_encoder(EosOnly(), embedding)(["stop", "hat"])
  assert not got[0].any()
  np.testing.assert_allclose(got[1], embedding[_word_id(vocab, "hat")])
  # Near nothing: 'stop' maps to no item, not an error.
  mapper = tem.token_embedding_mapper(TITLES, EosOnly(), embedding)
  ids, kinds = mapper.match(["stop", ""])
  np.testing.assert_array_equal(ids, [0, 0])
  assert kinds == ["none", "none"]


def test_too_few_embedding_rows_name_both_sizes(vocab):
  small = _random_embedding(4)
  with pytest.raises(ValueError, match=rf"token id \d+ \(vocabulary of "
                     rf"{vocab.vocab_size} ids\) has no row in the token "
                     r"embedding of 4 rows"):
    tem.token_embedding_mapper(TITLES, vocab, small)
  with pytest.raises(ValueError, match="of 4 rows"):
    tem.token_embedding_encoder(vocab, small)(["green cotton sock"])
  with pytest.raises(ValueError, match=r"shape \(3,\), expected \[V, E\]"):
    tem.token_embedding_encoder(vocab, np.zeros(3))
  with pytest.raises(ValueError, match="token pooling 'sum'"):
    tem.token_embedding_encoder(vocab, small, "sum")


# -- the mapper ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["max", "mean"])
def test_mapper_exact_first_then_nearest_pooled_title(vocab, how):
  embedding = _random_embedding(vocab.vocab_size, seed=2)
  mapper = tem.token_embedding_mapper(TITLES, vocab, embedding, how)
  assert mapper.can_search and mapper.num_items == 6
  texts = ["Blue Wool Hat", "red running shoe!", "purple hat", "red shoe",
           "cotton sock", "running", "", "..."]
  ids, kinds = mapper.match(texts)
  np.testing.assert_array_equal(
      ids, _reference_ids(embedding, vocab, texts, how))
  assert list(ids[:2]) == [2, 1] and kinds[:2] == ["exact", "exact"]
  assert kinds[2:6] == ["nearest"] * 4
  assert list(ids[6:]) == [0, 0] and kinds[6:] == ["none", "none"]
  # Item 6 (no title) has a zero vector: never the nearest.
  assert 6 not in mapper.rank([["purple"]], 6)[0]


def test_text_sharing_most_tokens_maps_to_that_item(vocab):
  # One-hot rows: max pooling is the set of words, cosine their overlap.
  embedding = np.eye(vocab.vocab_size, dtype=np.float32)
  mapper = tem.token_embedding_mapper(TITLES, vocab, embedding)
  ids, kinds = mapper.match(["green cotton", "big red", "wool hat purple",
                             "red running"])
  np.testing.assert_array_equal(ids, [4, 3, 2, 1])
  assert kinds == ["nearest"] * 4


def test_title_tokens_are_cached_per_dataset_and_vocabulary():
  tiny_data = helpers.prepared_dataset()
  from recsys_jax.data import prepared  # pylint: disable=g-import-not-at-top
  path = prepared.PreparedDataset(tiny_data).text_vocab_path
  spm_vocab = seqio.SentencePieceVocabulary(path)
  tokens = tem.title_tokens(tiny_data, spm_vocab)
  # Another object of the same vocabulary file: the same tokenisation.
  assert tem.title_tokens(tiny_data, seqio.SentencePieceVocabulary(path)) is (
      tokens)
  titles = item_texts.texts_by_index(tiny_data, (item_texts.TITLE,))[:-1]
  assert tokens.titles == titles
  embedding = _random_embedding(spm_vocab.vocab_size, seed=3)
  mapper = tem.token_embedding_mapper(tiny_data, spm_vocab, embedding, "max")
  np.testing.assert_allclose(
      mapper.encode([titles[7]])[0],
      item_mapping._unit_rows(tokens.item_vectors(embedding)[7])[0],  # pylint: disable=protected-access
      rtol=1e-6)
  ids, kinds = mapper.match([titles[7].upper(), titles[9] + " refurbished"])
  assert ids[0] == 7 and kinds == ["exact", "nearest"]


# -- GenerationEvaluator ------------------------------------------------------


def test_config_validation():
  cfg = generation.GenerationEvalConfig
  assert cfg().item_vectors == "cache" and cfg().token_pooling == "max"
  with pytest.raises(ValueError, match="item_vectors='pooled': expected one"):
    cfg(item_mapping=True, item_vectors="pooled")
  with pytest.raises(ValueError, match="token_pooling='sum': expected one"):
    cfg(item_mapping=True, item_vectors="token_embeddings",
        token_pooling="sum")
  with pytest.raises(ValueError, match="token_pooling='mean' applies to "
                     "item_vectors='token_embeddings'"):
    cfg(item_mapping=True, token_pooling="mean")
  with pytest.raises(ValueError, match="item_vectors='token_embeddings' "
                     "needs item_mapping=True"):
    cfg(item_vectors="token_embeddings")
  with pytest.raises(ValueError, match="item_vectors_cache='c' conflicts "
                     "with item_vectors='token_embeddings'"):
    cfg(item_mapping=True, item_vectors="token_embeddings",
        item_vectors_cache="c")
  with pytest.raises(ValueError, match="mapping_encode_fn .* conflicts"):
    generation.GenerationEvaluator(
        cfg(item_mapping=True, item_vectors="token_embeddings"),
        mapping_encode_fn=lambda texts: np.zeros((len(texts), 2)))


def test_model_token_embedding_unboxes_and_names_missing_keys(t5):
  variables = t5[1]
  assert isinstance(variables["params"]["token_embedder"]["embedding"],
                    nn.LogicallyPartitioned)
  params = nn.meta.unbox(variables["params"])
  want = np.asarray(params["token_embedder"]["embedding"])
  assert want.shape == (64, EMBED_DIM)
  np.testing.assert_array_equal(tem.model_token_embedding(params), want)
  # Boxed (LogicallyPartitioned) leaves, the {'params': ...} dict.
  np.testing.assert_array_equal(tem.model_token_embedding(variables), want)
  bf16 = {"token_embedder": {"embedding": jnp.asarray(want, jnp.bfloat16)}}
  assert tem.model_token_embedding(bf16).dtype == np.float32
  with pytest.raises(ValueError, match=r"params\['token_embedder'\]\["
                     r"'embedding'\]; params has \['decoder', 'encoder'\]"):
    tem.model_token_embedding({"encoder": {}, "decoder": {}})


class _Data:

  def __init__(self, batches):
    self.batches = batches

  def eval_batches(self, split, batch_size):
    del split, batch_size
    return iter(self.batches)


def _batch(vocab_size):
  rng = np.random.default_rng(0)
  enc = rng.integers(3, vocab_size, size=(4, 6)).astype(np.int32)
  return {"encoder_input_tokens": enc,
          "target_item": np.array([[1], [2], [5], [3]], np.int32),
          "history_items": np.array([[4], [0], [0], [0]], np.int32),
          "targets_pretokenized": np.array(
              [TITLES[1], TITLES[2], TITLES[5], TITLES[3]], object)}


def test_evaluator_maps_under_the_models_own_embedding(vocab, t5):
  model, variables = t5
  params1 = nn.meta.unbox(variables["params"])
  # The same network with one-hot rows for the vocabulary's words, except
  # that 'big' has the row of 'hat'.
  onehot = np.zeros((64, EMBED_DIM), np.float32)
  onehot[:vocab.vocab_size, :vocab.vocab_size] = np.eye(vocab.vocab_size)
  onehot[_word_id(vocab, "big")] = onehot[_word_id(vocab, "hat")]
  params2 = dict(params1, token_embedder={"embedding": jnp.asarray(onehot)})
  ev = generation.GenerationEvaluator(
      generation.GenerationEvalConfig(
          teacher_forced=False, item_mapping=True, ranking_ks=(1, 3),
          item_vectors="token_embeddings", splits=("test",)),
      item_mapper=item_mapping.ItemMapper(TITLES))
  mesh = partitioning.make_mesh(1)  # one mesh: predict compiles once
  data = _Data([_batch(vocab.vocab_size)])

  for params in (params1, params2):
    embedding = np.asarray(params["token_embedder"]["embedding"])
    res = ev.evaluate(model, params, data, mesh=mesh)["test"]
    # The predict path: the mapper built from these params in records().
    records = list(ev.records(model, params, data.batches, mesh=mesh))
    reference = tem.token_embedding_mapper(TITLES, vocab, embedding)
    beams = [r["beams"] for r in records]
    want = reference.rank(beams, 3, exclude=[{4}, set(), set(), set()])
    assert [r["ranked_items"] for r in records] == want.tolist()
    sums = item_mapping.ranking_sums(want, np.array([1, 2, 5, 3]), (1, 3))
    for name in ("HR@1", "HR@3", "NDCG@3"):
      assert res[name] == pytest.approx(sums[name] / 4)
    assert res["num_ranked"] == 4
    assert res["match_exact"] + res["match_nearest"] + res["match_none"] == (
        pytest.approx(1.0))

  # Re-pooled per call: a text off every title maps under each embedding.
  texts = ["wool purple", "big"]
  got1 = ev.item_mapper_for(model, params1).map(texts)
  got2 = ev.item_mapper_for(model, params2).map(texts)
  np.testing.assert_array_equal(got1, _reference_ids(
      np.asarray(params1["token_embedder"]["embedding"]), vocab, texts,
      "max"))
  # 'big' is 'hat' now: nearest the title of fewest words with a hat.
  np.testing.assert_array_equal(got2, [2, 5])
  assert got1.tolist() != got2.tolist()


def test_evaluator_needs_the_vocabulary_and_empty_beams_are_misses(vocab):

  class PadBeams:
    """'Generates' only padding: every beam detokenises to ''."""
    vocabulary = vocab

    def predict_batch(self, params, batch, **kw):
      del params, kw
      b = batch["target_item"].shape[0]
      return jnp.zeros((b, 2, 4), jnp.int32), jnp.zeros((b, 2))

  params = {"token_embedder": {"embedding": _random_embedding(
      vocab.vocab_size)}}
  ev = generation.GenerationEvaluator(
      generation.GenerationEvalConfig(
          teacher_forced=False, item_mapping=True, ranking_ks=(1, 2),
          item_vectors="token_embeddings", token_pooling="mean"),
      item_mapper=item_mapping.ItemMapper(TITLES))
  batch = {"target_item": np.array([1, 2], np.int32),
           "targets_pretokenized": np.array(TITLES[1:3], object)}
  res = ev.evaluate_batches(PadBeams(), params, [batch])
  assert res["HR@2"] == 0 and res["NDCG@2"] == 0
  assert res["match_none"] == 1 and res["num_ranked"] == 2
  records = list(ev.records(PadBeams(), params, [batch]))
  assert [r["ranked_items"] for r in records] == [[0, 0], [0, 0]]

  class NoVocab(PadBeams):
    vocabulary = None

  with pytest.raises(ValueError, match="NoVocab has no vocabulary"):
    ev.evaluate_batches(NoVocab(), params, [batch])
