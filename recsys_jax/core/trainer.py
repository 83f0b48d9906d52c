"""The training loop: sharded state, a pure jitted train step, checkpoints.

The trainer knows nothing about a model's loss or metrics: it calls the
wrapper's (model_lib.base.BaseModel) `get_initial_variables` and
`loss_fn(params, batch, rng) -> (loss, aux)`, adds up the sums the model
declares (`metric_sums()`: `loss_sum`, `weight_sum`, ...) over micro-batches,
shards and log windows, and prints and logs what `summarize_metrics` makes
of them. The optimizer (with frozen parameters) is core/optimizer.py;
initialising from another run is core/init_from.py.
"""

import dataclasses
import logging
import math
import signal
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from recsys_jax.core import checkpoints
from recsys_jax.core import distributed
from recsys_jax.core import init_from as init_from_lib
from recsys_jax.core import optimizer as optimizer_lib
from recsys_jax.core import partitioning
from recsys_jax.model_lib import base

# The optimizer's names where gin files and callers have always found them
# (`trainer.OptimizerConfig` in gin/runs/train.gin and experiment files).
OptimizerConfig = optimizer_lib.OptimizerConfig
make_optimizer = optimizer_lib.make_optimizer


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/inf; the run stops without checkpointing it."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def init_state(model, tx, rng, mesh, rules, init_batch_size: int = 2):
  """Builds the sharded TrainState: eval_shape -> shardings -> jit(init).

  Returns:
    (state with plain arrays, state shardings, abstract state for restore).
  """
  def init_fn(rng):
    variables = model.get_initial_variables(rng, init_batch_size)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params))

  with partitioning.with_rules(rules, mesh):
    abstract_boxed = jax.eval_shape(init_fn, rng)
    shardings = partitioning.abstract_shardings(abstract_boxed, mesh, rules)
    state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)),
                    out_shardings=shardings)(rng)
  abstract = checkpoints.abstract_with_shardings(
      nn.meta.unbox(abstract_boxed), shardings)
  return state, shardings, abstract


def _check_num_microbatches(num_microbatches,
                            name: str = "num_microbatches") -> int:
  if (isinstance(num_microbatches, bool) or
      not isinstance(num_microbatches, (int, np.integer)) or
      num_microbatches < 1):
    raise ValueError(f"{name}={num_microbatches!r}: expected an "
                     "integer >= 1 (1: no gradient accumulation)")
  return int(num_microbatches)


def microbatch(batch, index, num_microbatches: int):
  """Micro-batch `index` of `num_microbatches`: rows index, index + n, ...

  Each array `[B, ...]` is reshaped to `[B // n, n, ...]` and index `index`
  of axis 1 taken (`index` may be traced). The split is strided rather than
  contiguous so that, when n divides the rows each device holds of a
  data-sharded batch (B / data-axis size), every micro-batch takes its rows
  from every device in place: device d's rows [d*B/D, (d+1)*B/D) are rows
  [d*B/(D*n), (d+1)*B/(D*n)) of the `[B // n, n, ...]` view, so the view's
  axis 0 keeps the batch's sharding and no rows move between devices.
  """
  n = num_microbatches

  def take(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:])
    return jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False)

  return jax.tree.map(take, batch)


