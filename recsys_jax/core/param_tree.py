"""Parameter paths: the '/'-joined names that gin patterns refer to.

A parameter of `{'encoder': {'layers_0': {'kernel': x}}}` is
'encoder/layers_0/kernel'; a boxed parameter (`nn.LogicallyPartitioned`)
has the path of its box, so boxed and unboxed trees name alike.
"""

from typing import Any, Dict, List

from flax.core import meta
import jax


def is_box(x) -> bool:
  return isinstance(x, meta.AxisMetadata)


def path_str(path) -> str:
  """'/'-joined names of a `tree_flatten_with_path` key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def paths(tree: Any) -> List[str]:
  """The path of every parameter of `tree`, in leaf order."""
  return [path_str(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]]


def flatten(tree: Any) -> Dict[str, Any]:
  """`{path: parameter}` (boxes unboxed), in leaf order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]
  return {path_str(p): (x.unbox() if is_box(x) else x) for p, x in leaves}


def structure(tree: Any):
  """The treedef whose leaves are the parameters (boxes count as leaves)."""
  return jax.tree.structure(tree, is_leaf=is_box)
