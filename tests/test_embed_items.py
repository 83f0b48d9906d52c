"""The item-text cache CLI: contents vs transformers, resume, refusals, devices."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from recsys_jax import embed_items
from recsys_jax.text import item_text_cache
from recsys_jax.text import vocab as text_vocab
from recsys_jax.checkpoint_import import bert as bert_import
from recsys_jax.data import prepared

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["shampoo", "conditioner", "serum", "vitamin", "oil", "cream", "face",
         "hair", "care", "beauty", "gentle", "daily", "repair", "mask", "dry",
         "skin", "for", "with", "and", "the", "acme", "glow", "category",
         "brand", "##s", "##ing", "oz"]
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
         list(".,:;!?-'()>&") + [str(d) for d in range(10)] + WORDS)
NUM_ITEMS, MAX_LEN, CHUNK, BATCH = 37, 16, 8, 4


def _items():
  rng = np.random.RandomState(0)
  items = {}
  for k in range(NUM_ITEMS):
    n = rng.randint(1, 12)  # some texts exceed MAX_LEN and get truncated
    title = " ".join(rng.choice(WORDS[:20], n)) + f" {k}"
    items[f"i{k}"] = prepared.ItemMeta(
        item_id=f"i{k}", title=title.capitalize(),
        categories=["Beauty", "Hair Care"] if k % 2 else ["Skin"],
        brand="Acme" if k % 3 else "", description="gentle daily repair"
        if k % 5 == 0 else "")
  return items


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  root = tmp_path_factory.mktemp("embed")
  data_dir = str(root / "data")
  items = _items()
  users = [prepared.UserRecord(
      user_id=f"u{u}", item_ids=[f"i{(u * 7 + j) % NUM_ITEMS}"
                                 for j in range(4)]) for u in range(NUM_ITEMS)]
  # A small SentencePiece model for the T5 test rides along.
  prepared.write_prepared(data_dir, users, items, text_vocab_size=64)
  ckpt = str(root / "bert")
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(
      vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=24,
      max_position_embeddings=MAX_LEN)).eval()
  model.save_pretrained(ckpt)
  with open(os.path.join(ckpt, "vocab.txt"), "w") as f:
    f.write("\n".join(VOCAB) + "\n")
  ref = str(root / "ref")
  embed_items.build_cache(data_dir, "bert", ckpt, ckpt, ref,
                          max_text_len=MAX_LEN, batch_size=BATCH,
                          chunk_size=CHUNK, dtype="float32", log=lambda s: None)
  return dict(root=root, data_dir=data_dir, ckpt=ckpt, model=model, ref=ref)


def _build(work, out, **kw):
  logs = []
  args = dict(max_text_len=MAX_LEN, batch_size=BATCH, chunk_size=CHUNK,
              dtype="float32", log=logs.append)
  args.update(kw)
  embed_items.build_cache(work["data_dir"], "bert", work["ckpt"], work["ckpt"],
                          out, **args)
  return logs


def _assert_same_cache(a, b):
  ca, cb = item_text_cache.ItemTextCache(a), item_text_cache.ItemTextCache(b)
  for name in ("tokens", "mask", "token_ids", "pooled"):
    x, y = getattr(ca, name), getattr(cb, name)
    assert x.dtype == y.dtype and x.shape == y.shape, name
    assert np.array_equal(np.asarray(x).view(np.uint8),
                          np.asarray(y).view(np.uint8)), f"{name} differs"


def test_cache_matches_transformers(work):
  cache = item_text_cache.ItemTextCache(work["ref"])
  texts = [prepared.item_text(r) for r in prepared.read_items(work["data_dir"])]
  assert cache.tokens.shape == (NUM_ITEMS, MAX_LEN, 16)
  assert cache.pooled.shape == (NUM_ITEMS, 16)
  assert isinstance(cache.tokens, np.memmap)
  hf_tok = transformers.BertTokenizer(os.path.join(work["ckpt"], "vocab.txt"),
                                      do_lower_case=True)
  batch = hf_tok(texts, padding="max_length", truncation=True,
                 max_length=MAX_LEN, return_tensors="pt")
  np.testing.assert_array_equal(cache.token_ids, batch["input_ids"].numpy())
  np.testing.assert_array_equal(cache.mask,
                                batch["attention_mask"].numpy().astype(bool))
  assert cache.mask.all(axis=1).any() and not cache.mask.all()  # truncation+pad
  with torch.no_grad():
    ref = work["model"](**batch).last_hidden_state.numpy()
  np.testing.assert_allclose(cache.tokens, ref, atol=1e-4, rtol=0)
  m = batch["attention_mask"].numpy()[..., None].astype(np.float32)
  pooled = (ref * m).sum(1) / m.sum(1)
  pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
  np.testing.assert_allclose(cache.pooled, pooled, atol=1e-5)
  # Vocabulary index i + 1 is row i; padding and [MASK] look up zeros.
  got = cache.lookup([[0, 3], [NUM_ITEMS, NUM_ITEMS + 1]])
  assert got.shape == (2, 2, 16)
  np.testing.assert_array_equal(got[0, 1], cache.pooled[2])
  np.testing.assert_array_equal(got[1, 0], cache.pooled[NUM_ITEMS - 1])
  assert not got[0, 0].any() and not got[1, 1].any()
  manifest = cache.manifest
  assert manifest["encoder"] == "bert" and manifest["complete"]
  assert manifest["completed_chunks"] == list(range(5))
  assert manifest["vocab"]["sha256"] == text_vocab.file_sha256(
      os.path.join(work["ckpt"], "vocab.txt"))


def test_float16_pooled_only_and_sizes(work, tmp_path):
  out = str(tmp_path / "c16")
  _build(work, out, dtype="float16", store_tokens=False)
  cache = item_text_cache.ItemTextCache(out)
  ref = item_text_cache.ItemTextCache(work["ref"])
  assert cache.tokens is None and cache.pooled.dtype == np.float16
  np.testing.assert_allclose(cache.pooled.astype(np.float32), ref.pooled,
                             atol=2e-3)
  assert not os.path.exists(os.path.join(out, "tokens.npy"))
  # bytes_per_item agrees with the array payloads on disk.
  for path, store_tokens, dtype in ((out, False, "float16"),
                                    (work["ref"], True, "float32")):
    c = item_text_cache.ItemTextCache(path)
    payload = sum(a.nbytes for a in (c.tokens, c.mask, c.token_ids, c.pooled)
                  if a is not None)
    assert payload == NUM_ITEMS * item_text_cache.bytes_per_item(
        MAX_LEN, 16, dtype, store_tokens)


def test_resume_after_stop_is_bit_identical(work, tmp_path):
  out = str(tmp_path / "resumed")
  _build(work, out, stop_after_chunks=2)
  manifest = item_text_cache.read_manifest(out)
  assert manifest["completed_chunks"] == [0, 1] and not manifest["complete"]
  with pytest.raises(ValueError, match="incomplete"):
    item_text_cache.ItemTextCache(out)
  logs = _build(work, out)
  assert any("3/5 chunks to encode" in line for line in logs), logs
  assert any("items/s" in line for line in logs)
  _assert_same_cache(out, work["ref"])
  logs = _build(work, out)
  assert any("already complete" in line for line in logs)


def test_lost_completion_mark_recomputes_that_chunk(work, tmp_path):
  out = str(tmp_path / "killed")
  shutil.copytree(work["ref"], out)
  # A kill during chunk 1: its rows half-written, its mark never recorded.
  mpath = os.path.join(out, item_text_cache.MANIFEST)
  with open(mpath) as f:
    manifest = json.load(f)
  manifest["completed_chunks"].remove(1)
  manifest["complete"] = False
  with open(mpath, "w") as f:
    json.dump(manifest, f)
  for name in ("tokens", "pooled"):
    arr = np.load(os.path.join(out, name + ".npy"), mmap_mode="r+")
    arr[CHUNK:CHUNK + 3] = np.nan
    arr.flush()
    del arr
  logs = _build(work, out)
  assert any("1/5 chunks to encode" in line for line in logs), logs
  _assert_same_cache(out, work["ref"])


def test_refuses_a_differently_built_cache(work, tmp_path):
  out = str(tmp_path / "reuse")
  shutil.copytree(work["ref"], out)
  # Another vocabulary (one extra line changes the file hash).
  other_vocab = tmp_path / "vocab2.txt"
  other_vocab.write_text("\n".join(VOCAB + ["extra"]) + "\n")
  with pytest.raises(item_text_cache.CacheMismatchError, match="vocab"):
    embed_items.build_cache(work["data_dir"], "bert", work["ckpt"],
                            str(other_vocab), out, max_text_len=MAX_LEN,
                            batch_size=BATCH, chunk_size=CHUNK,
                            dtype="float32", log=lambda s: None)
  # Other weights, same architecture.
  other_ckpt = str(tmp_path / "bert2")
  config, params = bert_import.load_hf_bert(work["ckpt"])
  params = jax.tree.map(lambda x: x * 1.001, params)
  bert_import.save_as_orbax(params, config, other_ckpt)
  with pytest.raises(item_text_cache.CacheMismatchError,
                     match="checkpoint_fingerprint"):
    embed_items.build_cache(work["data_dir"], "bert", other_ckpt,
                            work["ckpt"], out, max_text_len=MAX_LEN,
                            batch_size=BATCH, chunk_size=CHUNK,
                            dtype="float32", log=lambda s: None)
  with pytest.raises(item_text_cache.CacheMismatchError, match="max_text_len"):
    _build(work, out, max_text_len=MAX_LEN - 4)
  # The CLI reports the refusal and exits 1; --overwrite rebuilds.
  argv = [f"--data_dir={work['data_dir']}", "--encoder=bert",
          f"--checkpoint={work['ckpt']}", f"--vocab={work['ckpt']}",
          f"--output_dir={out}", f"--max_text_len={MAX_LEN}",
          f"--batch_size={BATCH}", f"--chunk_size={CHUNK}", "--dtype=float16"]
  assert embed_items.main(argv) == 1
  assert embed_items.main(argv + ["--overwrite", "--no_tokens"]) == 0
  cache = item_text_cache.ItemTextCache(out, expect={"dtype": "float16"})
  assert cache.tokens is None
  with pytest.raises(item_text_cache.CacheMismatchError, match="encoder"):
    item_text_cache.ItemTextCache(out, expect={"encoder": "t5"})


def test_orbax_export_is_the_same_checkpoint(work, tmp_path):
  """Same weights through our orbax export: same fingerprint, cache reused."""
  config, params = bert_import.load_hf_bert(work["ckpt"])
  orbax_dir = bert_import.save_as_orbax(params, config, str(tmp_path / "ob"))
  out = str(tmp_path / "reuse")
  shutil.copytree(work["ref"], out)
  logs = []
  embed_items.build_cache(work["data_dir"], "bert", orbax_dir, work["ckpt"],
                          out, max_text_len=MAX_LEN, batch_size=BATCH,
                          chunk_size=CHUNK, dtype="float32", log=logs.append)
  assert any("already complete" in line for line in logs), logs


def test_sharded_over_8_emulated_devices_gives_same_arrays(work, tmp_path):
  script = textwrap.dedent(f"""
      import os, sys
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      os.environ["CUDA_VISIBLE_DEVICES"] = ""
      sys.path.insert(0, {REPO_ROOT!r})
      import jax
      from recsys_jax import embed_items
      assert jax.device_count() == 8, jax.devices()
      # batch_size 4 is rounded up to 8, one row per device.
      embed_items.build_cache(
          {work['data_dir']!r}, "bert", {work['ckpt']!r}, {work['ckpt']!r},
          os.path.join({str(tmp_path)!r}, "dev8"), max_text_len={MAX_LEN},
          batch_size=4, chunk_size={CHUNK}, dtype="float32")
      """)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", script], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "8 device(s), batch 8" in proc.stdout, proc.stdout
  ref = item_text_cache.ItemTextCache(work["ref"])
  got = item_text_cache.ItemTextCache(str(tmp_path / "dev8"))
  np.testing.assert_array_equal(got.token_ids, ref.token_ids)
  np.testing.assert_allclose(got.tokens, ref.tokens, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got.pooled, ref.pooled, atol=1e-5, rtol=0)


def _t5_available():
  try:
    from recsys_jax.checkpoint_import import t5 as _  # pylint: disable=g-import-not-at-top,unused-import
    from recsys_jax.models import t5 as _t5  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except Exception:  # pylint: disable=broad-except
    return False


@pytest.mark.skipif(not _t5_available(),
                    reason="recsys_jax.models.t5 / checkpoint_import.t5 not "
                    "importable")
def test_t5_encoder_adapter(work, tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  spm_path = os.path.join(work["data_dir"], "spm.model")
  vocab = text_vocab.load_text_vocab(spm_path)
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=vocab.vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=2,
      num_heads=2, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False)).eval()
  ckpt = str(tmp_path / "t5")
  model.save_pretrained(ckpt)
  out = str(tmp_path / "t5cache")
  embed_items.build_cache(work["data_dir"], "t5", ckpt, spm_path, out,
                          max_text_len=MAX_LEN, batch_size=BATCH,
                          chunk_size=CHUNK, dtype="float32", log=lambda s: None)
  cache = item_text_cache.ItemTextCache(out)
  assert cache.manifest["pooling"] == "mean"
  texts = [prepared.item_text(r) for r in prepared.read_items(work["data_dir"])]
  for i in (0, 5, NUM_ITEMS - 1):
    want = list(vocab.encode(texts[i]))[:MAX_LEN - 1] + [vocab.eos_id]
    assert cache.token_ids[i][cache.mask[i]].tolist() == want
  ids = torch.tensor(np.asarray(cache.token_ids), dtype=torch.long)
  mask = torch.tensor(np.asarray(cache.mask), dtype=torch.long)
  with torch.no_grad():
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
  valid = np.asarray(cache.mask)
  np.testing.assert_allclose(cache.tokens[valid], ref[valid], atol=1e-4)
  m = valid[..., None].astype(np.float32)
  np.testing.assert_allclose(cache.pooled, (ref * m).sum(1) / m.sum(1),
                             atol=1e-4)
  # A BERT cache is not reused for T5.
  bert_cache = str(tmp_path / "bert_cache")
  shutil.copytree(work["ref"], bert_cache)
  with pytest.raises(item_text_cache.CacheMismatchError, match="encoder"):
    embed_items.build_cache(work["data_dir"], "t5", ckpt, spm_path,
                            bert_cache, max_text_len=MAX_LEN,
                            batch_size=BATCH, chunk_size=CHUNK,
                            dtype="float32", log=lambda s: None)
