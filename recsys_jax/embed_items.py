"""Encodes every item's (or critique's) text once into a memory-mappable cache.

  python -m recsys_jax.embed_items --data_dir=PREPARED --encoder=bert \\
      --checkpoint=HF_OR_ORBAX_DIR --vocab=VOCAB --output_dir=CACHE \\
      --max_text_len=32 --batch_size=64 [--texts=critiques]
  python -m recsys_jax.embed_items --gin_file=gin/embed/synthetic_random.gin

With --texts=items (default) row i is item i (vocabulary index i + 1),
rendered with `text.item_texts`; with --texts=critiques row r is
`text.critique_texts.critique_texts(data_dir)[r]`. Each text is tokenised
(`text_vocab.encode_batch`), encoded with a jitted encoder whose batch is
split over a ('data', 'model') mesh of all local devices, and written chunk
by chunk into `item_text_cache` arrays (texts.json keeps the rows' texts).
Rerunning the same command resumes after a kill; a different encoder,
checkpoint, vocabulary, texts or layout is refused (see
`item_text_cache.IDENTITY_KEYS`).

--checkpoint is an HF directory (config.json + model.safetensors /
pytorch_model.bin) or an orbax directory from
`checkpoint_import.{bert,t5}.save_as_orbax` (params/ + bert_config.json or
t5_config.json). --encoder=bert_random needs none: a small BERT with seeded
random weights over the dataset's own SentencePiece vocabulary (no
download; it knows no language, see `random_bert_encoder`).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.core import partitioning
from recsys_jax.data import prepared
from recsys_jax.text import critique_texts as critique_texts_lib
from recsys_jax.text import item_text_cache
from recsys_jax.text import item_texts as item_texts_lib
from recsys_jax.text import vocab as text_vocab

BERT_RANDOM = "bert_random"
ENCODERS = ("bert", "t5", BERT_RANDOM)
POOLINGS = ("mean", "mean_l2")
TEXTS_KINDS = item_text_cache.TEXTS_KINDS
# Sizes of --encoder=bert_random (BertConfig field names) and its init seed.
RANDOM_ENCODER_DEFAULTS = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 256, "max_position_embeddings": 128, "seed": 0,
}


@dataclasses.dataclass
class TextEncoder:
  """A loaded encoder: `apply(params, ids, mask) -> [B, L, d_model]`.

  Attributes:
    name: 'bert', 't5' or 'bert_random'.
    config: the architecture as a JSON-able dict (part of the fingerprint).
    params: parameter tree (host arrays).
    apply: pure function for jit.
    d_model: width of the hidden states.
    default_pooling: 'mean_l2' for BERT (sentence-transformers), 'mean' for T5.
    pretrained: False for randomly initialised weights.
  """
  name: str
  config: Dict[str, Any]
  params: Any
  apply: Callable[..., jax.Array]
  d_model: int
  default_pooling: str
  pretrained: bool = True


def _bert_encoder(checkpoint: str) -> TextEncoder:
  from recsys_jax.checkpoint_import import bert as bert_import  # pylint: disable=g-import-not-at-top
  from recsys_jax.models import bert  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(checkpoint, bert_import.ORBAX_CONFIG_FILE)):
    config, params = bert_import.load_orbax(checkpoint)
  else:
    config, params = bert_import.load_hf_bert(checkpoint)
  model = bert.BertEncoder(config)

  def apply(p, ids, mask):
    return model.apply({"params": p}, ids, mask)
  return TextEncoder("bert", dataclasses.asdict(config), params, apply,
                     config.hidden_size, "mean_l2")


def _t5_encoder(checkpoint: str) -> TextEncoder:
  """T5 through the teammate's model/importer, imported only when asked."""
  from recsys_jax.checkpoint_import import t5 as t5_import  # pylint: disable=g-import-not-at-top
  from recsys_jax.models import t5  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(checkpoint, t5_import.CONFIG_FILE)):
    config, params = t5_import.load_orbax(checkpoint, encoder_only=True)
  else:
    config, params = t5_import.load_hf_t5(checkpoint, encoder_only=True)
  model = t5.T5Encoder(config)

  def apply(p, ids, mask):
    return model.apply({"params": p}, ids, mask)
  return TextEncoder("t5", config.to_dict(), params, apply, config.d_model,
                     "mean")


