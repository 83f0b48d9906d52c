"""SeqIO tasks for sequential recommendation (Bert4Rec cloze format).

Importing this module registers nothing: `input_pipeline.SequenceData`
registers the task it serves, and `register_builtin_tasks()` registers the
built-in tasks over the data root ($RECSYS_JAX_DATA_DIR, default <repo>/data):
  synthetic_bert4rec       <root>/synthetic
  beauty_bert4rec          <root>/beauty
  movielens100k_bert4rec   <root>/movielens100k
Registration does not read the directories; a missing one fails at
get_dataset time with the command that prepares it. See docs/TASKS.md.
"""

import os
from typing import List, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from recsys_jax.seqio_ext import preprocessors
from recsys_jax.seqio_ext import sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ROOT_ENV = "RECSYS_JAX_DATA_DIR"
DEFAULT_SHUFFLE_BUFFER = 1024


def data_root() -> str:
  """$RECSYS_JAX_DATA_DIR, else <repo>/data."""
  return os.environ.get(DATA_ROOT_ENV) or os.path.join(REPO_ROOT, "data")


class SequenceTask(seqio.Task):
  """A seqio Task whose `get_dataset(seed=None)` uses a registered seed.

  So shuffling and masks are deterministic run to run unless a caller asks
  for another seed. `config` records the registration parameters.
  """

  def __init__(self, *args, default_seed: int = 0,
               config: Optional[Mapping] = None, **kwargs):
    super().__init__(*args, **kwargs)
    self.default_seed = int(default_seed)
    self.config = dict(config or {})

  def get_dataset(self, sequence_length=None, split="train",
                  use_cached=False, shuffle=True,
                  shuffle_buffer_size=None, seed=None, shard_info=None,
                  num_epochs=1, trim_output_features=True,
                  try_in_mem_cache=True) -> tf.data.Dataset:
    if seed is None:
      seed = self.default_seed
    return super().get_dataset(
        sequence_length=sequence_length, split=split, use_cached=use_cached,
        shuffle=shuffle, shuffle_buffer_size=shuffle_buffer_size, seed=seed,
        shard_info=shard_info, num_epochs=num_epochs,
        trim_output_features=trim_output_features,
        try_in_mem_cache=try_in_mem_cache)


def output_features(source: sources.PreparedSequenceSource,
                    max_len: int) -> Mapping[str, seqio.Feature]:
  """Model features (docs/FEATURES.md) as seqio Features, all rank 1."""
  items = sources.ItemVocabulary(source)
  positions = seqio.PassThroughVocabulary(max_len + 1)
  return {
      preprocessors.ITEM_IDS: seqio.Feature(
          items, add_eos=False, dtype=tf.int32, rank=1),
      preprocessors.TARGETS: seqio.Feature(
          items, add_eos=False, dtype=tf.int32, rank=1),
      preprocessors.LOSS_WEIGHTS: seqio.Feature(
          seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.float32,
          rank=1),
      # Only present in packed train data.
      preprocessors.SEGMENT_IDS: seqio.Feature(
          positions, add_eos=False, dtype=tf.int32, rank=1, required=False),
      preprocessors.POSITIONS: seqio.Feature(
          positions, add_eos=False, dtype=tf.int32, rank=1, required=False),
  }