def make_train_step(model, tx, schedule, num_microbatches: int = 1, *,
                    local_accumulation: bool = False,
                    mesh=None, frozen: Sequence[str] = ()) -> Callable:
  """The pure step `(state, batch, rng) -> (state, metrics)`.

  The metrics are `loss`, each of `model.metric_sums()` (summed over the
  batch), `grad_norm` and `learning_rate`.

  `frozen` (regular expressions over '/'-joined parameter paths, as
  `OptimizerConfig.frozen`): the loss is differentiated with respect to the
  other parameters only, so no gradient of a frozen one is computed (nor
  accumulated, nor all-reduced), and frozen leaves come out of the step
  bit-identical whatever `tx` does (make_optimizer gives them no state).

  `num_microbatches` = n > 1 accumulates gradients (as t5x does): the global
  batch is split into n strided micro-batches (`microbatch`: rows i::n), run
  one after another in a `lax.scan`, each with dropout rng
  `fold_in(step_rng, i)`. Per micro-batch the gradient of the unnormalised
  `loss_sum` is added to a float32 sum, with the model's metric sums
  (`model.metric_sums()`); the update uses grad_sum / max(weight_sum, 1)
  over the whole batch, so it is the full-batch update (up to float
  rounding) whenever the loss is a per-position sum over the rows: without
  dropout, for loss='full' (a sampled loss draws other negatives per
  micro-batch; the in-batch loss sees only its micro-batch's targets).
  Peak activation memory is about that of a batch of B / n rows. The global
  batch size B must be divisible by n (ValueError at trace time otherwise).

  `local_accumulation=True` (pure data parallelism over `mesh`, whose
  `model` axis must be 1) computes the same sums inside a `jax.shard_map`
  over the `data` axis: each shard runs its own B / D rows (as n
  micro-batches of B / (D n) rows, so D n must divide B) without any
  collective, and the shards' gradient sums and metric sums are all-reduced
  once per step as one flat float32 buffer. The default (SPMD `jit`) leaves
  the reduction to XLA, which all-reduces every parameter's gradient inside
  every micro-batch: n x (number of parameter arrays) collectives a step,
  negligible on a TPU's interconnect but not over a host network (on one
  machine's loopback with gloo, ~3 ms each: benchmarks/README.md). The update
  is the same up to float rounding without dropout; with dropout, shard d
  draws its masks from `fold_in(step_rng, d)` (other masks than the default
  path's, equally random). Parameters enter replicated (rules that shard
  them would gather them for the step).
  """
  num_microbatches = _check_num_microbatches(num_microbatches)
  sum_keys = base.check_metric_sums(model)
  frozen = tuple(frozen)
  apply_gradients = _update_fn(tx, schedule, sum_keys)
  if local_accumulation:
    return _local_accumulation_step(model, num_microbatches, mesh,
                                    apply_gradients, sum_keys, frozen)
  if num_microbatches == 1:
    def train_step(state: TrainState, batch, rng):
      step_rng = jax.random.fold_in(rng, state.step)
      partition = optimizer_lib.ParamPartition(state.params, frozen)
      trainable, frozen_leaves = partition.split(state.params)

      def loss_fn(trainable, batch, rng):
        return model.loss_fn(partition.merge(trainable, frozen_leaves),
                             batch, rng)
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      (loss, aux), grads = grad_fn(trainable, batch, step_rng)
      return apply_gradients(state, partition, grads, loss, aux)

    return train_step

  n = num_microbatches

  def accumulating_train_step(state: TrainState, batch, rng):
    step_rng = jax.random.fold_in(rng, state.step)
    _check_batch_rows(batch, n, f"num_microbatches={n} must divide the "
                      "global batch size")
    partition = optimizer_lib.ParamPartition(state.params, frozen)
    trainable, frozen_leaves = partition.split(state.params)
    grad_fn = _loss_sum_grad_fn(model, partition, frozen_leaves)
    grad_sum, sums = _accumulate(grad_fn, trainable, batch, step_rng, n,
                                 sum_keys)
    return _apply_sums(apply_gradients, state, partition, trainable,
                       grad_sum, sums)

  return accumulating_train_step


def _check_batch_rows(batch, multiple: int, requirement: str) -> None:
  """ValueError `requirement` naming the first batch array whose rows are
  not a multiple of `multiple` (shapes are static: checked at trace time)."""
  for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
    if x.shape[0] % multiple:
      raise ValueError(f"{requirement}; batch{jax.tree_util.keystr(path)} "
                       f"has {x.shape[0]} rows")