def resolve_random_encoder(random_encoder: Optional[Mapping[str, Any]]
                           ) -> Dict[str, Any]:
  """`RANDOM_ENCODER_DEFAULTS` updated with `random_encoder`, checked."""
  unknown = sorted(set(random_encoder or {}) - set(RANDOM_ENCODER_DEFAULTS))
  if unknown:
    raise ValueError(f"random_encoder keys {unknown}: expected some of "
                     f"{sorted(RANDOM_ENCODER_DEFAULTS)}")
  out = dict(RANDOM_ENCODER_DEFAULTS, **(random_encoder or {}))
  for key, value in out.items():
    if not isinstance(value, int) or isinstance(value, bool) or (
        value < (0 if key == "seed" else 1)):
      raise ValueError(f"random_encoder[{key!r}]={value!r}; expected a "
                       f"{'non-negative' if key == 'seed' else 'positive'} int")
  return out


def random_bert_encoder(vocab: Any, random_encoder: Optional[Mapping[str, Any]]
                        = None) -> TextEncoder:
  """A small BERT with seeded random weights over `vocab` (no download).

  It knows no language: its only use is to make token sequences
  distinguishable (a fixed random, contextual map from token ids to
  vectors), so the embedded synthetic default runs offline. A model fed its
  encodings learns item text from scratch through whatever it puts on top.
  Weights are drawn on the host CPU, so the same seed gives the same bytes
  (and checkpoint fingerprint) with or without an accelerator, for a given
  JAX version (a JAX upgrade may change the random draws).

  Args:
    vocab: the text vocabulary (its `vocab_size` and `pad_id` size the
      embedding table).
    random_encoder: overrides of `RANDOM_ENCODER_DEFAULTS` (hidden_size,
      num_hidden_layers, num_attention_heads, intermediate_size,
      max_position_embeddings, seed).
  """
  from recsys_jax.checkpoint_import import bert as bert_import  # pylint: disable=g-import-not-at-top
  from recsys_jax.models import bert  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  sizes = resolve_random_encoder(random_encoder)
  seed = sizes.pop("seed")
  if not 0 <= vocab.pad_id < vocab.vocab_size:
    raise ValueError(f"vocabulary pad id {vocab.pad_id} outside its "
                     f"{vocab.vocab_size} tokens")
  config = bert.BertConfig(vocab_size=vocab.vocab_size,
                           pad_token_id=vocab.pad_id, **sizes)
  with jax.default_device(jax.devices("cpu")[0]):
    params = nn.meta.unbox(bert_import.init_params(
        config, jax.random.PRNGKey(seed)))
    params = jax.tree.map(np.asarray, params)
  model = bert.BertEncoder(config)

  def apply(p, ids, mask):
    return model.apply({"params": p}, ids, mask)
  return TextEncoder(BERT_RANDOM, dataclasses.asdict(config), params, apply,
                     config.hidden_size, "mean_l2", pretrained=False)


def load_encoder(encoder: str, checkpoint: Optional[str], *,
                 vocab: Any = None,
                 random_encoder: Optional[Mapping[str, Any]] = None
                 ) -> TextEncoder:
  """Loads `encoder` ('bert' or 't5') weights from `checkpoint`.

  'bert_random' takes no checkpoint: its weights are drawn from
  `random_encoder['seed']` over the loaded text vocabulary `vocab`.
  """
  if encoder not in ENCODERS:
    raise ValueError(f"--encoder={encoder!r}; expected one of {ENCODERS}")
  if encoder == BERT_RANDOM:
    if checkpoint:
      raise ValueError(f"--checkpoint={checkpoint}: --encoder={BERT_RANDOM} "
                       "draws its weights (random_encoder seed); pass no "
                       "checkpoint")
    if vocab is None:
      raise ValueError(f"--encoder={BERT_RANDOM} needs the text vocabulary")
    return random_bert_encoder(vocab, random_encoder)
  if random_encoder:
    raise ValueError(f"random_encoder is only for --encoder={BERT_RANDOM}; "
                     f"got --encoder={encoder}")
  if not checkpoint:
    raise ValueError(f"--encoder={encoder} needs --checkpoint (an HF or "
                     "orbax directory)")
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"--checkpoint={checkpoint}: not a directory")
  return _bert_encoder(checkpoint) if encoder == "bert" else _t5_encoder(
      checkpoint)


