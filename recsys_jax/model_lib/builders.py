"""Builds model wrappers from a prepared dataset and plain hyperparameters.

The catalogue size (Bert4Rec) and the text vocabulary (T5) come from the
dataset, never from a config file, so the same gin model file serves every
dataset.
"""

import math
from typing import Optional, Sequence

import numpy as np

from recsys_jax.input_pipeline import sequence_data as input_pipeline
from recsys_jax.model_lib import base as model_base
from recsys_jax.model_lib import encoder_decoder
from recsys_jax.model_lib import flare as flare_model
from recsys_jax.model_lib import sequence as model_lib
from recsys_jax.data import prepared
from recsys_jax.models import bert4rec as bert4rec_lib
from recsys_jax.models import t5 as t5_lib
from tasks import text_tasks


def train_item_log_popularity(data_dir: str) -> np.ndarray:
  """log p(item) over training interactions, add-one smoothed."""
  counts = input_pipeline.train_item_counts(data_dir).astype(np.float64) + 1.0
  return np.log(counts / counts.sum()).astype(np.float32)


def _bert4rec_config(data_dir: str, **fields
                     ) -> bert4rec_lib.Bert4RecConfig:
  """`Bert4RecConfig` with the catalogue size of the dataset at `data_dir`."""
  return bert4rec_lib.Bert4RecConfig(
      num_items=prepared.PreparedDataset(data_dir).num_items, **fields)