def _check_aux(aux, sum_keys) -> None:
  """ValueError (at trace time) unless `aux` holds every declared sum."""
  missing = [k for k in sum_keys if k not in aux]
  if missing:
    raise ValueError(f"the model's loss_fn aux {sorted(aux)} lacks "
                     f"{missing}, declared by its metric_sums()")


def _update_fn(tx, schedule, sum_keys) -> Callable:
  """`(state, partition, grads, loss, aux) -> (state, metrics)`: one update
  from the gradients of `partition.split(state.params)[0]`."""

  def apply_gradients(state, partition, grads, loss, aux):
    _check_aux(aux, sum_keys)
    grads = partition.full_grads(grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = partition.keep_frozen(
        optax.apply_updates(state.params, updates), state.params)
    metrics = {"loss": loss, **{k: aux[k] for k in sum_keys},
               "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state)
    return new_state, metrics

  return apply_gradients


def _loss_sum_grad_fn(model, partition, frozen_leaves) -> Callable:
  """`(trainable, batch, rng) -> (grads of loss_sum, aux)`."""

  def loss_sum_fn(trainable, batch, dropout_rng):
    params = partition.merge(trainable, frozen_leaves)
    _, aux = model.loss_fn(params, batch, dropout_rng)
    return aux[base.LOSS_SUM], aux

  return jax.grad(loss_sum_fn, has_aux=True)


def _accumulate(grad_fn, params, batch, step_rng, n: int, sum_keys):
  """Float32 sums of the gradients (of `params`, the trainable leaves) and
  of the metric sums `sum_keys` over n micro-batches (`microbatch(batch, i,
  n)` with dropout rng `fold_in(step_rng, i)`), run one after another in a
  `lax.scan`."""

  def body(carry, i):
    grad_sum, sums = carry
    grads, aux = grad_fn(params, microbatch(batch, i, n),
                         jax.random.fold_in(step_rng, i))
    _check_aux(aux, sum_keys)
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32),
                            grad_sum, grads)
    sums = {k: sums[k] + aux[k].astype(jnp.float32) for k in sum_keys}
    return (grad_sum, sums), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = (zeros, {k: jnp.zeros((), jnp.float32) for k in sum_keys})
  (grad_sum, sums), _ = jax.lax.scan(body, init, jnp.arange(n))
  return grad_sum, sums


def _apply_sums(apply_gradients, state, partition, trainable, grad_sum,
                sums):
  """The update from summed gradients: grad_sum / max(weight_sum, 1)."""
  denom = jnp.maximum(sums[base.WEIGHT_SUM], 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum,
                       trainable)
  return apply_gradients(state, partition, grads,
                         sums[base.LOSS_SUM] / denom, sums)


