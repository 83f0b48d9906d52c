"""Tests of MixtureData: the schedule, exact resume, rates, errors, training.

The schedule is checked against a hand-written inverse-CDF draw; streams of
numpy counting sources check that every step gets the next batch of the
entry it drew; SeqIO tasks on the tiny dataset check that a mixture's
batches are exactly its sources' own streams, interleaved, from any start
step and on any shard; a two-head model routed by `task_index` trains on
in-memory sources through `trainer.train_loop` and resumes bit-identically.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from recsys_jax.input_pipeline import mixture
from recsys_jax.input_pipeline import sequence_data
from recsys_jax.model_lib import base
from tasks import sequence_tasks
from tests import helpers
from tests.helpers import tiny_data  # pylint: disable=unused-import

MAX_LEN = 8
BATCH = 4
VOCAB = 20  # items of the in-memory sources of the training test


@pytest.fixture(autouse=True)
def _restore_seqio_registries():
  """Tests register tasks and mixtures; the registries are process-global."""
  saved = [(r, dict(r._REGISTRY))  # pylint: disable=protected-access
           for r in (seqio.TaskRegistry, seqio.MixtureRegistry)]
  yield
  for registry, entries in saved:
    registry._REGISTRY.clear()  # pylint: disable=protected-access
    registry._REGISTRY.update(entries)  # pylint: disable=protected-access


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for i, (x, y) in enumerate(zip(a, b)):
    assert sorted(x) == sorted(y), i
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=f"batch {i} {k}")


class _CountingSource:
  """Batch j of its stream is `x` = j (all rows), `source` = its id."""

  def __init__(self, name, ident, length=None, rows=None):
    self.name, self.ident, self.length, self.rows = name, ident, length, rows
    self.starts = []

  def train_batches(self, start_step, local_batch_size):
    self.starts.append(start_step)
    rows = self.rows or local_batch_size
    j = start_step
    while self.length is None or j < self.length:
      yield {"x": np.full((rows, 2), j, np.int64),
             "source": np.full((rows,), self.ident, np.int64)}
      j += 1


# -- the schedule --------------------------------------------------------------


def _reference_draw(rates, seed, step):
  """Inverse-CDF draw of one step, written out by hand."""
  block, offset = divmod(step, mixture.SCHEDULE_BLOCK)
  u = np.random.default_rng([seed, block]).random(
      mixture.SCHEDULE_BLOCK)[offset]
  total, acc = float(sum(rates)), 0.0
  last = max(i for i, r in enumerate(rates) if r > 0)
  for i, r in enumerate(rates):
    acc += r / total
    if u < acc or i == last:
      return i
  raise AssertionError("unreachable")


def test_schedule_matches_hand_written_draws():
  rates = [0.0, 2.0, 0.0, 1.0, 5.0, 0.0]
  p = mixture.mixing_probabilities(rates)
  np.testing.assert_allclose(p, np.asarray(rates) / 8.0)
  steps = list(range(0, 50)) + list(range(4090, 4100)) + [12_345]
  got = [int(mixture.task_schedule(p, 7, s, s + 1)[0]) for s in steps]
  assert got == [_reference_draw(rates, 7, s) for s in steps]
  # Another seed gives another schedule.
  assert (mixture.task_schedule(p, 8, 0, 200) !=
          mixture.task_schedule(p, 7, 0, 200)).any()


def test_draws_at_the_ends_of_the_unit_interval():
  below_one = np.nextafter(1.0, 0.0)
  # Ten rates of 0.1 sum to 0.9999999999999999 in floats: the largest
  # uniform must still draw the last positive entry, not a zero-rate one.
  p = mixture.mixing_probabilities([0.1] * 10 + [0.0])
  assert np.cumsum(p)[9] < 1.0
  np.testing.assert_array_equal(
      mixture.draw_entries(p, np.array([0.0, 0.05, 0.55, below_one])),
      [0, 0, 5, 9])
  p = mixture.mixing_probabilities([0.0, 1.0, 0.0])
  np.testing.assert_array_equal(
      mixture.draw_entries(p, np.array([0.0, below_one])), [1, 1])


def test_schedule_from_any_start_and_counts():
  p = mixture.mixing_probabilities([1.0, 3.0, 2.0])
  n = 3 * mixture.SCHEDULE_BLOCK + 17
  full = mixture.task_schedule(p, 3, 0, n)
  assert full.shape == (n,) and full.dtype == np.int32
  for start in (0, 1, 4095, 4096, 4097, 9000, n):
    np.testing.assert_array_equal(mixture.task_schedule(p, 3, start, n),
                                  full[start:])
    np.testing.assert_array_equal(
        mixture.task_counts(p, 3, start),
        np.bincount(full[:start], minlength=3))


def test_rates_are_drawn_proportionally_and_zero_never():
  rates = [3.0, 0.0, 1.0, 4.0]
  p = mixture.mixing_probabilities(rates)
  n = 200_000
  freq = np.bincount(mixture.task_schedule(p, 0, 0, n), minlength=4) / n
  sd = np.sqrt(p * (1 - p) / n)
  assert freq[1] == 0
  np.testing.assert_array_less(np.abs(freq - p), 5 * sd + 1e-12)
  # The same through the stream, on a few hundred steps (seeded: a fixed
  # outcome; 5 standard deviations leave room for any seed).
  sources = [_CountingSource(f"s{i}", i) for i in range(4)]
  data = mixture.MixtureData(list(zip(sources, rates)), seed=11)
  steps = 400
  drawn = np.array([b["task_index"][0] for b in
                    _take(data.train_batches(0, 2), steps)])
  freq = np.bincount(drawn, minlength=4) / steps
  assert freq[1] == 0 and sources[1].starts == []  # never opened
  np.testing.assert_array_less(np.abs(freq - p),
                               5 * np.sqrt(p * (1 - p) / steps) + 1e-12)


# -- streams of counting sources ---------------------------------------------


def test_each_step_gets_the_next_batch_of_the_entry_it_drew():
  sources = [_CountingSource("a", 10), _CountingSource("b", 20),
             _CountingSource("c", 30)]
  data = mixture.MixtureData([(sources[0], 1), (sources[1], 2),
                              (sources[2], 1.5)], seed=5)
  n = 60
  schedule = data.task_schedule(0, n)
  batches = _take(data.train_batches(0, 3), n)
  for s, (t, batch) in enumerate(zip(schedule, batches)):
    assert sorted(batch) == ["source", "task_index", "x"]
    np.testing.assert_array_equal(batch["task_index"], np.full(3, t))
    assert batch["task_index"].dtype == np.int32
    assert (batch["source"] == sources[t].ident).all()
    # Position in the entry's own stream: the steps before s that drew t.
    assert (batch["x"] == np.sum(schedule[:s] == t)).all(), s


@pytest.mark.parametrize("start", [1, 7, 33, mixture.SCHEDULE_BLOCK + 3])
def test_resume_equals_uninterrupted_stream(start):
  def make():
    return mixture.MixtureData([(_CountingSource("a", 1), 1),
                                (_CountingSource("b", 2), 1),
                                (_CountingSource("c", 3), 0.5)], seed=2)
  uninterrupted = make().train_batches(0, 2)
  expected = _take(itertools.islice(uninterrupted, start, None), 20)
  resumed = make()
  _assert_batches_equal(_take(resumed.train_batches(start, 2), 20), expected)
  counts = mixture.task_counts(resumed.probabilities, 2, start)
  # Each source was asked to start where the uninterrupted run left it.
  for t, source in enumerate(resumed.sources):
    assert source.starts in ([counts[t]], []), (t, source.starts)


# -- SeqIO tasks ---------------------------------------------------------------


def _sequence_data(name, data_dir, **kwargs):
  kwargs.setdefault("max_len", MAX_LEN)
  return sequence_data.SequenceData(name, data_dir, **kwargs)


def _interleaved_reference(data, source_streams, n):
  """The first n mixture batches built from each source's own stream."""
  out = []
  for t in data.task_schedule(0, n):
    batch = dict(next(source_streams[t]))
    batch["task_index"] = np.full((BATCH,), t, np.int32)
    out.append(batch)
  return out


