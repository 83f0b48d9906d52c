"""Critique tables, the seeded random BERT encoder and their text caches.

All on the TINY synthetic preset (150 items, 12 leaf categories, critiques on
category changes) with a very small random BERT, compared against the
SentencePiece library, the raw TFRecords and NumPy.
"""

import json
import os
import shutil

import gin
import numpy as np
import pytest
import sentencepiece
import tensorflow as tf

from recsys_jax import embed_items
from recsys_jax.checkpoint_import import bert as bert_import
from recsys_jax.data import prepared
from recsys_jax.models import bert
from recsys_jax.text import critique_texts
from recsys_jax.text import item_text_cache
from recsys_jax.text import item_texts
from recsys_jax.text import vocab as text_vocab
from tests import helpers
from tests.helpers import tiny_data  # pylint: disable=unused-import

SMALL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 32, "max_position_embeddings": 32, "seed": 0}
MAX_LEN = 16


def _build(data_dir, out, *, texts="items", seed=0, max_text_len=MAX_LEN,
           encoder="bert_random", checkpoint=None, vocab=None, **kw):
  logs = []
  random_encoder = dict(SMALL, seed=seed) if encoder == "bert_random" else None
  manifest = embed_items.build_cache(
      data_dir, encoder, checkpoint, vocab, str(out), texts=texts,
      max_text_len=max_text_len, batch_size=32, chunk_size=64,
      dtype="float32", random_encoder=random_encoder, log=logs.append, **kw)
  return manifest, logs


def _spm(data_dir):
  return sentencepiece.SentencePieceProcessor(
      model_file=os.path.join(data_dir, "spm.model"))


@pytest.fixture(scope="module")
def caches(tiny_data, tmp_path_factory):
  root = tmp_path_factory.mktemp("critique_caches")
  out = {"root": root}
  for kind in ("items", "critiques"):
    out[kind] = str(root / kind)
    _build(tiny_data, out[kind], texts=kind)
  return out


def test_critique_table_against_the_raw_records(tiny_data):
  # Reference: the TFRecords parsed directly, items.jsonl read by hand.
  seen = set()
  for path in prepared.PreparedDataset(tiny_data).sequence_files:
    for rec in tf.data.TFRecordDataset(path).as_numpy_iterator():
      ex = tf.train.Example.FromString(rec)
      seen.update(v.decode() for v in
                  ex.features.feature["critiques"].bytes_list.value)
  with open(os.path.join(tiny_data, "items.jsonl")) as f:
    leaves = [json.loads(line)["categories"][-1] for line in f]
  assert "" in seen  # the first purchase of every user has no critique
  want = sorted((seen - {""}) | set(leaves))
  table = critique_texts.critique_texts(tiny_data)
  assert table == want
  assert item_texts.item_categories(tiny_data) == leaves
  # TINY: 12 leaf categories, each named by 4 critique templates.
  assert len(set(leaves)) == 12 and len(table) == 12 + 4 * 12
  assert set(leaves) <= set(table) and "" not in table
  index = critique_texts.critique_index(table)
  assert index[""] == 0 and index[table[0]] == 1
  assert index[table[-1]] == len(table)
  with pytest.raises(ValueError, match="repeated"):
    critique_texts.critique_index(table + table[:1])


def test_item_categories_without_categories(tmp_path):
  items = {"a": prepared.ItemMeta("a", title="A", categories=["X", "Y"]),
           "b": prepared.ItemMeta("b", title="B")}
  users = [prepared.UserRecord("u", ["a", "b", "a"])]
  prepared.write_prepared(str(tmp_path), users, items, text_vocab_size=None)
  assert item_texts.item_categories(str(tmp_path)) == ["Y", ""]
  # No critiques in the sequences: the table is the category names alone.
  assert critique_texts.critique_texts(str(tmp_path)) == ["Y"]