def _local_accumulation_step(model, n: int, mesh, apply_gradients, sum_keys,
                             frozen) -> Callable:
  """The train step of `make_train_step(..., local_accumulation=True)`."""
  if mesh is None:
    raise ValueError("make_train_step(local_accumulation=True) needs the "
                     "mesh (mesh=...)")
  axes = dict(mesh.shape)
  if int(axes.get(partitioning.MODEL_AXIS, 1)) != 1:
    raise ValueError(
        f"local gradient accumulation is data parallelism only; the mesh "
        f"{axes} has a model axis of {axes[partitioning.MODEL_AXIS]} (set "
        "TrainLoopConfig.local_accumulation=False for tensor or vocab "
        "parallelism)")
  shards = int(axes.get(partitioning.DATA_AXIS, 1))
  spec = jax.sharding.PartitionSpec
  data_axis = partitioning.DATA_AXIS

  def local_accumulation_train_step(state: TrainState, batch, rng):
    _check_batch_rows(
        batch, shards * n,
        f"local gradient accumulation runs num_microbatches={n} "
        f"micro-batches on each of {shards} data shards, so {shards * n} "
        "must divide the global batch size")
    step_rng = jax.random.fold_in(rng, state.step)
    partition = optimizer_lib.ParamPartition(state.params, frozen)
    trainable, frozen_leaves = partition.split(state.params)

    def shard_sums(trainable, frozen_leaves, batch, step_rng):
      rng = jax.random.fold_in(step_rng, jax.lax.axis_index(data_axis))
      grad_fn = _loss_sum_grad_fn(model, partition, frozen_leaves)
      # Inside the shard nothing is partitioned: logical constraints are off.
      with nn.logical_axis_rules(()):
        grad_sum, sums = _accumulate(grad_fn, trainable, batch, rng, n,
                                     sum_keys)
      # One all-reduce a step: every trainable gradient and metric sum in
      # one buffer.
      flat, unravel = jax.flatten_util.ravel_pytree((grad_sum, sums))
      return unravel(jax.lax.psum(flat, data_axis))

    sharded_sums = jax.shard_map(
        shard_sums, mesh=mesh,
        in_specs=(spec(), spec(), spec(data_axis), spec()),
        out_specs=spec(), check_vma=False)
    grad_sum, sums = sharded_sums(trainable, frozen_leaves, batch, step_rng)
    return _apply_sums(apply_gradients, state, partition, trainable,
                       grad_sum, sums)

  return local_accumulation_train_step


def jit_train_step(train_step, state_shardings, mesh):
  batch_sh = partitioning.batch_sharding(mesh)
  rep = partitioning.replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(state_shardings, batch_sh, rep),
                 out_shardings=(state_shardings, rep),
                 donate_argnums=0)


def _any_process(flag: bool) -> bool:
  """True on every process iff `flag` is True on at least one.

  SIGTERM reaches hosts at different steps; all must agree on the step at
  which they save (a collective) and stop.
  """
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
  return bool(np.any(flags))


class _MetricWindow:
  """Accumulates step metrics between two log points.

  The model's metric sums add up over the window's steps and the model
  summarizes them; the trainer's own metrics are the mean gradient norm and
  the last learning rate.
  """

  def __init__(self, model, sum_keys: Sequence[str]):
    self.model = model
    self.sums: Dict[str, float] = {k: 0.0 for k in sum_keys}
    self.grad_norm_sum = 0.0
    self.last: Dict[str, float] = {}
    self.steps = 0

  def add(self, m: Dict[str, Any]):
    m = jax.device_get(m)
    for k in self.sums:
      self.sums[k] += float(m[k])
    self.grad_norm_sum += float(m["grad_norm"])
    self.last = {k: float(v) for k, v in m.items()}
    self.steps += 1

  def summary(self) -> Dict[str, float]:
    """The model's summary of the sums, then grad_norm and learning_rate."""
    out = {k: float(v) for k, v in
           self.model.summarize_metrics(dict(self.sums)).items()}
    out["grad_norm"] = self.grad_norm_sum / max(self.steps, 1)
    out["learning_rate"] = self.last["learning_rate"]
    return out


# What the trainer adds to the model's summary (logged as train/<name>).
_LOOP_METRICS = ("grad_norm", "learning_rate", "steps_per_sec",
                 "sequences_per_sec")