def bert4rec(*, data_dir: str, max_len: int = 50, hidden: int = 64,
             num_layers: int = 2, num_heads: int = 2, mlp_dim: int = 256,
             dropout_rate: float = 0.2, attention_dropout_rate: float = 0.2,
             loss: str = "full", num_negatives: int = 0,
             mask_prob: Optional[float] = None,
             max_predictions: Optional[int] = None,
             dtype: str = "float32",
             positions_from_end: bool = False, causal: bool = False,
             output_transform: bool = True, init: str = "bert",
             loss_chunk_rows: Optional[int] = model_lib.DEFAULT_LOSS_CHUNK_ROWS
             ) -> "model_lib.Bert4RecModel":
  """A Bert4Rec wrapper sized for the prepared dataset at `data_dir`.

  Args:
    data_dir: prepared dataset (its item count sizes the tables).
    max_len: maximum sequence length (positions).
    positions_from_end, causal, output_transform, init: see
      `Bert4RecConfig` (causal=True is SASRec: next-item training at every
      position; init='fan_in' for unit-gain kernels).
    loss: 'full' softmax, or 'sampled_uniform' / 'sampled_popularity' /
      'in_batch' for large catalogues.
    num_negatives: negatives per batch for the sampled losses.
    mask_prob, max_predictions: bound the masked positions gathered for the
      loss (defaults to ceil(mask_prob * max_len) + 1 when mask_prob is set).
    loss_chunk_rows: rows per chunk of the full softmax (None: one chunk;
      see `model_lib.Bert4RecModel`).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = _bert4rec_config(
      data_dir, max_len=max_len, hidden=hidden, num_layers=num_layers,
      num_heads=num_heads, mlp_dim=mlp_dim, dropout_rate=dropout_rate,
      attention_dropout_rate=attention_dropout_rate, dtype=getattr(jnp, dtype),
      positions_from_end=positions_from_end, causal=causal,
      output_transform=output_transform, init=init)
  if max_predictions is None and mask_prob is not None:
    max_predictions = min(max_len, math.ceil(mask_prob * max_len) + 1)
  log_pop = (train_item_log_popularity(data_dir)
             if loss == "sampled_popularity" else None)
  return model_lib.Bert4RecModel(
      config, loss=loss, num_negatives=num_negatives,
      item_log_popularity=log_pop, max_predictions=max_predictions,
      loss_chunk_rows=loss_chunk_rows)


def t5(*, data_dir: str, d_model: int = 512, num_heads: int = 8,
       d_kv: int = 64, d_ff: int = 2048, num_encoder_layers: int = 6,
       num_decoder_layers: int = 6, relative_attention_num_buckets: int = 32,
       relative_attention_max_distance: int = 128,
       dropout_rate: float = 0.1, feed_forward_proj: str = "relu",
       tie_word_embeddings: bool = True, dtype: str = "float32",
       extra_ids: int = 100, vocab_multiple: int = 128,
       vocab_path: Optional[str] = None, label_smoothing: float = 0.0,
       z_loss: float = 0.0, max_decode_len: int = 32, num_beams: int = 1,
       alpha: float = 0.6, soft_token_module=None,
       soft_token_inputs=None, soft_token_mode: str = "prefix",
       slot_id=None, prefix_module=None,
       prefix_inputs=None) -> encoder_decoder.EncoderDecoderModel:
  """A T5 encoder-decoder wrapper over the dataset's text vocabulary.

  The vocabulary is the dataset's SentencePiece model plus `extra_ids`
  sentinels (`text_tasks.dataset_vocabulary`, the one `TextData` uses: keep
  `extra_ids` equal on both); the embedding has that many rows rounded up to
  a multiple of `vocab_multiple` (T5: 32,100 -> 32,128) so it splits evenly
  across devices. Defaults are t5-small (v1.0); see `T5Config` for the
  architecture fields and `EncoderDecoderModel` for the rest.

  Args:
    data_dir: prepared dataset with a SentencePiece model.
    vocab_path: another SentencePiece model (default `<data_dir>/spm.model`).
    vocab_multiple: round the embedding rows up to a multiple of this.
    slot_id: the slot token of soft_token_mode='slots': an id, or a
      sentinel's name such as '<extra_id_99>' (ILM's item slots).
    prefix_module: per-layer prefix keys/values (prefix tuning): a Flax
      module, or a builder called with the `T5Config` built here, so that
      the layer and head sizes are never repeated (gin:
      `builders.t5.prefix_module = @builders.lancer_prefix`, uncalled).
    prefix_inputs: the batch features it reads (`lancer_prefix_inputs`).
  """
  if int(vocab_multiple) < 1:
    raise ValueError(f"vocab_multiple={vocab_multiple}: expected >= 1")
  vocabulary = text_tasks.dataset_vocabulary(data_dir, extra_ids=extra_ids,
                                             vocab_path=vocab_path)
  vocab_size = -(-vocabulary.vocab_size // vocab_multiple) * vocab_multiple
  if isinstance(slot_id, str):  # a sentinel's name: its single id
    from tasks import ilm_tasks  # pylint: disable=g-import-not-at-top
    slot_id = ilm_tasks.special_id(vocabulary, slot_id)
  config = t5_lib.T5Config(
      vocab_size=vocab_size, d_model=d_model, num_heads=num_heads, d_kv=d_kv,
      d_ff=d_ff, num_encoder_layers=num_encoder_layers,
      num_decoder_layers=num_decoder_layers,
      relative_attention_num_buckets=relative_attention_num_buckets,
      relative_attention_max_distance=relative_attention_max_distance,
      dropout_rate=dropout_rate, feed_forward_proj=feed_forward_proj,
      tie_word_embeddings=tie_word_embeddings, dtype=dtype)
  if prefix_module is not None:
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    if not isinstance(prefix_module, nn.Module):
      if not callable(prefix_module):
        raise ValueError(f"t5(prefix_module={prefix_module!r}): expected a "
                         "Flax module or a builder taking the T5Config "
                         "(gin: @builders.lancer_prefix, uncalled)")
      prefix_module = prefix_module(config)
  return encoder_decoder.EncoderDecoderModel(
      config, vocabulary=vocabulary, soft_token_module=soft_token_module,
      soft_token_inputs=soft_token_inputs, soft_token_mode=soft_token_mode,
      slot_id=slot_id, label_smoothing=label_smoothing, z_loss=z_loss,
      max_decode_len=max_decode_len, num_beams=num_beams, alpha=alpha,
      prefix_module=prefix_module, prefix_inputs=prefix_inputs)


def item_soft_tokens(*, data_dir: str, d_model: int, sources: str = "fused",
                     adapter: str = "linear", mlp_dim: int = 512,
                     tokens_per_item: int = 1, normalize: bool = True,
                     dropout_rate: float = 0.0, next_item: bool = True,
                     cf: Optional[str] = "als",
                     item_text_cache: Optional[str] = None,
                     cf_dim: int = 64, als_iterations: int = 10,
                     seed: int = 0, items_feature: str = "history_items",
                     dtype: str = "float32"):
  """REGEN's soft-token module (`models/item_soft_tokens.ItemSoftTokens`).

  Per history item: its collaborative-filtering embedding (`cf`: 'als' fits
  implicit ALS on the leave-one-out training parts, or a path to an
  export's item_embeddings.npy) and its semantic embedding (the pooled
  vectors of `item_text_cache`), normalised, concatenated and adapted to
  `d_model` (give it to `t5(soft_token_module=...)` with
  `soft_token_inputs=item_soft_token_inputs(...)`). `sources` 'cf' /
  'semantic' are the single-embedding ablations: the other table is not
  loaded (nor fitted). `items_feature='slot_items'`, `sources='cf'`,
  `adapter='mlp'`, `next_item=False` is CoLLM's MLP adapter in ILM's item
  slots (`ilm_slot_inputs`).
  """
  from recsys_jax.models import item_soft_tokens as soft_lib  # pylint: disable=g-import-not-at-top
  config = soft_lib.ItemSoftTokensConfig(
      d_model=d_model, sources=sources, adapter=adapter, mlp_dim=mlp_dim,
      tokens_per_item=tokens_per_item, normalize=normalize,
      dropout_rate=dropout_rate, next_item=next_item,
      items_feature=items_feature, dtype=dtype)
  tables = _frozen_item_tables(
      f"item_soft_tokens(sources={sources!r})", config, data_dir=data_dir,
      cf=cf, item_text_cache=item_text_cache, cf_dim=cf_dim,
      als_iterations=als_iterations, seed=seed)
  return soft_lib.ItemSoftTokens(config=config, tables=tables)


def _frozen_item_tables(what: str, config, *, data_dir: Optional[str],
                        cf: Optional[str], item_text_cache: Optional[str],
                        cf_dim: int, als_iterations: int, seed: int):
  """The device tables of the sources `config.used_sources` reads (REGEN's
  soft tokens, LANCER's reasoning prompt), the others neither loaded nor
  fitted; a missing input is a one-line error starting with `what`."""
  from recsys_jax.model_lib import item_embeddings  # pylint: disable=g-import-not-at-top
  from recsys_jax.models import item_soft_tokens as soft_lib  # pylint: disable=g-import-not-at-top
  needs = config.used_sources
  if "semantic" in needs and not item_text_cache:
    raise ValueError(f"{what} needs item_text_cache (an embed_items cache "
                     "of this dataset)")
  if "cf" in needs and not cf:
    raise ValueError(f"{what} needs cf ('als' or an export's "
                     "item_embeddings.npy)")
  if not data_dir:
    raise ValueError(f"{what} needs data_dir (the prepared dataset whose "
                     "item tables it reads)")
  tables = item_embeddings.load_item_tables(
      data_dir, cf=cf if "cf" in needs else None,
      item_text_cache=item_text_cache if "semantic" in needs else None,
      cf_dim=cf_dim, als_iterations=als_iterations, seed=seed)
  soft_lib.check_tables(config, tables)
  model_base.enable_array_constants()  # tables: arguments, not HLO
  return tables.device()


def item_soft_token_inputs(*, max_history: int, next_item: bool = True):
  """The batch features `item_soft_tokens` reads (`t5(soft_token_inputs=)`):
  `history_items` `[B, max_history]` and `next_item` `[B, 1]`, int32."""
  spec = {"history_items": ((int(max_history),), "int32")}
  if next_item:
    spec["next_item"] = ((1,), "int32")
  return spec


def lancer_prefix(t5_config, *, data_dir: Optional[str] = None,
                  mode: str = "reasoning", prefix_length: int = 20,
                  hidden: Optional[int] = None, history_window: int = 10,
                  stacks: Sequence[str] = ("encoder", "decoder"),
                  sources: str = "semantic", normalize: bool = True,
                  dropout_rate: float = 0.2,
                  reasoning_projection: str = "shared",
                  cf: Optional[str] = None,
                  item_text_cache: Optional[str] = None, cf_dim: int = 64,
                  als_iterations: int = 10, seed: int = 0,
                  dtype: Optional[str] = None):
  """LANCER's knowledge / reasoning prompts (`models/lancer.LancerPrefix`),
  sized for `t5_config` (`t5(prefix_module=...)` calls it with its config).

  Args:
    t5_config: the `T5Config` (heads, d_kv, layers; `hidden` and `dtype`
      default to its d_model and dtype).
    data_dir: the prepared dataset (its items size the tables); not read in
      'knowledge' mode.
    mode: 'knowledge' (stage 1), 'reasoning' or 'both' (stage 2).
    sources: the reasoning prompt's item vectors, 'semantic' (the pooled
      vectors of `item_text_cache`), 'cf' (`cf`: 'als' or an export's
      item_embeddings.npy) or 'fused'; only those tables are loaded, and
      none in 'knowledge' mode (cf and item_text_cache may be None there).
    The rest: see `LancerConfig`.
  """
  from recsys_jax.models import lancer as lancer_lib  # pylint: disable=g-import-not-at-top
  config = lancer_lib.LancerConfig.for_t5(
      t5_config, hidden=hidden, prefix_length=prefix_length, mode=mode,
      stacks=tuple(stacks) if not isinstance(stacks, str) else stacks,
      history_window=history_window, sources=sources, normalize=normalize,
      dropout_rate=dropout_rate, reasoning_projection=reasoning_projection,
      **({} if dtype is None else {"dtype": dtype}))
  if not config.reads_history:
    return lancer_lib.LancerPrefix(config=config, tables=None)
  tables = _frozen_item_tables(
      f"lancer_prefix(mode={mode!r}, sources={sources!r})", config,
      data_dir=data_dir, cf=cf, item_text_cache=item_text_cache,
      cf_dim=cf_dim, als_iterations=als_iterations, seed=seed)
  return lancer_lib.LancerPrefix(config=config, tables=tables)


def lancer_prefix_inputs(max_history: int):
  """The batch feature `lancer_prefix` reads (`t5(prefix_inputs=)`):
  `history_items` `[B, max_history]` int32."""
  if (isinstance(max_history, bool) or not isinstance(
      max_history, (int, np.integer)) or max_history < 1):
    raise ValueError(f"lancer_prefix_inputs(max_history={max_history!r}): "
                     "expected a positive integer")
  return {"history_items": ((int(max_history),), "int32")}


def qformer_config(*, data_dir: str, hidden: int = 128, num_layers: int = 2,
                   num_heads: int = 4, mlp_dim: int = 512,
                   num_queries: int = 8, cross_attention_every: int = 1,
                   memory_dim: int = 16, max_text_len: int = 64,
                   dropout_rate: float = 0.1,
                   attention_dropout_rate: float = 0.1,
                   memory_norm: bool = True, memory_positions: int = 0,
                   extra_ids: int = text_tasks.DEFAULT_EXTRA_IDS,
                   vocab_path: Optional[str] = None,
                   dtype: str = "float32"):
  """ILM's Q-Former architecture (`models/qformer.QFormerConfig`), its text
  vocabulary the dataset's SentencePiece model + `extra_ids` (phase 1's
  text; phase 2 reads no text). One gin binding serves both phases, so
  phase 2's `init_from` finds phase 1's shapes."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from recsys_jax.models import qformer as qformer_lib  # pylint: disable=g-import-not-at-top
  vocabulary = text_tasks.dataset_vocabulary(data_dir, extra_ids=extra_ids,
                                             vocab_path=vocab_path)
  return qformer_lib.QFormerConfig(
      vocab_size=vocabulary.vocab_size, hidden=hidden, num_layers=num_layers,
      num_heads=num_heads, mlp_dim=mlp_dim, num_queries=num_queries,
      cross_attention_every=cross_attention_every, memory_dim=memory_dim,
      max_text_len=max_text_len, dropout_rate=dropout_rate,
      attention_dropout_rate=attention_dropout_rate, memory_norm=memory_norm,
      memory_positions=memory_positions, dtype=getattr(jnp, dtype))