def test_random_encoder_is_seeded_and_deterministic(tiny_data):
  voc = text_vocab.load_text_vocab(os.path.join(tiny_data, "spm.model"))

  def fingerprint(**over):
    enc = embed_items.random_bert_encoder(voc, dict(SMALL, **over))
    return enc, embed_items.params_fingerprint(enc.config, enc.params)
  enc, fp0 = fingerprint()
  assert fingerprint()[1] == fp0
  assert fingerprint(seed=1)[1] != fp0
  assert not enc.pretrained and enc.name == "bert_random"
  assert enc.config["vocab_size"] == _spm(tiny_data).get_piece_size() == 300
  assert enc.config["pad_token_id"] == voc.pad_id == 0
  assert enc.d_model == 16
  table = enc.params["embeddings"]["word_embeddings"]["embedding"]
  assert table.shape == (300, 16)
  with pytest.raises(ValueError, match="hidden"):
    embed_items.random_bert_encoder(voc, {"hidden": 8})
  with pytest.raises(ValueError, match="num_hidden_layers"):
    embed_items.random_bert_encoder(voc, {"num_hidden_layers": 0})


def test_item_cache_contents(tiny_data, caches):
  cache = item_text_cache.ItemTextCache(caches["items"])
  texts = item_texts.item_texts(tiny_data)
  assert cache.texts_kind == "items" and cache.texts == texts
  m = cache.manifest
  assert m["pretrained"] is False and m["encoder"] == "bert_random"
  assert m["random_encoder"] == SMALL and m["checkpoint_path"] is None
  # BERT-style inputs from the SentencePiece model: pieces[:L-1], EOS (1),
  # padding 0; every TINY item text is longer than 16 tokens.
  sp = _spm(tiny_data)
  for i in (0, 77, 149):
    want = sp.encode(texts[i])[:MAX_LEN - 1] + [sp.eos_id()]
    np.testing.assert_array_equal(cache.token_ids[i], want)
  assert cache.mask.all() and m["num_truncated"] == 150
  # Encodings: the model applied directly (no jit, no sharding), then
  # NumPy mean pooling and L2 normalisation.
  enc = embed_items.random_bert_encoder(
      text_vocab.load_text_vocab(os.path.join(tiny_data, "spm.model")), SMALL)
  hidden = np.asarray(bert.BertEncoder(bert.BertConfig(**enc.config)).apply(
      {"params": enc.params}, np.asarray(cache.token_ids[:8]),
      np.asarray(cache.mask[:8])))
  np.testing.assert_allclose(cache.tokens[:8], hidden, atol=1e-5)
  pooled = hidden.mean(axis=1)
  pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
  np.testing.assert_allclose(cache.pooled[:8], pooled, atol=1e-5)
  # Distinct texts give distinct encodings (what the encoder is for).
  assert len({tuple(np.round(r, 4)) for r in np.asarray(cache.pooled)}) == 150


def test_equal_seed_gives_equal_cache_other_seed_another(tiny_data, caches,
                                                         tmp_path):
  _build(tiny_data, tmp_path / "again")
  a = item_text_cache.ItemTextCache(caches["items"])
  b = item_text_cache.ItemTextCache(str(tmp_path / "again"))
  assert (a.manifest["checkpoint_fingerprint"] ==
          b.manifest["checkpoint_fingerprint"])
  np.testing.assert_array_equal(a.tokens, b.tokens)
  _build(tiny_data, tmp_path / "seed1", seed=1)
  c = item_text_cache.ItemTextCache(str(tmp_path / "seed1"))
  assert (c.manifest["checkpoint_fingerprint"] !=
          a.manifest["checkpoint_fingerprint"])
  assert not np.allclose(c.pooled, a.pooled)


def test_critique_cache_rows_are_the_table(tiny_data, caches):
  cache = item_text_cache.ItemTextCache(caches["critiques"],
                                        expect={"texts_kind": "critiques"})
  table = critique_texts.critique_texts(tiny_data)
  with open(os.path.join(caches["critiques"], "texts.json"),
            encoding="utf-8") as f:
    assert json.load(f) == table
  assert cache.texts == table and cache.num_items == len(table)
  sp = _spm(tiny_data)
  index = critique_texts.critique_index(cache.texts)
  for text in ("Serums", table[5], table[-1]):
    row = index[text] - 1
    want = sp.encode(text)[:MAX_LEN - 1] + [sp.eos_id()]
    assert cache.token_ids[row][cache.mask[row]].tolist() == want
    # Critique id r + 1 looks up row r; id 0 (no critique) gives zeros.
    np.testing.assert_array_equal(cache.lookup([index[text]])[0],
                                  cache.pooled[row])
  assert not cache.lookup([0]).any()
  # The same texts in an item cache and a critique cache encode alike.
  items = item_text_cache.ItemTextCache(caches["items"])
  assert items.manifest["vocab"] == cache.manifest["vocab"]