def register_sequence_tasks(
    name: str,
    data_dir: str,
    *,
    max_len: int = 50,
    mask_prob: float = 0.2,
    max_predictions: Optional[int] = None,
    last_item_mask_prob: float = 0.1,
    random_replace: bool = False,
    sliding_window_stride: Optional[int] = None,
    train_prefixes: bool = False,
    seed: int = 0,
    packing: bool = False,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
    prepare_hint: Optional[str] = None,
    cold_items: Sequence[int] = (),
) -> List[str]:
  """Registers (replacing) the Bert4Rec task `name` over `data_dir`.

  Splits: 'train' (masked, windowed/truncated, padded or packed),
  'validation' and 'test' (history + [MASK], target at the mask).

  Args:
    name: task name.
    data_dir: prepared dataset directory (read lazily).
    max_len: row length L, unless get_dataset's
      sequence_length['item_ids'] says otherwise.
    mask_prob: per-item mask probability (train).
    max_predictions: cap of masked positions per row; default
      min(L, ceil(mask_prob * L) + 1), the Bert4Rec wrapper's default.
    last_item_mask_prob: probability a train row masks only its last item.
    random_replace: BERT 80/10/10 replacement (default: always [MASK]).
    sliding_window_stride: cut long train histories into windows.
    train_prefixes: train on every prefix of 2..n items of each history
      (see preprocessors.truncate_or_window).
    seed: default seed of get_dataset(seed=None) (shuffle and masks).
    packing: pack several users per train row (segment_ids, positions).
    shuffle_buffer_size: post-preprocessing shuffle buffer.
    prepare_hint: command printed when data_dir is missing.
    cold_items: item ids removed from every 'train' history before it is
      cut (`preprocessors.remove_train_items`; rows left empty are dropped);
      'validation' and 'test' are unchanged. The cold-item protocol:
      `input_pipeline/cold_items.py` picks them.

  Returns:
    The registered task names.
  """
  if max_predictions is None:
    max_predictions = preprocessors.default_max_predictions(mask_prob, max_len)
  # Batches of examples go through the preprocessors (see preprocessors.py).
  source = sources.PreparedSequenceSource(data_dir, prepare_hint=prepare_hint,
                                          emit_batches=True)
  config = dict(data_dir=data_dir, max_len=max_len, mask_prob=mask_prob,
                max_predictions=max_predictions,
                last_item_mask_prob=last_item_mask_prob,
                random_replace=random_replace,
                sliding_window_stride=sliding_window_stride,
                train_prefixes=train_prefixes, seed=seed, packing=packing,
                num_cold_items=len(cold_items))
  steps = []
  if len(cold_items):
    steps.append(seqio.utils.add_kwargs_to_transform(
        preprocessors.remove_train_items,
        items=tuple(int(i) for i in cold_items)))
  steps += [
      seqio.utils.add_kwargs_to_transform(
          preprocessors.truncate_or_window, max_len=max_len,
          sliding_window_stride=sliding_window_stride,
          train_prefixes=train_prefixes),
      seqio.utils.add_kwargs_to_transform(
          preprocessors.bert4rec_inputs, mask_prob=mask_prob,
          max_predictions=max_predictions,
          last_item_mask_prob=last_item_mask_prob,
          random_replace=random_replace),
      seqio.utils.add_kwargs_to_transform(
          preprocessors.pad_or_pack, max_len=max_len, packing=packing,
          max_predictions=max_predictions),
  ]
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source, output_features=output_features(source, max_len),
      preprocessors=steps, shuffle_buffer_size=shuffle_buffer_size,
      task_cls=SequenceTask, default_seed=seed, config=config)
  return [name]


def _hint(fmt: str, extra: str = "") -> str:
  return (f"python -m recsys_jax.data.prepare --format={fmt} {extra}"
          "--output_dir={data_dir}  (see docs/DATASETS.md)")


BUILTIN = {
    "synthetic_bert4rec": ("synthetic", _hint("synthetic")),
    "beauty_bert4rec": ("beauty", _hint(
        "sequence_file", "--input=../shared/data/amazon_beauty/Beauty.txt "
        "--item_metadata=../shared/data/amazon_beauty/beauty_items.jsonl ")),
    "movielens100k_bert4rec": ("movielens100k", _hint(
        "movielens", "--input=../shared/data/movielens_100k ")),
}


def register_builtin_tasks(root: Optional[str] = None) -> List[str]:
  """Registers the built-in tasks over `root` (default `data_root()`)."""
  root = root or data_root()
  names = []
  for task, (subdir, hint) in BUILTIN.items():
    names += register_sequence_tasks(task, os.path.join(root, subdir),
                                     prepare_hint=hint)
  return names
