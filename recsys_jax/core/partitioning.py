"""Device mesh, logical-axis rules and sharding helpers (t5x/flax-partitioning style).

Modules name their axes logically (`vocab`, `embed`, `mlp`, ...); the mapping
to the physical mesh axes (`data`, `model`) is a rule table chosen in gin.
"""

import contextlib
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LogicalRules = Sequence[Tuple[str, Optional[Any]]]

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Data parallel: every parameter replicated, batch split over `data`.
DATA_PARALLEL_RULES: LogicalRules = (
    ("batch", DATA_AXIS),
    ("length", None),
    ("vocab", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("joined_kv", None),
    ("latents", None),
    ("queries", None),
)

# Item table (and output bias / logits) sharded along `vocab` over `model`,
# for catalogues too large to replicate; the rest stays data parallel.
VOCAB_PARALLEL_RULES: LogicalRules = (
    ("batch", DATA_AXIS),
    ("vocab", MODEL_AXIS),
) + tuple(r for r in DATA_PARALLEL_RULES if r[0] not in ("batch", "vocab"))

# Megatron-style tensor parallelism for the transformer blocks as well.
TENSOR_PARALLEL_RULES: LogicalRules = (
    ("batch", DATA_AXIS),
    ("vocab", MODEL_AXIS),
    ("mlp", MODEL_AXIS),
    ("heads", MODEL_AXIS),
    ("joined_kv", MODEL_AXIS),
    ("length", None),
    ("embed", None),
    ("kv", None),
    ("latents", None),
    ("queries", None),
)

RULE_SETS = {
    "data_parallel": DATA_PARALLEL_RULES,
    "vocab_parallel": VOCAB_PARALLEL_RULES,
    "tensor_parallel": TENSOR_PARALLEL_RULES,
}


def get_rules(rules: Any) -> LogicalRules:
  """Accepts a rule-set name or an explicit sequence of (logical, mesh) pairs."""
  if isinstance(rules, str):
    if rules not in RULE_SETS:
      raise ValueError(f"unknown logical axis rules {rules!r}; expected one of "
                       f"{sorted(RULE_SETS)} or a list of (logical, mesh) pairs")
    return RULE_SETS[rules]
  return tuple((str(a), b) for a, b in rules)


def make_mesh(model_parallelism: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 2-D (`data`, `model`) mesh over all (global) devices.

  Args:
    model_parallelism: size of the `model` axis; the `data` axis takes the rest.
    devices: defaults to `jax.devices()` (all processes' devices).
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if model_parallelism < 1 or n % model_parallelism:
    raise ValueError(
        f"model_parallelism={model_parallelism} must divide the number of "
        f"devices ({n})")
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh((n // model_parallelism,
                                          model_parallelism), devices)
  except Exception:  # pylint: disable=broad-except
    # Emulated CPU devices / unusual topologies: plain row-major order keeps
    # each process's devices contiguous along `data`.
    grid = np.asarray(devices).reshape(n // model_parallelism,
                                       model_parallelism)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def logical_to_sharding(logical_spec_tree, mesh: Mesh, rules: LogicalRules):
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, list(rules))


def abstract_shardings(abstract_boxed_tree, mesh: Mesh, rules: LogicalRules):
  """Shardings for a (boxed, eval_shape'd) tree; unboxed leaves replicate."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return logical_to_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data`, rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int) -> int:
  """The rows this process feeds; global batch must split evenly."""
  nproc = jax.process_count()
  if global_batch_size % nproc:
    raise ValueError(f"batch_size={global_batch_size} must be divisible by "
                     f"the number of processes ({nproc})")
  return global_batch_size // nproc


def host_to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's rows into global arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def process_local_rows(global_array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in local order
  (the rows `host_to_global` took from this process)."""
  shards = sorted(global_array.addressable_shards,
                  key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start in seen:  # replicas along `model` hold the same rows
      continue
    seen.add(start)
    rows.append(np.asarray(s.data))
  return np.concatenate(rows, axis=0)


@contextlib.contextmanager
def with_rules(rules: LogicalRules, mesh: Optional[Mesh] = None):
  """Makes logical constraints inside modules resolve (and bind to `mesh`).

  `nn.with_logical_constraint` is only enforced when both the rules and a
  mesh are active; without a mesh it is a no-op (fine for shape-only work).
  """
  with nn.logical_axis_rules(list(rules)):
    if mesh is None:
      yield
    else:
      with jax.set_mesh(mesh):
        yield


class MeshConfig:
  """The mesh shape and logical rules of a run (configured in gin/partitioning).

  Attributes:
    model_parallelism: devices along `model` (1 = pure data parallelism).
    rules: a rule-set name ('data_parallel', 'vocab_parallel',
      'tensor_parallel') or explicit (logical, mesh axis) pairs.
  """

  def __init__(self, model_parallelism: int = 1, rules: Any = "data_parallel"):
    self.model_parallelism = model_parallelism
    self.rules = rules
    get_rules(rules)  # fail early on an unknown name

  def make_mesh(self) -> Mesh:
    return make_mesh(self.model_parallelism)

  def logical_rules(self) -> LogicalRules:
    return get_rules(self.rules)
