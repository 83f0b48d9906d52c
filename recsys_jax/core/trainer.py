"""The training loop: sharded state, a pure jitted train step, checkpoints.

The trainer knows nothing about a model's loss: it calls the wrapper's
`get_initial_variables` and `loss_fn(params, batch, rng) -> (loss, aux)`, where
aux holds sums (`loss_sum`, `weight_sum`, `correct_sum`) it can average.
"""

import dataclasses
import logging
import math
import signal
import time
from typing import Any, Callable, Dict, Iterator, Optional

import flax
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from recsys_jax.core import checkpoints
from recsys_jax.core import distributed
from recsys_jax.core import partitioning


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/inf; the run stops without checkpointing it."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warm-up then linear or cosine decay, and clipping."""
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  decay: str = "linear"          # "linear" | "cosine" | "constant"
  end_learning_rate_factor: float = 0.0
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: Optional[float] = 1.0


def make_optimizer(cfg: OptimizerConfig, total_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  warmup = max(0, min(cfg.warmup_steps, total_steps))
  decay_steps = max(1, total_steps - warmup)
  end = cfg.learning_rate * cfg.end_learning_rate_factor
  if cfg.decay == "linear":
    decay = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
  elif cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(
        cfg.learning_rate, decay_steps, alpha=cfg.end_learning_rate_factor)
  elif cfg.decay == "constant":
    decay = optax.constant_schedule(cfg.learning_rate)
  else:
    raise ValueError(f"OptimizerConfig.decay={cfg.decay!r}: expected "
                     "'linear', 'cosine' or 'constant'")
  if warmup:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay],
        [warmup])
  else:
    schedule = decay

  # No weight decay on biases, layer-norm scales and other vectors.
  def decay_mask(params):
    return jax.tree.map(lambda p: np.ndim(p) > 1, params)

  chain = []
  if cfg.clip_norm:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain), schedule


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
                    mesh=None) -> Callable:
  """The pure step `(state, batch, rng) -> (state, metrics)`.

  `num_microbatches` = n > 1 accumulates gradients (as t5x does): the global
  batch is split into n strided micro-batches (`microbatch`: rows i::n), run
  one after another in a `lax.scan`, each with dropout rng
  `fold_in(step_rng, i)`. Per micro-batch the gradient of the unnormalised
  `loss_sum` is added to a float32 sum, with the `loss_sum`, `weight_sum`
  and `correct_sum` metrics; the update uses grad_sum / max(weight_sum, 1)
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
  apply_gradients = _update_fn(tx, schedule)
  if local_accumulation:
    return _local_accumulation_step(model, num_microbatches, mesh,
                                    apply_gradients)
  if num_microbatches == 1:
    def train_step(state: TrainState, batch, rng):
      step_rng = jax.random.fold_in(rng, state.step)
      grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
      (loss, aux), grads = grad_fn(state.params, batch, step_rng)
      return apply_gradients(state, grads, loss, aux)

    return train_step

  n = num_microbatches
  grad_fn = _loss_sum_grad_fn(model)

  def accumulating_train_step(state: TrainState, batch, rng):
    step_rng = jax.random.fold_in(rng, state.step)
    _check_batch_rows(batch, n, f"num_microbatches={n} must divide the "
                      "global batch size")
    grad_sum, sums = _accumulate(grad_fn, state.params, batch, step_rng, n)
    return _apply_sums(apply_gradients, state, grad_sum, sums)

  return accumulating_train_step


_SUM_KEYS = ("loss_sum", "weight_sum", "correct_sum")


def _check_batch_rows(batch, multiple: int, requirement: str) -> None:
  """ValueError `requirement` naming the first batch array whose rows are
  not a multiple of `multiple` (shapes are static: checked at trace time)."""
  for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
    if x.shape[0] % multiple:
      raise ValueError(f"{requirement}; batch{jax.tree_util.keystr(path)} "
                       f"has {x.shape[0]} rows")


def _update_fn(tx, schedule) -> Callable:
  """`(state, grads, loss, aux) -> (state, metrics)`: one optimizer update."""

  def apply_gradients(state, grads, loss, aux):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "loss_sum": aux["loss_sum"],
        "weight_sum": aux["weight_sum"],
        "correct_sum": aux["correct_sum"],
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
    }
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state)
    return new_state, metrics

  return apply_gradients


def _loss_sum_grad_fn(model) -> Callable:
  """`(params, batch, rng) -> (grads of loss_sum, aux)`."""

  def loss_sum_fn(params, batch, dropout_rng):
    _, aux = model.loss_fn(params, batch, dropout_rng)
    return aux["loss_sum"], aux

  return jax.grad(loss_sum_fn, has_aux=True)


def _accumulate(grad_fn, params, batch, step_rng, n: int):
  """Float32 sums of the gradients and `_SUM_KEYS` over n micro-batches
  (`microbatch(batch, i, n)` with dropout rng `fold_in(step_rng, i)`), run
  one after another in a `lax.scan`."""

  def body(carry, i):
    grad_sum, sums = carry
    grads, aux = grad_fn(params, microbatch(batch, i, n),
                         jax.random.fold_in(step_rng, i))
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32),
                            grad_sum, grads)
    sums = {k: sums[k] + aux[k].astype(jnp.float32) for k in _SUM_KEYS}
    return (grad_sum, sums), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = (zeros, {k: jnp.zeros((), jnp.float32) for k in _SUM_KEYS})
  (grad_sum, sums), _ = jax.lax.scan(body, init, jnp.arange(n))
  return grad_sum, sums


def _apply_sums(apply_gradients, state, grad_sum, sums):
  """The update from summed gradients: grad_sum / max(weight_sum, 1)."""
  denom = jnp.maximum(sums["weight_sum"], 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum,
                       state.params)
  return apply_gradients(state, grads, sums["loss_sum"] / denom, sums)


def _local_accumulation_step(model, n: int, mesh, apply_gradients
                             ) -> Callable:
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
  grad_fn = _loss_sum_grad_fn(model)
  spec = jax.sharding.PartitionSpec
  data_axis = partitioning.DATA_AXIS

  def shard_sums(params, batch, step_rng):
    rng = jax.random.fold_in(step_rng, jax.lax.axis_index(data_axis))
    # Inside the shard nothing is partitioned: logical constraints are off.
    with nn.logical_axis_rules(()):
      grad_sum, sums = _accumulate(grad_fn, params, batch, rng, n)
    # One all-reduce a step: every gradient and metric sum in one buffer.
    flat, unravel = jax.flatten_util.ravel_pytree((grad_sum, sums))
    return unravel(jax.lax.psum(flat, data_axis))

  sharded_sums = jax.shard_map(
      shard_sums, mesh=mesh, in_specs=(spec(), spec(data_axis), spec()),
      out_specs=spec(), check_vma=False)

  def local_accumulation_train_step(state: TrainState, batch, rng):
    _check_batch_rows(
        batch, shards * n,
        f"local gradient accumulation runs num_microbatches={n} "
        f"micro-batches on each of {shards} data shards, so {shards * n} "
        "must divide the global batch size")
    step_rng = jax.random.fold_in(rng, state.step)
    grad_sum, sums = sharded_sums(state.params, batch, step_rng)
    return _apply_sums(apply_gradients, state, grad_sum, sums)

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
  """Accumulates step metrics between two log points."""

  def __init__(self):
    self.sums: Dict[str, float] = {}
    self.last: Dict[str, float] = {}
    self.steps = 0

  def add(self, m: Dict[str, Any]):
    m = jax.device_get(m)
    for k in ("loss_sum", "weight_sum", "correct_sum"):
      self.sums[k] = self.sums.get(k, 0.0) + float(m[k])
    self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + float(
        m["grad_norm"])
    self.last = {k: float(v) for k, v in m.items()}
    self.steps += 1

  def summary(self) -> Dict[str, float]:
    w = max(self.sums.get("weight_sum", 0.0), 1.0)
    return {"loss": self.sums["loss_sum"] / w,
            "masked_accuracy": self.sums["correct_sum"] / w,
            "grad_norm": self.sums["grad_norm"] / max(self.steps, 1),
            "learning_rate": self.last["learning_rate"]}


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
) -> TrainState:
  """Trains to `cfg.train_steps`, resuming from the latest checkpoint.

  Args:
    model: wrapper with get_initial_variables / loss_fn.
    optimizer: optimizer config.
    batches: `batches(start_step)` yields this process's host-local numpy
      batches for steps start_step, start_step + 1, ... (deterministic, so a
      resumed run sees exactly the batches an uninterrupted one would).
    cfg: loop settings.
    model_dir: run directory (checkpoints, TensorBoard).
    mesh: device mesh; rules: logical axis rules.
    writer: clu-style metric writer (write_scalars(step, dict)) or None.
    eval_fn: `eval_fn(params, step) -> metrics`, run every cfg.eval_every.
    meta: extra JSON stored with each checkpoint.

  Returns:
    The final TrainState.
  """
  cfg.validate()  # the fields may have been changed since construction
  tx, schedule = make_optimizer(optimizer, cfg.train_steps)
  rng = jax.random.PRNGKey(cfg.seed)
  init_rng, step_rng = jax.random.split(rng)
  state, shardings, abstract = init_state(model, tx, init_rng, mesh, rules)
  ckpt = checkpoints.Checkpointer(model_dir, keep=cfg.keep_checkpoints,
                                  period=cfg.checkpoint_every)
  start = ckpt.latest_step()
  if start is not None:
    logging.info("resuming from %s/checkpoint_%d", model_dir, start)
    state, saved_meta = ckpt.restore(start, abstract)
    if jax.process_index() == 0:
      print(f"Resuming from checkpoint_{start} in {model_dir}", flush=True)
      saved_nproc = saved_meta.get("process_count", jax.process_count())
      if saved_nproc != jax.process_count():
        # Parameters and optimizer state reshard; only host_input='slice'
        # feeds the same batches as before.
        print(f"Note: checkpoint_{start} was written by {saved_nproc} "
              f"processes, resuming with {jax.process_count()}", flush=True)
    checkpoints.check_architecture(
        saved_meta.get(checkpoints.ARCHITECTURE_KEY),
        (meta or {}).get(checkpoints.ARCHITECTURE_KEY),
        f"{model_dir}/checkpoint_{start}")
    if saved_meta.get("input_position", start) != start:
      raise RuntimeError(
          f"checkpoint_{start} records input position "
          f"{saved_meta['input_position']}, expected {start}")
  start = int(start or 0)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  if jax.process_index() == 0:
    print(f"Parameters: {n_params:,}; devices: {jax.device_count()} "
          f"(mesh {dict(mesh.shape)}); processes: {jax.process_count()}",
          flush=True)

  local_bs = partitioning.local_batch_size(cfg.batch_size)
  _check_microbatch_layout(cfg, mesh)
  step_fn = jit_train_step(
      make_train_step(model, tx, schedule,
                      num_microbatches=cfg.num_microbatches,
                      local_accumulation=cfg.local_accumulation, mesh=mesh),
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
               "process_count": jax.process_count(), **(meta or {})}
    ckpt.save(step, state, payload, force=force)

  window = _MetricWindow()
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
          print(f"step {step}/{cfg.train_steps} | loss {s['loss']:.4f} | "
                f"masked acc {s['masked_accuracy']:.4f} | grad norm "
                f"{s['grad_norm']:.3f} | lr {s['learning_rate']:.2e} | "
                f"{steps_per_s:.2f} steps/s | "
                f"{s['sequences_per_sec']:.0f} seq/s | ETA {_fmt_eta(eta)}",
                flush=True)
        if writer is not None:
          writer.write_scalars(step, {f"train/{k}": v for k, v in s.items()})
        window = _MetricWindow()
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