def ilm_cf_table(data_dir: str, cf: str, *, cf_dim: int = 64,
                 als_iterations: int = 10, seed: int = 0) -> np.ndarray:
  """`[num_items + 1, D]` CF item embeddings for ILM: an export's
  item_embeddings.npy (a sequence model's item table; its item count must
  be the dataset's, else a one-line error naming both) or 'als'."""
  from recsys_jax.model_lib import item_embeddings  # pylint: disable=g-import-not-at-top
  tables = item_embeddings.load_item_tables(
      data_dir, cf=cf, item_text_cache=None, cf_dim=cf_dim,
      als_iterations=als_iterations, seed=seed)
  return np.asarray(tables.cf, np.float32)


def ilm_item_tokens(*, data_dir: str, d_model: int, qformer, cf: str,
                    num_chunks: int = 4, cf_dim: int = 64,
                    als_iterations: int = 10, seed: int = 0):
  """ILM's phase-2 soft-token module (`models/ilm_item_tokens`): each item
  of `slot_items` becomes `qformer.num_queries` tokens of `d_model`.

  Args:
    data_dir: the prepared dataset.
    d_model: the LM's width.
    qformer: `qformer_config(...)` (phase 1's).
    cf: an export directory / item_embeddings.npy, or 'als'.
    num_chunks: M; the CF width must be M * qformer.memory_dim.
  """
  from recsys_jax.models import ilm_item_tokens as ilm_tokens_lib  # pylint: disable=g-import-not-at-top
  table = ilm_cf_table(data_dir, cf, cf_dim=cf_dim,
                       als_iterations=als_iterations, seed=seed)
  model_base.enable_array_constants()  # the table: an argument, not HLO
  return ilm_tokens_lib.QFormerItemTokens(
      qformer=qformer, d_model=d_model, num_chunks=num_chunks,
      cf_table=table)


