"""The benchmarks' training step: jitted loss, gradient and AdamW update.

`seconds_per_step(model, batches, reps)` times the step as the trainer runs
it (parameters and optimizer state donated), compilation excluded by one
warm-up step. Used by benchmarks/flare_step.py and
benchmarks/regen_throughput.py. `TrainerStep` is the trainer's own step
(`trainer.make_train_step` with a gin file's `OptimizerConfig`, frozen
parameters included: they get no gradient and no optimizer state), compiled
ahead of time for one batch shape, with its memory analysis and parameter
counts (benchmarks/ilm_step.py). JAX, Flax and optax are imported inside the
functions (module top levels of benchmarks/common use only the standard
library).
"""

import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple


def initial_params(model) -> Any:
  """The model's initial parameters (seed 0), unboxed."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return nn.meta.unbox(
      model.get_initial_variables(jax.random.PRNGKey(0))["params"])


def adamw_step(model, learning_rate: float = 1e-3) -> Tuple[Any, Callable]:
  """(optax AdamW, jitted step) for `model.loss_fn`.

  The step maps (params, opt_state, batch, rng) to (params, opt_state,
  loss), donating params and opt_state.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  tx = optax.adamw(learning_rate)

  def step(params, opt_state, batch, rng):
    (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return tx, jax.jit(step, donate_argnums=(0, 1))


def seconds_per_step(model, batches: Sequence[Any], reps: int) -> float:
  """Mean seconds of one training step over `reps` steps.

  Args:
    model: a model with `get_initial_variables` and `loss_fn`.
    batches: model batches, cycled through (the first also warms up).
    reps: timed steps (each with its own dropout key).

  Returns:
    Wall seconds per step, after a warm-up step that compiles.
  """
  import jax  # pylint: disable=g-import-not-at-top
  params = initial_params(model)
  tx, step = adamw_step(model)
  opt_state = tx.init(params)
  rng = jax.random.PRNGKey(1)
  params, opt_state, loss = step(params, opt_state, batches[0], rng)
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for i in range(reps):
    params, opt_state, loss = step(params, opt_state,
                                   batches[i % len(batches)],
                                   jax.random.fold_in(rng, i))
  jax.block_until_ready(loss)
  return (time.perf_counter() - start) / reps


# Fields of XLA's compiled memory analysis (`Compiled.memory_analysis()`).
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes",
                 "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


class TrainerStep:
  """The trainer's training step for one model and one batch shape.

  `trainer.make_train_step(model, tx, schedule, frozen=optimizer.frozen)`
  with `tx, schedule = trainer.make_optimizer(optimizer, train_steps)`, as
  `trainer.train_loop` builds it (one device, no micro-batches), jitted with
  the state donated and compiled ahead of time for `batch`'s shapes: the
  compilation happens here, not in `seconds`.

  Args:
    model: a model with `get_initial_variables` and `loss_fn`.
    batch: a batch of the shapes every timed batch has.
    optimizer: a `trainer.OptimizerConfig` (e.g. a gin file's).
    train_steps: the schedule's length (the step cost does not depend on it).
  """

  def __init__(self, model, batch: Any, optimizer: Any,
               train_steps: int = 1000):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from recsys_jax.core import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
    from recsys_jax.core import trainer  # pylint: disable=g-import-not-at-top
    tx, schedule = trainer.make_optimizer(optimizer, train_steps)
    params = initial_params(model)
    self.frozen = tuple(optimizer.frozen)
    self.trainable, self.frozen_count = optimizer_lib.ParamPartition(
        params, self.frozen).counts(params)
    self.state = trainer.TrainState(step=jnp.zeros((), jnp.int32),
                                    params=params,
                                    opt_state=tx.init(params))
    self.rng = jax.random.PRNGKey(1)
    step = trainer.make_train_step(model, tx, schedule, frozen=self.frozen)
    self.compiled = jax.jit(step, donate_argnums=(0,)).lower(
        self.state, jax.device_put(batch), self.rng).compile()

  def param_counts(self) -> Dict[str, int]:
    """Parameter values: total, trainable and frozen."""
    return {"total": self.trainable + self.frozen_count,
            "trainable": self.trainable, "frozen": self.frozen_count}

  def memory(self) -> Optional[Dict[str, int]]:
    """XLA's memory analysis of the compiled step (bytes), or None where
    the backend gives none. `total_bytes` = arguments + outputs + temporaries
    - aliased (the donated state, counted once)."""
    stats = self.compiled.memory_analysis()
    if stats is None:
      return None
    out = {f: int(getattr(stats, f)) for f in MEMORY_FIELDS
           if hasattr(stats, f)}
    out["total_bytes"] = (out.get("argument_size_in_bytes", 0)
                          + out.get("output_size_in_bytes", 0)
                          + out.get("temp_size_in_bytes", 0)
                          - out.get("alias_size_in_bytes", 0))
    return out

  def seconds(self, batches: Sequence[Any], reps: int) -> float:
    """Mean wall seconds of one step over `reps` steps (batches cycled,
    put on the device first), after one untimed step."""
    import jax  # pylint: disable=g-import-not-at-top
    batches = [jax.device_put(b) for b in batches]
    self.state, metrics = self.compiled(self.state, batches[0], self.rng)
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for i in range(reps):
      self.state, metrics = self.compiled(
          self.state, batches[i % len(batches)], self.rng)
    jax.block_until_ready(metrics["loss"])
    return (time.perf_counter() - start) / reps