def test_seqio_mixture_batches_are_the_sources_streams(tiny_data):
  cloze = _sequence_data("mix_cloze", tiny_data, mask_prob=0.3)
  next_item = _sequence_data("mix_next_item", tiny_data,
                             last_item_mask_prob=1.0, seed=1)
  entries = [(cloze, 2.0), (next_item, 1.0)]
  data = mixture.MixtureData(entries, seed=4)
  assert data.task_names == ["mix_cloze", "mix_next_item"]
  n, start = 12, 5
  schedule = data.task_schedule(0, n)
  assert set(schedule[:start]) == set(schedule[start:]) == {0, 1}
  batches = _take(data.train_batches(0, BATCH), n)
  for batch, t in zip(batches, schedule):
    assert set(batch) == {"item_ids", "targets", "loss_weights",
                          "task_index"}
    assert batch["item_ids"].shape == (BATCH, MAX_LEN)
    if t == 1:  # the next-item task masks one position per row
      np.testing.assert_array_equal(batch["loss_weights"].sum(1),
                                    np.ones(BATCH))
  # Reference: each source's standalone stream, interleaved by the schedule.
  own = [s.train_batches(0, BATCH) for s in data.sources]
  _assert_batches_equal(batches, _interleaved_reference(data, own, n))
  # Resume: a fresh mixture started at `start` gives the same batches.
  resumed = mixture.MixtureData(entries, seed=4)
  _assert_batches_equal(_take(resumed.train_batches(start, BATCH), n - start),
                        batches[start:])


