"""A run's narrative data: a REGEN narrative task -> host-local T5 batches.

`NarrativeData` is a `TextData` (same runs interface: `train_batches`,
`eval_batches`, `num_examples`, `vocabulary`) serving
`tasks/narrative_tasks.py`'s task of one narrative field. Its batches hold
the encoder-decoder features of `TextData`, `[B, L]` / `[B, T]`, plus the
user's history for the soft tokens:

  history_items  int32 [B, max_history]  item ids 1..N, oldest first,
                                         0-padded at the end
  next_item      int32 [B, 1]            the item the narrative is about
                                         (0 unless history mode
                                         'before_last_with_next')

Evaluation batches add `valid` `[B]`, `inputs_pretokenized`,
`targets_pretokenized` and `user_id` (bytes objects).

`NarrativeCorpusData` serves the span-corruption task over the narratives
of the narrative tasks' training users
(`narrative_tasks.register_narrative_span_corruption`), for pretraining a T5
on the dataset's own language: plain encoder-decoder batches (no history),
evaluation batches with `user_id` and `field` (no `targets_pretokenized`:
the references are the corrupted target tokens).
"""

from typing import Dict, Optional, Sequence

from recsys_jax.input_pipeline import text_data
from tasks import narrative_tasks
from tasks import text_tasks


class NarrativeData(text_data.TextData):
  """Registers the narrative task of `field` and serves it as batches.

  Args:
    name: prefix of the registered task name
      (`narrative_tasks.task_name(name, field)`).
    data_dir: prepared dataset with narratives and a SentencePiece model.
    field: narrative field, e.g. 'user_summary', 'purchase_reason',
      'endorsement' (synthetic) or 'long_summary' (REGEN); or a per-item
      field ('review_text' or 'per_item/review_text', REGEN): the text of
      the user's last item (`narrative_tasks.resolve_field`).
    max_history: history items per row (`history_items` width).
    history: 'all', 'before_last', 'before_last_with_next'; None: the
      field's default (`narrative_tasks.DEFAULT_HISTORY`; a per-item
      field: 'before_last_with_next').
    max_input_len, max_target_len: encoder / decoder lengths (EOS included).
    extra_ids: sentinel ids of the vocabulary (as the model's builder).
    seed: the user split's, the history shuffle's and the train stream's.
    validation_fraction, test_fraction: users held out per split.
    titles_in_input: `inputs` also lists the history titles.
    shuffle_histories: every user reads another user's history (the
      generic-narrative control).
    host_input, eval_cache_bytes: as `TextData`.
    vocab_path, prepare_hint: as `narrative_tasks.register_narrative_task`.
  """

  text_features = text_data.TEXT_FEATURES + (narrative_tasks.USER_ID,)

  def __init__(self, name: str, data_dir: str, *, field: str,
               max_history: int = 20, history: Optional[str] = None,
               max_input_len: int = 32, max_target_len: int = 64,
               extra_ids: int = text_tasks.DEFAULT_EXTRA_IDS, seed: int = 0,
               validation_fraction: float = 0.1, test_fraction: float = 0.1,
               titles_in_input: bool = False,
               shuffle_histories: bool = False,
               host_input: str = "shard", eval_cache_bytes: int = 1 << 30,
               vocab_path: Optional[str] = None,
               prepare_hint: Optional[str] = None):
    self.field = field
    self.max_history = int(max_history)
    self.history_mode = narrative_tasks.field_history_mode(
        data_dir, field, history)
    self.titles_in_input = bool(titles_in_input)
    self.shuffle_histories = bool(shuffle_histories)
    super().__init__(
        name, data_dir, task=narrative_tasks.field_slug(field),
        max_input_len=max_input_len, max_target_len=max_target_len,
        extra_ids=extra_ids, seed=seed, host_input=host_input,
        eval_cache_bytes=eval_cache_bytes,
        validation_fraction=validation_fraction,
        test_fraction=test_fraction, vocab_path=vocab_path,
        prepare_hint=prepare_hint)

  def _register(self, **task_options) -> str:
    return narrative_tasks.register_narrative_task(
        self.name, self.data_dir, field=self.field,
        max_history=self.max_history, history=self.history_mode,
        seed=self.seed, max_input_len=self.max_input_len,
        max_target_len=self.max_target_len, extra_ids=self.extra_ids,
        titles_in_input=self.titles_in_input,
        shuffle_histories=self.shuffle_histories, **task_options)

  def passthrough_lengths(self) -> Dict[str, int]:
    return {narrative_tasks.HISTORY_ITEMS: self.max_history,
            narrative_tasks.NEXT_ITEM: 1}

  @property
  def source(self) -> narrative_tasks.NarrativeSource:
    """The task's source (`stats(split)`: examples and skipped users)."""
    return self._converted.task.source


class NarrativeCorpusData(text_data.TextData):
  """Registers the narrative span-corruption task and serves it as batches.

  Give it the narrative tasks' `seed`, `validation_fraction` and
  `test_fraction` (gin/datasets/synthetic_narratives.gin's), so its train
  split holds only their training users' narratives.

  Args:
    name: prefix of the registered task name
      (`narrative_tasks.span_corruption_task_name(name)`).
    data_dir: prepared dataset with narratives and a SentencePiece model.
    fields: narrative fields; None: all of the dataset's.
    max_input_len, max_target_len: encoder / decoder lengths (EOS included).
    extra_ids: sentinel ids of the vocabulary (as the model's builder).
    seed: the user split's, the corruption's and the train stream's.
    validation_fraction, test_fraction: users held out per split.
    noise_density, mean_noise_span_length, span_max_tokens: span corruption
      (`register_narrative_span_corruption`).
    host_input, eval_cache_bytes: as `TextData`.
    vocab_path, prepare_hint: as `register_narrative_span_corruption`.
  """

  text_features = (narrative_tasks.USER_ID, narrative_tasks.FIELD)

  def __init__(self, name: str, data_dir: str, *,
               fields: Optional[Sequence[str]] = None,
               max_input_len: int = 64, max_target_len: int = 32,
               extra_ids: int = text_tasks.DEFAULT_EXTRA_IDS, seed: int = 0,
               validation_fraction: float = 0.1, test_fraction: float = 0.1,
               noise_density: float = 0.15,
               mean_noise_span_length: float = 3.0,
               span_max_tokens: Optional[int] = None,
               host_input: str = "shard", eval_cache_bytes: int = 1 << 30,
               vocab_path: Optional[str] = None,
               prepare_hint: Optional[str] = None):
    self.fields = tuple(fields) if fields is not None else None
    super().__init__(
        name, data_dir, task=narrative_tasks.SPAN_CORRUPTION,
        max_input_len=max_input_len, max_target_len=max_target_len,
        extra_ids=extra_ids, seed=seed, host_input=host_input,
        eval_cache_bytes=eval_cache_bytes,
        validation_fraction=validation_fraction,
        test_fraction=test_fraction, noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
        span_max_tokens=span_max_tokens, vocab_path=vocab_path,
        prepare_hint=prepare_hint)

  def _register(self, **task_options) -> str:
    return narrative_tasks.register_narrative_span_corruption(
        self.name, self.data_dir, fields=self.fields, seed=self.seed,
        max_input_len=self.max_input_len, max_target_len=self.max_target_len,
        extra_ids=self.extra_ids, **task_options)

  @property
  def source(self) -> narrative_tasks.NarrativeCorpusSource:
    """The task's source (`stats(split)`, `columns(split)`)."""
    return self._converted.task.source
