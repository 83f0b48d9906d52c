"""The benchmarks' training step: jitted loss, gradient and AdamW update.

`seconds_per_step(model, batches, reps)` times the step as the trainer runs
it (parameters and optimizer state donated), compilation excluded by one
warm-up step. Used by benchmarks/flare_step.py and
benchmarks/regen_throughput.py. JAX, Flax and optax are imported inside the
functions (module top levels of benchmarks/common use only the standard
library).
"""

import time
from typing import Any, Callable, Sequence, Tuple


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
