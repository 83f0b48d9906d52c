"""The optimizer: AdamW with a warm-up/decay schedule, clipping, frozen parameters.

Frozen parameters (`OptimizerConfig.frozen`, regular expressions over
'/'-joined parameter paths such as 'encoder/layers_0/attention/query/kernel')
get no optimizer state and no update (`optax.multi_transform` with
`optax.set_to_zero`), and the train step differentiates only the trainable
ones (`ParamPartition`): no gradient is computed for a frozen leaf.
"""

import dataclasses
import re
from typing import Any, List, Optional, Sequence, Tuple

import jax
import numpy as np
import optax

from recsys_jax.core import param_tree

TRAINABLE = "trainable"
FROZEN = "frozen"
_LISTED_PATHS = 12


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warm-up then linear or cosine decay, and clipping.

  frozen: regular expressions, each matched in full against the
    '/'-joined path of every parameter (e.g. 'encoder/.*' or
    'item_embed/embedding'); the parameters any of them matches are not
    trained. Each pattern must match at least one parameter.
  """
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  decay: str = "linear"          # "linear" | "cosine" | "constant"
  end_learning_rate_factor: float = 0.0
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: Optional[float] = 1.0
  frozen: Tuple[str, ...] = ()

  def __post_init__(self):
    if isinstance(self.frozen, str):
      raise ValueError(f"OptimizerConfig.frozen={self.frozen!r}: expected a "
                       "tuple of regular expressions, e.g. ('encoder/.*',)")
    object.__setattr__(self, "frozen", tuple(self.frozen))
    for pattern in self.frozen:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"OptimizerConfig.frozen: {pattern!r} is not a "
                         f"regular expression ({e})") from None


def frozen_mask(params: Any, patterns: Sequence[str]) -> Any:
  """A tree of Python bools like `params`: True where a pattern matches
  (at each box of a boxed tree).

  Raises:
    ValueError naming each pattern that matches no parameter, with some of
    the parameter paths.
  """
  compiled = [(p, re.compile(p)) for p in patterns]
  paths = param_tree.paths(params)
  unused = [p for p, r in compiled if not any(r.fullmatch(x) for x in paths)]
  if unused:
    shown = ", ".join(paths[:_LISTED_PATHS])
    more = f", ... ({len(paths)} in all)" if len(paths) > _LISTED_PATHS else ""
    raise ValueError(
        f"OptimizerConfig.frozen: {', '.join(map(repr, unused))} "
        f"match{'es' if len(unused) == 1 else ''} no parameter (patterns "
        f"match the whole '/'-joined path); parameters: {shown}{more}")
  flags = [any(r.fullmatch(x) for _, r in compiled) for x in paths]
  return jax.tree.unflatten(param_tree.structure(params), flags)


class ParamPartition:
  """A static split of a parameter tree's leaves into trainable and frozen.

  `split(params)` gives (trainable, frozen): with nothing frozen the tree
  itself and None (so the step differentiates the very same tree as without
  freezing), else two lists of leaves. The step differentiates the loss
  with respect to `trainable` only.
  """

  def __init__(self, params: Any, patterns: Sequence[str]):
    self.treedef = jax.tree.structure(params)
    self.frozen = tuple(jax.tree.leaves(frozen_mask(params, patterns)))
    self.any_frozen = any(self.frozen)

  def split(self, params: Any) -> Tuple[Any, Optional[List[Any]]]:
    if not self.any_frozen:
      return params, None
    leaves = self.treedef.flatten_up_to(params)
    return ([x for x, f in zip(leaves, self.frozen) if not f],
            [x for x, f in zip(leaves, self.frozen) if f])

  def merge(self, trainable: Any, frozen: Optional[List[Any]]) -> Any:
    """The inverse of `split`."""
    if not self.any_frozen:
      return trainable
    it_t, it_f = iter(trainable), iter(frozen)
    return self.treedef.unflatten(
        [next(it_f) if f else next(it_t) for f in self.frozen])

  def full_grads(self, grads: Any, params: Any) -> Any:
    """Gradients of `split(params)[0]` as a tree like `params` (zeros at
    the frozen leaves; the optimizer ignores them)."""
    if not self.any_frozen:
      return grads
    zeros = [jax.numpy.zeros(x.shape, x.dtype) for x, f in
             zip(self.treedef.flatten_up_to(params), self.frozen) if f]
    return self.merge(grads, zeros)

  def keep_frozen(self, new_params: Any, old_params: Any) -> Any:
    """`new_params` with every frozen leaf taken from `old_params` (frozen
    leaves stay bit-identical, whatever the optimizer returned)."""
    if not self.any_frozen:
      return new_params
    return self.merge(self.split(new_params)[0], self.split(old_params)[1])

  def counts(self, params: Any) -> Tuple[int, int]:
    """(trainable, frozen) numbers of parameter values."""
    sizes = [int(np.prod(x.shape)) for x in
             self.treedef.flatten_up_to(params)]
    frozen = sum(s for s, f in zip(sizes, self.frozen) if f)
    return sum(sizes) - frozen, frozen


def _schedule(cfg: OptimizerConfig, total_steps: int):
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
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay],
      [warmup])


def make_optimizer(cfg: OptimizerConfig, total_steps: int):
  """Returns (optax transformation, learning-rate schedule).

  With `cfg.frozen`, the AdamW chain (clipping included: the global norm is
  that of the trainable gradients) sees only the trainable leaves, and the
  frozen ones get `optax.set_to_zero()`: no moments are allocated for them.
  """
  schedule = _schedule(cfg, total_steps)

  # No weight decay on biases, layer-norm scales and other vectors.
  def decay_mask(params):
    return jax.tree.map(lambda p: np.ndim(p) > 1, params)

  chain = []
  if cfg.clip_norm:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  tx = optax.chain(*chain)
  if not cfg.frozen:
    return tx, schedule

  def labels(params):
    return jax.tree.map(lambda f: FROZEN if f else TRAINABLE,
                        frozen_mask(params, cfg.frozen))

  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()},
                               labels), schedule