def progress_line(step: int, total: int, summary: Dict[str, float],
                  eta_s: float) -> str:
  """`step 10/40 | loss 6.5700 | masked_accuracy 0.0187 | grad_norm 1.234 |
  lr 1.00e-03 | 2.00 steps/s | 32 seq/s | ETA 0m15s`: the model's metrics
  as it named them, then the loop's (`_LOOP_METRICS`)."""
  parts = [f"step {step}/{total}"]
  parts += [f"{k} {v:.4f}" for k, v in summary.items()
            if k not in _LOOP_METRICS]
  parts += [f"grad_norm {summary['grad_norm']:.3f}",
            f"lr {summary['learning_rate']:.2e}",
            f"{summary['steps_per_sec']:.2f} steps/s",
            f"{summary['sequences_per_sec']:.0f} seq/s",
            f"ETA {_fmt_eta(eta_s)}"]
  return " | ".join(parts)


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclasses.dataclass
class TrainLoopConfig:
  """Loop settings (gin: gin/runs/train.gin).

  num_microbatches: gradient accumulation. n > 1 runs each step's global
    batch (`batch_size` rows) as n micro-batches of batch_size / n rows
    (rows i::n) and applies one update from their summed gradients, i.e.
    the update of the whole batch for about the activation memory of one
    micro-batch (see make_train_step). `batch_size` must be divisible by n;
    keep batch_size / n divisible by the data-axis size of the mesh so
    every micro-batch stays spread over all devices.
  local_accumulation: data parallelism only (the mesh's model axis is 1):
    every data shard runs its rows' micro-batches without collectives and
    the gradients are all-reduced once per step as one flat buffer
    (`make_train_step`); batch_size must be a multiple of data-axis size x
    num_microbatches. For slow links between devices (CPU processes, GPU
    nodes over Ethernet); XLA's default reduces per parameter and
    micro-batch.
  """
  train_steps: int
  batch_size: int
  log_every: int = 50
  checkpoint_every: int = 1000
  keep_checkpoints: Optional[int] = 3
  eval_every: Optional[int] = None
  seed: int = 0
  num_microbatches: int = 1
  local_accumulation: bool = False

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """ValueError unless num_microbatches >= 1 divides batch_size."""
    n = _check_num_microbatches(self.num_microbatches,
                                "TrainLoopConfig.num_microbatches")
    if self.batch_size % n:
      raise ValueError(
          f"TrainLoopConfig.num_microbatches={n} must divide "
          f"TrainLoopConfig.batch_size={self.batch_size} (each step's "
          "global batch is split into num_microbatches equal micro-batches)")


def _check_microbatch_layout(cfg: TrainLoopConfig, mesh) -> None:
  """Warns when micro-batches cannot stay on the devices holding their rows
  (ValueError with local accumulation, where they must)."""
  n = cfg.num_microbatches
  data = int(dict(mesh.shape).get(partitioning.DATA_AXIS, 1))
  if cfg.local_accumulation and cfg.batch_size % (data * n):
    raise ValueError(
        f"TrainLoopConfig.local_accumulation=True runs "
        f"TrainLoopConfig.num_microbatches={n} micro-batches on each of the "
        f"{data} data shards, so TrainLoopConfig.batch_size="
        f"{cfg.batch_size} must be a multiple of {data * n}")
  if n == 1:
    return
  if cfg.batch_size % (data * n):
    msg = (f"TrainLoopConfig.num_microbatches={n} does not divide the "
           f"{cfg.batch_size // data} rows per device of "
           f"TrainLoopConfig.batch_size={cfg.batch_size} over the data axis "
           f"({data}): each micro-batch is resharded every step (correct, "
           "but slower)")
    logging.warning(msg)
    if jax.process_index() == 0:
      print(f"Warning: {msg}", flush=True)


def _resume(ckpt: checkpoints.Checkpointer, abstract, model):
  """(step, state) of the newest readable checkpoint, or None (fresh run)."""
  architecture = model.architecture()

  def check_meta(step, saved_meta):
    checkpoints.check_architecture(
        saved_meta.get(checkpoints.ARCHITECTURE_KEY), architecture,
        f"{ckpt.directory}/{checkpoints.STEP_PREFIX}_{step}")
    if saved_meta.get("input_position", step) != step:
      raise RuntimeError(
          f"checkpoint_{step} records input position "
          f"{saved_meta['input_position']}, expected {step}")

  def warn(msg):
    logging.warning(msg)
    if jax.process_index() == 0:
      print(f"Warning: {msg}", flush=True)

  found = ckpt.restore_latest(abstract, check_meta=check_meta, warn=warn)
  if found is None:
    return None
  start, state, saved_meta = found
  logging.info("resuming from %s", ckpt.describe(start))
  if jax.process_index() == 0:
    print(f"Resuming from checkpoint_{start} in {ckpt.directory}", flush=True)
    saved_nproc = saved_meta.get("process_count", jax.process_count())
    if saved_nproc != jax.process_count():
      # Parameters and optimizer state reshard; only host_input='slice'
      # feeds the same batches as before.
      print(f"Note: checkpoint_{start} was written by {saved_nproc} "
            f"processes, resuming with {jax.process_count()}", flush=True)
  return int(start), state