def test_truncation_count_is_the_hand_count(tiny_data, tmp_path):
  sp = _spm(tiny_data)
  table = critique_texts.critique_texts(tiny_data)
  max_len = 8
  lengths = [len(sp.encode(t)) + 1 for t in table]  # + EOS
  want = sum(n > max_len for n in lengths)
  assert 0 < want < len(table)  # the test separates the two cases
  manifest, logs = _build(tiny_data, tmp_path / "short", texts="critiques",
                          max_text_len=max_len)
  assert manifest["num_truncated"] == want
  assert any(f"{want} of {len(table)} texts (critiques) longer" in line
             for line in logs), logs
  cache = item_text_cache.ItemTextCache(str(tmp_path / "short"))
  np.testing.assert_array_equal(cache.mask.sum(1),
                                np.minimum(lengths, max_len))
  # Resuming a complete cache keeps the count without re-tokenising.
  manifest, logs = _build(tiny_data, tmp_path / "short", texts="critiques",
                          max_text_len=max_len)
  assert manifest["num_truncated"] == want
  assert not any("token lengths" in line for line in logs)
  assert any("already complete" in line for line in logs)


def test_critique_cache_refused_for_another_encoder(tiny_data, caches,
                                                    tmp_path):
  out = str(tmp_path / "crit")
  shutil.copytree(caches["critiques"], out)
  spm_path = os.path.join(tiny_data, "spm.model")
  # The very same weights exported and loaded as a plain 'bert' checkpoint:
  # equal fingerprint, yet another encoder.
  enc = embed_items.random_bert_encoder(
      text_vocab.load_text_vocab(spm_path), SMALL)
  ckpt = bert_import.save_as_orbax(enc.params, bert.BertConfig(**enc.config),
                                   str(tmp_path / "as_bert"))
  with pytest.raises(item_text_cache.CacheMismatchError) as e:
    _build(tiny_data, out, texts="critiques", encoder="bert",
           checkpoint=ckpt, vocab=spm_path)
  msg = str(e.value)
  assert "encoder: cache has 'bert_random', requested 'bert'" in msg
  assert "checkpoint_fingerprint" not in msg
  assert "critiques x60 by bert_random (random init, not pretrained)" in msg
  with pytest.raises(item_text_cache.CacheMismatchError,
                     match="checkpoint_fingerprint: cache has"):
    _build(tiny_data, out, texts="critiques", seed=1)
  with pytest.raises(item_text_cache.CacheMismatchError,
                     match="texts_kind: cache has 'critiques', requested "
                     "'items'"):
    _build(tiny_data, out, texts="items")
  with pytest.raises(item_text_cache.CacheMismatchError, match="texts_kind"):
    item_text_cache.ItemTextCache(out, expect={"texts_kind": "items"})