def ilm_pretrain(*, data_dir: str, qformer, cf: str, num_chunks: int = 4,
                 embed_dim: int = 64, itc_weight: float = 1.0,
                 itg_weight: float = 1.0, itm_weight: float = 1.0,
                 item_item_weight: float = 1.0, user_item_weight: float = 1.0,
                 temperature_init: float = 0.07,
                 label_smoothing: float = 0.1,
                 extra_ids: int = text_tasks.DEFAULT_EXTRA_IDS,
                 vocab_path: Optional[str] = None, cf_dim: int = 64,
                 als_iterations: int = 10, seed: int = 0):
  """ILM's phase-1 model (`model_lib/ilm_pretrain.ILMPretrainModel`): the
  Q-Former pretrained on item-text (ITC, ITG, ITM), item-item and
  user-item batches; a loss of weight 0 is off. CLS / DEC are the
  vocabulary's `<extra_id_0>` / `<extra_id_1>` (as `tasks/ilm_tasks`)."""
  from recsys_jax.model_lib import ilm_pretrain as ilm_pretrain_lib  # pylint: disable=g-import-not-at-top
  from tasks import ilm_tasks  # pylint: disable=g-import-not-at-top
  vocabulary = text_tasks.dataset_vocabulary(data_dir, extra_ids=extra_ids,
                                             vocab_path=vocab_path)
  table = ilm_cf_table(data_dir, cf, cf_dim=cf_dim,
                       als_iterations=als_iterations, seed=seed)
  return ilm_pretrain_lib.ILMPretrainModel(
      qformer, table, num_chunks=num_chunks, embed_dim=embed_dim,
      itc_weight=itc_weight, itg_weight=itg_weight, itm_weight=itm_weight,
      item_item_weight=item_item_weight, user_item_weight=user_item_weight,
      cls_id=ilm_tasks.special_id(vocabulary, ilm_tasks.CLS_TOKEN),
      dec_id=ilm_tasks.special_id(vocabulary, ilm_tasks.DEC_TOKEN),
      temperature_init=temperature_init, label_smoothing=label_smoothing)