def test_registered_seqio_mixture_as_entries(tiny_data):
  for name, prob in (("mixreg_b", 0.5), ("mixreg_a", 0.1)):
    sequence_tasks.register_sequence_tasks(name, tiny_data, max_len=MAX_LEN,
                                           mask_prob=prob)
  seqio.MixtureRegistry.add("mixreg", [("mixreg_b", 3.0), ("mixreg_a", 1.0)])
  data = mixture.MixtureData("mixreg", seed=1, eval_entry=None)
  # seqio orders a mixture's tasks by name; rates follow them.
  assert data.name == "mixreg"
  assert data.task_names == ["mixreg_a", "mixreg_b"]
  np.testing.assert_allclose(data.probabilities, [0.25, 0.75])
  batches = _take(data.train_batches(0, BATCH), 6)
  np.testing.assert_array_equal([b["task_index"][0] for b in batches],
                                data.task_schedule(0, 6))
  with pytest.raises(ValueError, match="no registered seqio.Mixture 'nope'"):
    mixture.MixtureData("nope")
  with pytest.raises(ValueError, match="'mixreg' is a seqio.Mixture"):
    mixture.MixtureData([("mixreg", 1.0)])


def test_task_streams_shard_and_hosts_draw_the_same_task(tiny_data):
  # Two hosts: entry 0 a registered task read through TaskStream on the
  # host's shard, entry 1 a counting source.
  sequence_tasks.register_sequence_tasks("mix_shard", tiny_data,
                                         max_len=MAX_LEN, mask_prob=0.5)
  n = 10
  per_host = []
  for index in range(2):
    shard = seqio.ShardInfo(index=index, num_shards=2)
    stream = mixture.TaskStream("mix_shard", shard_info=shard)
    assert stream.data_dir == tiny_data and stream.seed == 0
    data = mixture.MixtureData([(stream, 1.0),
                                (_CountingSource("count", 7), 1.0)], seed=9)
    assert set(data.task_schedule(0, n)) == {0, 1}
    batches = _take(data.train_batches(0, BATCH), n)
    # The host's rows are its shard's own streams, interleaved.
    own = [mixture.TaskStream("mix_shard", shard_info=shard).train_batches(
        0, BATCH), _CountingSource("count", 7).train_batches(0, BATCH)]
    _assert_batches_equal(batches, _interleaved_reference(data, own, n))
    per_host.append(batches)
  for a, b in zip(*per_host):
    np.testing.assert_array_equal(a["task_index"], b["task_index"])
  # The two hosts read different users.
  assert any((a["item_ids"] != b["item_ids"]).any()
             for a, b in zip(*per_host) if a["task_index"][0] == 0)


def test_evaluation_is_the_eval_entry_s(tiny_data):
  cloze = _sequence_data("mix_eval_a", tiny_data)
  other = _sequence_data("mix_eval_b", tiny_data, last_item_mask_prob=1.0)
  data = mixture.MixtureData([(cloze, 1.0), (other, 1.0)], eval_entry=1)
  assert data.data_dir == tiny_data and data.num_items == 150
  assert data.eval_data is other
  np.testing.assert_array_equal(data.train_item_counts(),
                                other.train_item_counts())
  got = list(data.eval_batches("validation", 64))
  want = list(other.eval_batches("validation", 64))
  assert len(got) == len(want) == 4  # 200 users, padded
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["task_index"], np.ones(64, np.int32))
    g = {k: v for k, v in g.items() if k != "task_index"}
    _assert_batches_equal([g], [w])