def _print_parameters(params, frozen: Sequence[str], mesh) -> None:
  """Parameter counts (trainable and frozen) and the devices, on process 0."""
  trainable, frozen_count = optimizer_lib.ParamPartition(
      params, frozen).counts(params)
  if jax.process_index() != 0:
    return
  counts = f"{trainable + frozen_count:,}"
  if frozen:
    counts += (f" ({trainable:,} trainable, {frozen_count:,} frozen by "
               f"OptimizerConfig.frozen={tuple(frozen)!r})")
  print(f"Parameters: {counts}; devices: {jax.device_count()} "
        f"(mesh {dict(mesh.shape)}); processes: {jax.process_count()}",
        flush=True)


def train_loop(
    model,
    optimizer: OptimizerConfig,
    batches: Callable[[int], Iterator[Dict[str, np.ndarray]]],
    cfg: TrainLoopConfig,
    *,
    model_dir: str,
    mesh,
    rules,
    writer=None,
    eval_fn: Optional[Callable[[Any, int], Dict[str, float]]] = None,
    meta: Optional[dict] = None,
    init_from: Optional[init_from_lib.InitFromArg] = None,
) -> TrainState:
  """Trains to `cfg.train_steps`, resuming from the latest checkpoint.

  A run resumes from the newest readable checkpoint in `model_dir` (newer
  unreadable ones are set aside with a warning: Checkpointer.restore_latest);
  one that finds none starts from the model's initial variables, with the
  parameters `init_from` names copied from another run, export or import.

  Args:
    model: a model_lib.base.BaseModel: get_initial_variables, loss_fn, its
      metric sums and summary, architecture() and checkpoint_meta() (both
      stored with each checkpoint; the architecture is checked on resume).
    optimizer: optimizer config (`frozen` parameters are not trained).
    batches: `batches(start_step)` yields this process's host-local numpy
      batches for steps start_step, start_step + 1, ... (deterministic, so a
      resumed run sees exactly the batches an uninterrupted one would).
    cfg: loop settings.
    model_dir: run directory (checkpoints, TensorBoard).
    mesh: device mesh; rules: logical axis rules.
    writer: clu-style metric writer (write_scalars(step, dict)) or None.
    eval_fn: `eval_fn(params, step) -> metrics`, run every cfg.eval_every.
    meta: extra JSON stored with each checkpoint (e.g. the data directory).
    init_from: initial parameters of a fresh run (ignored on resume): an
      `InitFrom`, or a list of them applied in order (e.g. a frozen LM from
      one run and an adapter from another).

  Returns:
    The final TrainState.
  """
  cfg.validate()  # the fields may have been changed since construction
  sum_keys = base.check_metric_sums(model)
  tx, schedule = make_optimizer(optimizer, cfg.train_steps)
  rng = jax.random.PRNGKey(cfg.seed)
  init_rng, step_rng = jax.random.split(rng)
  state, shardings, abstract = init_state(model, tx, init_rng, mesh, rules)
  meta = {**model.checkpoint_meta(),
          checkpoints.ARCHITECTURE_KEY: model.architecture(), **(meta or {})}
  ckpt = checkpoints.Checkpointer(model_dir, keep=cfg.keep_checkpoints,
                                  period=cfg.checkpoint_every)
  resumed = _resume(ckpt, abstract, model)
  if resumed is not None:
    start, state = resumed
  else:
    start = 0
    for source in init_from_lib.as_list(init_from):
      params, summary = init_from_lib.initialise(state.params, source)
      state = state.replace(params=params)
      if jax.process_index() == 0:
        print(summary, flush=True)
  _print_parameters(state.params, optimizer.frozen, mesh)

  local_bs = partitioning.local_batch_size(cfg.batch_size)
  _check_microbatch_layout(cfg, mesh)
  step_fn = jit_train_step(
      make_train_step(model, tx, schedule,
                      num_microbatches=cfg.num_microbatches,
                      local_accumulation=cfg.local_accumulation, mesh=mesh,
                      frozen=optimizer.frozen),
      shardings, mesh)

  preempted = {"flag": False}

  def on_sigterm(signum, frame):  # pylint: disable=unused-argument
    preempted["flag"] = True
  old_handler = None
  try:
    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
  except ValueError:  # not the main thread
    pass

  def save(step: int, force: bool = False):
    payload = {"input_position": step, "step": step,
               "process_count": jax.process_count(), **meta}
    ckpt.save(step, state, payload, force=force)

  window = _MetricWindow(model, sum_keys)
  it = batches(start)
  t_last, step_last = time.time(), start
  t_start = time.time()
  step = start
  try:
    while step < cfg.train_steps:
      local = next(it)
      rows = len(next(iter(local.values())))
      if rows != local_bs:
        raise ValueError(f"input pipeline gave {rows} rows; expected the "
                         f"per-process batch {local_bs}")
      batch = partitioning.host_to_global(local, mesh)
      with partitioning.with_rules(rules, mesh):
        if step == start and jax.process_count() > 1:
          # Hosts finish compiling at different times; line them up before
          # the first cross-host collective (see distributed.barrier).
          step_fn = step_fn.lower(state, batch, step_rng).compile()
          distributed.barrier("train_start")
        state, metrics = step_fn(state, batch, step_rng)
      step += 1
      window.add(metrics)
      if not math.isfinite(window.last["loss"]):
        good = ckpt.latest_step()
        good = (f"the last good checkpoint is {model_dir}/checkpoint_{good}"
                if good is not None else f"no checkpoint in {model_dir} yet")
        raise NonFiniteLossError(
            f"loss is {window.last['loss']} at step {step}; stopping ({good})."
            " Lower the learning rate or check the input.")
      last = step == cfg.train_steps
      if step % cfg.log_every == 0 or last:
        now = time.time()
        dt = max(now - t_last, 1e-9)
        s = window.summary()
        steps_per_s = (step - step_last) / dt
        s["steps_per_sec"] = steps_per_s
        s["sequences_per_sec"] = steps_per_s * cfg.batch_size
        eta = (cfg.train_steps - step) / max(steps_per_s, 1e-9)
        if jax.process_index() == 0:
          print(progress_line(step, cfg.train_steps, s, eta), flush=True)
        if writer is not None:
          writer.write_scalars(step, {f"train/{k}": v for k, v in s.items()})
        window = _MetricWindow(model, sum_keys)
        t_last, step_last = time.time(), step
      if eval_fn is not None and cfg.eval_every and (
          step % cfg.eval_every == 0 or last):
        eval_fn(state.params, step)
      stop = _any_process(preempted["flag"])
      if step % cfg.checkpoint_every == 0 or last or stop:
        save(step, force=last or stop)
      if stop:
        print(f"SIGTERM: saved checkpoint_{step}; exiting.", flush=True)
        break
  finally:
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
    ckpt.close()
  if jax.process_index() == 0 and step > start:
    print(f"Trained steps {start}..{step} in {time.time() - t_start:.1f}s",
          flush=True)
  return state