def ilm_slot_inputs(*, max_slot_items: int):
  """The batch feature ILM's item-token modules read
  (`t5(soft_token_inputs=)`): `slot_items` `[B, max_slot_items]` int32."""
  return {"slot_items": ((int(max_slot_items),), "int32")}


def flare(*, data_dir: str, item_text_cache: str,
          critique_text_cache: Optional[str] = None,
          ood_categories: Sequence[str] = (), max_len: int = 50,
          hidden: int = 64, num_layers: int = 2, num_heads: int = 2,
          mlp_dim: int = 256, dropout_rate: float = 0.2,
          attention_dropout_rate: float = 0.2,
          mask_prob: Optional[float] = None,
          max_predictions: Optional[int] = None, dtype: str = "float32",
          positions_from_end: bool = False, causal: bool = False,
          output_transform: bool = True, num_latents: int = 4,
          perceiver_layers: int = 1, perceiver_heads: int = 2,
          perceiver_mlp_dim: int = 128, perceiver_dropout_rate: float = 0.1,
          fusion: str = "sum", output_table: str = "id",
          eval_table: Optional[str] = None, infonce_weight: float = 0.1,
          infonce_temperature: float = 0.1,
          data_critique_rate: float = 0.5, proxy_critique_rate: float = 0.25,
          max_distinct_items: Optional[int] = None,
          max_critiques_per_row: Optional[int] = None,
          untrained_as_new: bool = True, cold_item_fraction: float = 0.0,
          cold_item_seed: int = 0,
          loss_chunk_rows: Optional[int] = model_lib.DEFAULT_LOSS_CHUNK_ROWS
          ) -> "flare_model.FlareModel":
  """A FLARE wrapper (model_lib/flare.py) sized for the dataset at `data_dir`.

  The backbone arguments are `bert4rec`'s; the Perceiver's width is the
  backbone's `hidden`. See `FlareModel` for the rest.

  Args:
    item_text_cache: `embed_items --texts=items` cache of this dataset.
    critique_text_cache: `embed_items --texts=critiques` cache (same
      encoder), or None: no critiques.
    ood_categories: category names never used as training critiques.
    untrained_as_new: score items without training interactions as new
      items (`FlareModel.new_items`); the training counts follow the data's
      cold-item protocol: pass the same `cold_item_fraction` /
      `cold_item_seed` as `SequenceData`.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from recsys_jax.model_lib import flare_tables  # pylint: disable=g-import-not-at-top
  from recsys_jax.models import flare as flare_lib  # pylint: disable=g-import-not-at-top
  from recsys_jax.models import perceiver  # pylint: disable=g-import-not-at-top
  backbone = _bert4rec_config(
      data_dir, max_len=max_len, hidden=hidden, num_layers=num_layers,
      num_heads=num_heads, mlp_dim=mlp_dim, dropout_rate=dropout_rate,
      attention_dropout_rate=attention_dropout_rate, dtype=getattr(jnp, dtype),
      positions_from_end=positions_from_end, causal=causal,
      output_transform=output_transform)
  tables, ood_ids = flare_tables.load_text_tables(
      data_dir, item_text_cache, critique_text_cache, backbone.padded_vocab,
      ood_categories)
  config = flare_lib.FlareConfig(
      backbone=backbone,
      perceiver=perceiver.PerceiverConfig(
          num_latents=num_latents, num_layers=perceiver_layers, width=hidden,
          num_heads=perceiver_heads, mlp_dim=perceiver_mlp_dim,
          dropout_rate=perceiver_dropout_rate),
      text_dim=tables.text_dim, fusion=fusion)
  if max_predictions is None and mask_prob is not None and not causal:
    max_predictions = min(max_len, math.ceil(mask_prob * max_len) + 1)
  new_items = None
  if untrained_as_new:
    counts = input_pipeline.train_item_counts(
        data_dir, cold_item_fraction=cold_item_fraction,
        cold_item_seed=cold_item_seed)
    new_items = np.flatnonzero(counts == 0) + 1
  return flare_model.FlareModel(
      config, tables, new_items=new_items, output_table=output_table, eval_table=eval_table,
      infonce_weight=infonce_weight, infonce_temperature=infonce_temperature,
      data_critique_rate=data_critique_rate,
      proxy_critique_rate=proxy_critique_rate, ood_critique_ids=ood_ids,
      max_distinct_items=max_distinct_items,
      max_critiques_per_row=max_critiques_per_row,
      max_predictions=max_predictions, loss_chunk_rows=loss_chunk_rows)