# -- errors ----------------------------------------------------------------


@pytest.mark.parametrize("rates, match", [
    ([1.0, -1.0], r"rate of entry 1 \('b'\): -1.0; expected a finite number "
     r">= 0"),
    ([1.0, float("nan")], r"entry 1 \('b'\): nan"),
    ([float("inf"), 1.0], r"entry 0 \('a'\): inf"),
    ([True, 1.0], r"entry 0 \('a'\): True"),
    (["1", 1.0], r"entry 0 \('a'\): '1'"),
    ([0, 0.0], r"are all 0; at least one entry needs a rate > 0"),
])
def test_bad_rates(rates, match):
  with pytest.raises(ValueError, match=match):
    mixture.MixtureData([(_CountingSource("a", 0), rates[0]),
                         (_CountingSource("b", 1), rates[1])])


def test_bad_entries_and_settings(tiny_data):
  src = _CountingSource("a", 0)
  with pytest.raises(ValueError, match="at least one"):
    mixture.MixtureData([])
  with pytest.raises(TypeError, match=r"entry 0: .*expected a \(source, "
                     "rate\\) pair"):
    mixture.MixtureData([src])
  with pytest.raises(TypeError, match="train_batches"):
    mixture.MixtureData([(object(), 1.0)])
  with pytest.raises(ValueError, match="no registered SeqIO task 'nope'"):
    mixture.MixtureData([("nope", 1.0)])
  with pytest.raises(ValueError, match="eval_entry=2"):
    mixture.MixtureData([(src, 1.0), (_CountingSource("b", 1), 1.0)],
                        eval_entry=2)
  with pytest.raises(ValueError, match="seed=-1"):
    mixture.MixtureData([(src, 1.0)], seed=-1)
  with pytest.raises(ValueError, match="start_step=-1"):
    mixture.MixtureData([(src, 1.0)]).train_batches(-1, 2)
  # Two SequenceData of one name: the second replaced the first's task.
  a = _sequence_data("mix_dup", tiny_data)
  b = _sequence_data("mix_dup", tiny_data, mask_prob=0.5)
  with pytest.raises(ValueError, match=r"entries 0 and 1 are both task "
                     "'mix_dup'"):
    mixture.MixtureData([(a, 1.0), (b, 1.0)])


def test_bad_streams_and_evaluation(tiny_data):
  short = mixture.MixtureData([(_CountingSource("short", 0, length=3), 1.0)])
  with pytest.raises(RuntimeError, match=r"entry 0 \('short'\) ended after "
                     "its batch 3; mixture sources must be endless"):
    _take(short.train_batches(0, 2), 5)
  rows = mixture.MixtureData([(_CountingSource("rows", 0, rows=3), 1.0)])
  with pytest.raises(ValueError, match="gave 3 rows; expected the "
                     "per-process batch 2"):
    next(rows.train_batches(0, 2))

  class _HasTaskIndex(_CountingSource):

    def train_batches(self, start_step, local_batch_size):
      for b in super().train_batches(start_step, local_batch_size):
        yield dict(b, task_index=np.zeros(local_batch_size, np.int32))

  clash = mixture.MixtureData([(_HasTaskIndex("clash", 0), 1.0)])
  with pytest.raises(ValueError, match="already has a 'task_index'"):
    next(clash.train_batches(0, 2))
  no_eval = mixture.MixtureData([(_CountingSource("a", 0), 1.0)],
                                eval_entry=None)
  with pytest.raises(ValueError, match="has no evaluation: set "
                     "MixtureData.eval_entry"):
    no_eval.eval_batches("test", 8)
  sequence_tasks.register_sequence_tasks("mix_no_eval", tiny_data,
                                         max_len=MAX_LEN)
  bare = mixture.MixtureData([("mix_no_eval", 1.0)])
  with pytest.raises(AttributeError, match=r"eval_entry 0 \('mix_no_eval', "
                     "a TaskStream\\) has no 'eval_batches'"):
    bare.eval_batches("test", 8)