def test_check_compatible(tiny_data, caches, tmp_path):
  items = item_text_cache.ItemTextCache(caches["items"])
  crit = item_text_cache.ItemTextCache(caches["critiques"])
  item_text_cache.check_compatible(items, crit)
  item_text_cache.check_compatible(items.manifest, crit.manifest)
  _build(tiny_data, tmp_path / "crit1", texts="critiques", seed=1)
  other = item_text_cache.ItemTextCache(str(tmp_path / "crit1"))
  with pytest.raises(item_text_cache.CacheMismatchError) as e:
    item_text_cache.check_compatible(items, other)
  msg = str(e.value)
  assert "checkpoint_fingerprint: item cache has" in msg
  assert "encoder:" not in msg and "d_model" not in msg
  assert str(tmp_path / "crit1") in msg
  with pytest.raises(item_text_cache.CacheMismatchError,
                     match="texts_kind 'critiques', expected 'items'"):
    item_text_cache.check_compatible(crit, items)
  wider = dict(crit.manifest, d_model=32)
  with pytest.raises(item_text_cache.CacheMismatchError,
                     match="d_model: item cache has 16, critique cache has "
                     "32"):
    item_text_cache.check_compatible(items, wider)
  desc = item_text_cache.describe_identity(crit.manifest)
  assert desc.startswith("critiques x60 by bert_random (random init, not "
                         "pretrained), weights ")
  assert "width 16, 16 tokens/text, float32" in desc


def test_caches_without_texts_kind_read_as_items(tiny_data, caches, tmp_path):
  out = str(tmp_path / "old")
  shutil.copytree(caches["items"], out)
  mpath = os.path.join(out, "manifest.json")
  with open(mpath) as f:
    manifest = json.load(f)
  for key in ("texts_kind", "num_truncated", "pretrained"):
    del manifest[key]
  with open(mpath, "w") as f:
    json.dump(manifest, f)
  os.remove(os.path.join(out, "texts.json"))
  old = item_text_cache.ItemTextCache(out, expect={"texts_kind": "items"})
  assert old.texts_kind == "items" and old.texts is None
  item_text_cache.check_compatible(
      old, item_text_cache.ItemTextCache(caches["critiques"]))
  # Resuming it with today's code: accepted, texts.json and the new keys
  # added, nothing re-encoded.
  _, logs = _build(tiny_data, out)
  assert any("already complete" in line for line in logs), logs
  new = item_text_cache.ItemTextCache(out)
  assert new.manifest["texts_kind"] == "items"
  assert new.manifest["num_truncated"] == 150
  assert new.texts == item_texts.item_texts(tiny_data)
  # A texts.json that does not hash to the manifest's texts is an error.
  with open(os.path.join(out, "texts.json"), "w") as f:
    json.dump(["x"] * 150, f)
  with pytest.raises(ValueError, match="texts_sha256"):
    _ = item_text_cache.ItemTextCache(out).texts


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_cli_gin_file_and_flags(tiny_data, tmp_path, capsys, clean_gin):
  del clean_gin
  out = str(tmp_path / "cli_crit")
  argv = ["--gin_file=gin/embed/synthetic_random.gin",
          f"--data_dir={tiny_data}", f"--output_dir={out}",
          "--texts=critiques", "--max_text_len=24"]
  cwd = os.getcwd()
  os.chdir(helpers.REPO_ROOT)
  try:
    assert embed_items.main(argv) == 0
  finally:
    os.chdir(cwd)
  printed = capsys.readouterr().out
  cache = item_text_cache.ItemTextCache(out)
  m = cache.manifest
  assert m["texts_kind"] == "critiques" and m["d_model"] == 64
  assert m["random_encoder"] == embed_items.RANDOM_ENCODER_DEFAULTS
  per_item = item_text_cache.bytes_per_item(24, 64, "float32")
  assert per_item == 24 + 24 * 4 + 64 * 4 + 24 * 64 * 4
  assert (f"wrote {out} (60 critiques, {per_item} bytes/item, "
          f"{per_item * 60 / 2**20:.1f} MiB, {m['num_truncated']} truncated "
          "at max_text_len=24;") in printed, printed
  # Without gin: bert_random needs no --checkpoint, bert does.
  flags = [f"--data_dir={tiny_data}", f"--output_dir={tmp_path / 'flags'}",
           "--max_text_len=8", "--dtype=float32", "--no_tokens"]
  assert embed_items.main(flags + ["--encoder=bert_random"]) == 0
  assert "150 items" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    embed_items.main(flags + ["--encoder=bert"])
  assert "--checkpoint" in capsys.readouterr().err
  assert embed_items.main(flags + ["--encoder=bert_random",
                                   "--max_text_len=200"]) == 1
  assert "max_position_embeddings=128" in capsys.readouterr().err