def params_fingerprint(config: Mapping[str, Any], params: Any) -> str:
  """sha256 over the config and every parameter's path, dtype, shape, bytes.

  Independent of the file format, so an HF directory and its orbax export
  with equal weights share a fingerprint.
  """
  h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def item_texts(data_dir: str) -> list:
  """Rendered text of every item, row i = vocabulary index i + 1."""
  return item_texts_lib.item_texts(data_dir)


def cache_texts(data_dir: str, texts: str) -> List[str]:
  """The rows of a cache of kind `texts` ('items' or 'critiques')."""
  if texts == item_text_cache.ITEMS:
    return item_texts(data_dir)
  if texts == item_text_cache.CRITIQUES:
    return critique_texts_lib.critique_texts(data_dir)
  raise ValueError(f"--texts={texts!r}; expected one of {TEXTS_KINDS}")


def token_lengths(voc: Any, texts: Sequence[str]) -> np.ndarray:
  """Encoder input length of each text before truncation (special tokens in).

  The special tokens `text_vocab.encode_batch` adds are counted from what it
  does with an empty text ([CLS] [SEP] for WordPiece, EOS for SentencePiece).
  """
  specials = int(text_vocab.encode_batch(voc, [""], 2)[1].sum())
  return np.array([len(voc.encode(t)) + specials for t in texts], np.int64)


def default_vocab(data_dir: str) -> str:
  """`<data_dir>/spm.model`, the SentencePiece model prepare trains."""
  path = os.path.join(data_dir, prepared.SPM_PREFIX + ".model")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path}: no SentencePiece model for --encoder={BERT_RANDOM}; pass "
        "--vocab, or prepare the dataset with a text vocabulary")
  return path


# Jitted encode functions by (encoder, config, pooling, devices), so
# repeated builds in one process (resume, several caches) compile once.
_ENCODE_FNS: Dict[tuple, Callable] = {}


def make_encode_fn(encoder: TextEncoder, pooling: str,
                   mesh: jax.sharding.Mesh):
  """Jitted `(params, ids, mask) -> (hidden, pooled)` (float32, on 'data')."""
  key = (encoder.name, json.dumps(encoder.config, sort_keys=True), pooling,
         tuple(d.id for d in mesh.devices.flat))
  if key not in _ENCODE_FNS:
    _ENCODE_FNS[key] = _make_encode_fn(encoder, pooling, mesh)
  return _ENCODE_FNS[key]


def _make_encode_fn(encoder: TextEncoder, pooling: str,
                    mesh: jax.sharding.Mesh):
  batch = partitioning.batch_sharding(mesh)
  repl = partitioning.replicated(mesh)

  def encode(params, ids, mask):
    hidden = encoder.apply(params, ids, mask).astype(jnp.float32)
    m = mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1),
                                                       1e-9)
    if pooling == "mean_l2":
      norm = jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True))
      pooled = pooled / jnp.maximum(norm, 1e-12)
    return hidden, pooled

  return jax.jit(encode, in_shardings=(repl, batch, batch),
                 out_shardings=(batch, batch))