# -- training: two heads routed by task_index --------------------------------


class _RandomClozeSource:
  """Batch j: random items with a few masked positions, from seed (s, j)."""

  def __init__(self, name, seed, vocab):
    self.name, self.seed, self.vocab = name, seed, vocab

  def train_batches(self, start_step, local_batch_size):
    for j in itertools.count(start_step):
      g = np.random.default_rng([self.seed, j])
      targets = g.integers(1, self.vocab, (local_batch_size, MAX_LEN))
      weights = (g.random((local_batch_size, MAX_LEN)) < 0.3).astype(
          np.float32)
      items = np.where(weights > 0, self.vocab - 1, targets)
      yield {"item_ids": items.astype(np.int32),
             "targets": (targets * weights).astype(np.int32),
             "loss_weights": weights}


class _TwoHeadModel(base.BaseModel):
  """Item embeddings shared by two output heads; rows use their task's head.

  Heads start at zero, so a head that no row was routed to stays exactly
  zero (Adam's update and weight decay of zero are zero).
  """

  def __init__(self, vocab):
    self.vocab = vocab

  def get_initial_variables(self, rng, batch_size=2):
    del batch_size
    return {"params": {
        "embed": jax.random.normal(rng, (self.vocab, 8)) * 0.1,
        "heads": jnp.zeros((2, 8, self.vocab))}}

  def loss_fn(self, params, batch, rng):
    del rng
    h = params["embed"][batch["item_ids"]]                        # [B, L, d]
    head = params["heads"][batch["task_index"]]                   # [B, d, V]
    logits = jnp.einsum("bld,bdv->blv", h, head)
    targets = batch["targets"].astype(jnp.int32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits),
                              targets[..., None], -1)[..., 0]     # [B, L]
    w = batch["loss_weights"].astype(jnp.float32)
    loss_sum = jnp.sum(ce * w)
    weight_sum = jnp.sum(w)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * w)
    return loss_sum / jnp.maximum(weight_sum, 1.0), {
        "loss_sum": loss_sum, "weight_sum": weight_sum,
        "correct_sum": correct}

  def metric_sums(self):
    return ("loss_sum", "weight_sum", "correct_sum")


def _train(model_dir, data, steps, starts=None):
  mesh = partitioning.make_mesh(1, devices=jax.devices()[:1])
  cfg = trainer.TrainLoopConfig(train_steps=steps, batch_size=BATCH,
                                log_every=1, checkpoint_every=100,
                                keep_checkpoints=None)
  opt = trainer.OptimizerConfig(learning_rate=0.05, warmup_steps=0,
                                decay="constant")

  def batches(start):
    if starts is not None:
      starts.append(start)
    return data.train_batches(start, BATCH)

  return trainer.train_loop(_TwoHeadModel(VOCAB), opt, batches,
                            cfg, model_dir=str(model_dir), mesh=mesh,
                            rules=partitioning.get_rules("data_parallel"))


def test_heads_routed_by_task_index_train_and_resume(tmp_path):
  data = mixture.MixtureData(
      [(_RandomClozeSource("a", 0, VOCAB), 3.0),
       (_RandomClozeSource("b", 1, VOCAB), 1.0)], seed=0, eval_entry=None)
  schedule = data.task_schedule(0, 50)
  first_b = int(np.argmax(schedule == 1))
  assert schedule[first_b] == 1 and first_b >= 1
  total = first_b + 3

  # Until task 1 is first drawn only head 0 learns.
  state = _train(tmp_path / "resumed", data, first_b)
  heads = np.asarray(state.params["heads"])
  assert np.abs(heads[0]).sum() > 0
  np.testing.assert_array_equal(heads[1], 0.0)
  assert helpers.checkpoint_steps(tmp_path / "resumed") == [first_b]

  # Resumed: the stream restarts at the checkpoint's step; head 1 learns.
  starts = []
  state = _train(tmp_path / "resumed", data, total, starts)
  assert starts == [first_b]
  assert np.abs(np.asarray(state.params["heads"][1])).sum() > 0

  # Equal to the uninterrupted run, bit for bit.
  _train(tmp_path / "uninterrupted", data, total)
  helpers.assert_trees_equal(
      helpers.restore_state(tmp_path / "resumed", total),
      helpers.restore_state(tmp_path / "uninterrupted", total),
      f"checkpoint_{total}")