def build_cache(data_dir: str, encoder: str, checkpoint: Optional[str],
                vocab: Optional[str],
                output_dir: str, *, texts: str = "items",
                max_text_len: int = 32,
                batch_size: int = 64, chunk_size: int = 4096,
                dtype: str = "float16", pooling: Optional[str] = None,
                store_tokens: bool = True, overwrite: bool = False,
                random_encoder: Optional[Mapping[str, Any]] = None,
                devices: Optional[Sequence[jax.Device]] = None,
                stop_after_chunks: Optional[int] = None,
                log: Callable[[str], None] = print) -> dict:
  """Builds (or resumes) a text cache; returns its manifest.

  The returned dict is the manifest plus `output_dir`.

  Args:
    data_dir: a prepared dataset (items.jsonl; sequences for critiques).
    encoder: 'bert', 't5' or 'bert_random' (seeded random weights, no
      checkpoint; see `random_bert_encoder`).
    checkpoint: HF or orbax directory of that encoder; None for bert_random.
    vocab: vocab.txt / SentencePiece .model (or a directory holding one);
      None: the checkpoint directory's own vocabulary, for bert_random
      `<data_dir>/spm.model`.
    output_dir: the cache directory.
    texts: 'items' (row i = item index i + 1) or 'critiques' (row r =
      `critique_texts(data_dir)[r]`).
    max_text_len: tokens per text, special tokens included; longer texts
      are cut (counted in the manifest's num_truncated).
    batch_size: items per jitted call (rounded up to a multiple of the
      device count).
    chunk_size: items per completion mark (the unit of resumption).
    dtype: 'float16' or 'float32' for the stored encodings.
    pooling: 'mean' or 'mean_l2'; default per encoder.
    store_tokens: also store token-level encodings (else pooled only).
    overwrite: discard an existing cache at output_dir.
    random_encoder: bert_random sizes and seed, overriding
      `RANDOM_ENCODER_DEFAULTS` (e.g. {'hidden_size': 128, 'seed': 1}).
    devices: devices for the 'data' mesh axis (default all local devices).
    stop_after_chunks: stop after this many chunks (tests: simulated kill).
    log: where progress lines go.
  """
  if jax.process_count() > 1:
    raise NotImplementedError(
        "embed_items runs on one host (all its devices); got "
        f"{jax.process_count()} processes")
  if texts not in TEXTS_KINDS:
    raise ValueError(f"--texts={texts!r}; expected one of {TEXTS_KINDS}")
  if encoder == BERT_RANDOM:
    vocab = vocab or default_vocab(data_dir)
  else:
    vocab = vocab or checkpoint  # HF folders ship their vocabulary
  if not vocab:
    raise ValueError(f"--encoder={encoder} needs --checkpoint (and --vocab "
                     "unless the checkpoint folder holds one)")
  voc = text_vocab.load_text_vocab(vocab)
  enc = load_encoder(encoder, checkpoint, vocab=voc,
                     random_encoder=random_encoder)
  limit = enc.config.get("max_position_embeddings")
  if limit is not None and max_text_len > limit:
    raise ValueError(f"--max_text_len={max_text_len} exceeds the encoder's "
                     f"max_position_embeddings={limit}")
  pooling = pooling or enc.default_pooling
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r}; expected one of {POOLINGS}")
  rows_text = cache_texts(data_dir, texts)
  if not rows_text:
    raise ValueError(f"{data_dir}: no {texts} texts to encode"
                     + (" (no critiques in the sequences and no item "
                        "categories)" if texts == "critiques" else ""))
  devices = list(devices if devices is not None else jax.local_devices())
  n_dev = len(devices)
  batch_size = -(-batch_size // n_dev) * n_dev

  spec = {
      "encoder": enc.name,
      "checkpoint_fingerprint": params_fingerprint(enc.config, enc.params),
      "vocab": text_vocab.vocab_fingerprint(voc),
      "texts_kind": texts,
      "texts_sha256": item_text_cache.texts_sha256(rows_text),
      "num_items": len(rows_text),
      "max_text_len": max_text_len,
      "d_model": enc.d_model,
      "dtype": dtype,
      "pooling": pooling,
      "store_tokens": store_tokens,
      "chunk_size": chunk_size,
      # Informational only (not compared on resume).
      "pretrained": enc.pretrained,
      "checkpoint_path": os.path.abspath(checkpoint) if checkpoint else None,
      "vocab_path": os.path.abspath(text_vocab.resolve_vocab_path(vocab)),
      "data_dir": os.path.abspath(data_dir),
      "encoder_config": enc.config,
  }
  if encoder == BERT_RANDOM:
    spec["random_encoder"] = resolve_random_encoder(random_encoder)
  writer = item_text_cache.CacheWriter(output_dir, spec, overwrite=overwrite,
                                       texts=rows_text)
  if "num_truncated" not in writer.manifest:
    lengths = token_lengths(voc, rows_text)
    writer.set_info(num_truncated=int((lengths > max_text_len).sum()))
    log(f"embed_items: {texts} token lengths (special tokens in) min "
        f"{lengths.min()} p50 {np.percentile(lengths, 50):g} p90 "
        f"{np.percentile(lengths, 90):g} max {lengths.max()}")
  log(f"embed_items: {writer.manifest['num_truncated']} of {len(rows_text)} "
      f"texts ({texts}) longer than max_text_len={max_text_len} are "
      "truncated")

  def result():
    return dict(writer.manifest, output_dir=output_dir)

  pending = writer.pending_chunks()
  if not pending:
    log(f"embed_items: {output_dir} already complete ({len(rows_text)} "
        f"{texts})")
    return result()

  mesh = partitioning.make_mesh(1, devices)
  params = jax.device_put(enc.params, partitioning.replicated(mesh))
  encode = make_encode_fn(enc, pooling, mesh)
  batch_sharding = partitioning.batch_sharding(mesh)

  def tokenize(chunk):
    start, stop = writer.chunk_rows(chunk)
    return text_vocab.encode_batch(voc, rows_text[start:stop], max_text_len)

  log(f"embed_items: {len(rows_text)} {texts}, {len(pending)}/"
      f"{writer.num_chunks} chunks to encode, {n_dev} device(s), batch "
      f"{batch_size}")
  start_time, done_items = time.time(), 0
  next_inputs = tokenize(pending[0])
  for k, chunk in enumerate(pending):
    if stop_after_chunks is not None and k >= stop_after_chunks:
      log(f"embed_items: stopping after {k} chunks as asked")
      return result()
    ids, mask = next_inputs
    n = len(ids)
    outs = []
    for b in range(0, n, batch_size):
      bi = np.full((batch_size, max_text_len), voc.pad_id, np.int32)
      bm = np.zeros((batch_size, max_text_len), bool)
      rows = min(batch_size, n - b)
      bi[:rows], bm[:rows] = ids[b:b + rows], mask[b:b + rows]
      # Dispatch is asynchronous: the device works on this chunk while the
      # host tokenises the next one below.
      outs.append((rows, encode(params, jax.device_put(bi, batch_sharding),
                                jax.device_put(bm, batch_sharding))))
    if k + 1 < len(pending):
      next_inputs = tokenize(pending[k + 1])
    # Cast on the host: one compiled function serves every storage dtype.
    hidden = np.concatenate([np.asarray(h)[:r] for r, (h, _) in outs]
                            ).astype(dtype)
    pooled = np.concatenate([np.asarray(p)[:r] for r, (_, p) in outs]
                            ).astype(dtype)
    if dtype == "float16" and not (np.isfinite(hidden).all()
                                   and np.isfinite(pooled).all()):
      raise ValueError(f"chunk {chunk}: encodings overflow float16; rerun "
                       "with --dtype=float32 (and --overwrite)")
    arrays = {item_text_cache.MASK: mask, item_text_cache.TOKEN_IDS: ids,
              item_text_cache.POOLED: pooled}
    if store_tokens:
      arrays[item_text_cache.TOKENS] = hidden
    writer.write_chunk(chunk, arrays)
    done_items += n
    rate = done_items / max(time.time() - start_time, 1e-9)
    log(f"embed_items: chunk {chunk + 1}/{writer.num_chunks} done, "
        f"{done_items} {texts} this run, {rate:.1f} {texts}/s")
  return result()


_REQUIRED = ("data_dir", "encoder", "output_dir")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI; values come from flags, or from gin files binding build_cache.

  With `--gin_file` (e.g. gin/embed/minilm_beauty.gin binding `embed_items.
  build_cache.*`), flags given on the command line override the gin values.
  Prints the cache's size per row (bytes/item) and how many texts were
  truncated.
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin files binding embed_items.build_cache")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="extra gin bindings, e.g. "
                      "\"embed_items.build_cache.batch_size = 32\"")
  parser.add_argument("--data_dir",
                      help="prepared dataset directory (items.jsonl)")
  parser.add_argument("--encoder", choices=ENCODERS,
                      help="bert_random: seeded random BERT, no checkpoint, "
                      "no language (sizes: gin random_encoder)")
  parser.add_argument("--checkpoint",
                      help="HF directory or orbax export of the encoder "
                      "(not for bert_random)")
  parser.add_argument("--vocab",
                      help="vocab.txt (WordPiece) or SentencePiece .model; "
                      "default: the checkpoint's, for bert_random "
                      "<data_dir>/spm.model")
  parser.add_argument("--texts", choices=TEXTS_KINDS,
                      help="items (default) or critiques (critique strings "
                      "of the sequences and item category names)")
  parser.add_argument("--output_dir", help="cache directory")
  parser.add_argument("--max_text_len", type=int)
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--chunk_size", type=int)
  parser.add_argument("--dtype", choices=("float16", "float32"))
  parser.add_argument("--pooling", choices=POOLINGS,
                      help="default: mean_l2 for bert, mean for t5")
  parser.add_argument("--no_tokens", action="store_true", default=None,
                      help="store pooled encodings only (not [N, L, d])")
  parser.add_argument("--overwrite", action="store_true", default=None,
                      help="discard an existing cache in --output_dir")
  args = parser.parse_args(argv)
  kwargs = {k: v for k, v in vars(args).items()
            if v is not None and k not in ("gin_file", "gin_bindings",
                                           "no_tokens")}
  if args.no_tokens:
    kwargs["store_tokens"] = False
  fn = build_cache
  if args.gin_file or args.gin_bindings:
    import gin  # pylint: disable=g-import-not-at-top
    from recsys_jax.cli import gin_utils  # pylint: disable=g-import-not-at-top
    from recsys_jax import embed_items as registered  # pylint: disable=g-import-not-at-top,import-self
    gin_utils.parse_gin(args.gin_file, args.gin_bindings)
    # Under `python -m` this module is __main__; gin registered the importable
    # module's function.
    fn = gin.get_configurable(registered.build_cache)
  else:
    missing = [k for k in _REQUIRED if k not in kwargs]
    if kwargs.get("encoder") != BERT_RANDOM and "checkpoint" not in kwargs:
      missing.append("checkpoint")
    if missing:
      parser.error("missing " + ", ".join(f"--{k}" for k in missing) +
                   " (or pass --gin_file binding embed_items.build_cache)")
    kwargs.setdefault("checkpoint", None)
    kwargs.setdefault("vocab", None)
  try:
    manifest = fn(**kwargs)
  except (item_text_cache.CacheMismatchError, FileNotFoundError,
          ValueError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  per_item = item_text_cache.bytes_per_item(
      manifest["max_text_len"], manifest["d_model"], manifest["dtype"],
      manifest["store_tokens"])
  kind = item_text_cache.identity_value(manifest, "texts_kind")
  total_mib = per_item * manifest["num_items"] / 2**20
  status = "" if manifest.get("complete") else " (incomplete)"
  print(f"embed_items: wrote {manifest['output_dir']}{status} "
        f"({manifest['num_items']} {kind}, {per_item} bytes/item, "
        f"{total_mib:.1f} MiB, {manifest.get('num_truncated')} truncated at "
        f"max_text_len={manifest['max_text_len']}; "
        f"{item_text_cache.describe_identity(manifest)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
