"""Reading Hugging Face checkpoints and assigning them into Flax param trees.

Nothing from outside is unpickled or executed: safetensors files are parsed
here (JSON header + raw little-endian buffers, bfloat16 via ml_dtypes) and
`pytorch_model.bin` goes through `torch.load(weights_only=True)` (torch is
imported only then). All problems raise `CheckpointImportError` naming the
file or key and what was expected.
"""

import dataclasses
import json
import os
import re
from typing import (Any, Callable, Dict, Iterable, Mapping, Optional, Sequence,
                    Tuple)

import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"

_MAX_LISTED = 20


class CheckpointImportError(ValueError):
  """A checkpoint that cannot be imported (missing/unexpected/mis-shaped)."""


def _st_dtypes() -> Dict[str, Any]:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return {
      "F64": np.float64, "F32": np.float32, "F16": np.float16,
      "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
      "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
  }


def read_json(path: str) -> Any:
  """Parses a JSON file; errors name the file."""
  try:
    with open(path, "r", encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise CheckpointImportError(f"{path}: file not found") from e
  except json.JSONDecodeError as e:
    raise CheckpointImportError(
        f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from e


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Tensors of one `.safetensors` file (memory-mapped, read-only views)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointImportError(f"{path}: truncated safetensors header")
    n = int.from_bytes(head, "little")
    if n <= 0 or 8 + n > size:
      raise CheckpointImportError(
          f"{path}: header length {n} does not fit in a {size}-byte file")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointImportError(f"{path}: header is not JSON ({e})") from e
  if not isinstance(header, dict):
    raise CheckpointImportError(f"{path}: header is not a JSON object")
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if (
      size > 8 + n) else np.zeros((0,), np.uint8)
  dtypes = _st_dtypes()
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype = dtypes[info["dtype"]]
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointImportError(
          f"{path}: tensor {key!r}: bad header entry {info!r} (need dtype in "
          f"{sorted(dtypes)}, shape, data_offsets)") from e
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if not 0 <= begin <= end <= data.size or end - begin != nbytes:
      raise CheckpointImportError(
          f"{path}: tensor {key!r}: data_offsets [{begin}, {end}) do not hold "
          f"{shape} {info['dtype']} ({nbytes} bytes) in {data.size} bytes")
    out[key] = data[begin:end].view(np.dtype(dtype)).reshape(shape)
  return out


def read_torch_bin(path: str) -> Dict[str, np.ndarray]:
  """Tensors of a `pytorch_model.bin` via `torch.load(weights_only=True)`."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointImportError(
        f"{path}: reading PyTorch checkpoints needs torch; install it or "
        "convert the checkpoint to safetensors") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointImportError(
        f"{path}: not a weights-only PyTorch state dict ({e})") from e
  if not isinstance(sd, Mapping):
    raise CheckpointImportError(
        f"{path}: expected a dict of tensors, got {type(sd).__name__}")
  out = {}
  for key, value in sd.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointImportError(
          f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach()
    if value.dtype == torch.bfloat16:
      value = value.float()
    out[key] = value.numpy()
  return out


def _read_sharded(directory: str, index_name: str, reader) -> Dict[str, Any]:
  index_path = os.path.join(directory, index_name)
  index = read_json(index_path)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise CheckpointImportError(f"{index_path}: lacks a 'weight_map' object")
  out = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(directory, shard)
    if os.path.basename(shard) != shard or not os.path.exists(shard_path):
      raise CheckpointImportError(
          f"{index_path}: shard {shard!r} is not a file in {directory}")
    tensors = reader(shard_path)
    for key, file in weight_map.items():
      if file == shard:
        if key not in tensors:
          raise CheckpointImportError(
              f"{shard_path}: lacks tensor {key!r} listed in {index_path}")
        out[key] = tensors[key]
  return out


def load_hf_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads an HF checkpoint as `{name: array}` (arrays in the stored dtype).

  Args:
    path: a `.safetensors` / `.bin` file, or a directory holding (first match
      wins) model.safetensors, model.safetensors.index.json (shards),
      pytorch_model.bin or pytorch_model.bin.index.json.
  """
  if os.path.isfile(path):
    if path.endswith(".safetensors"):
      return read_safetensors(path)
    if path.endswith(".bin") or path.endswith(".pt") or path.endswith(".pth"):
      return read_torch_bin(path)
    raise CheckpointImportError(
        f"{path}: unknown checkpoint file type (expected .safetensors or .bin)")
  if not os.path.isdir(path):
    raise CheckpointImportError(f"{path}: no such file or directory")
  candidates = [
      (SAFETENSORS, lambda: read_safetensors(os.path.join(path, SAFETENSORS))),
      (SAFETENSORS_INDEX,
       lambda: _read_sharded(path, SAFETENSORS_INDEX, read_safetensors)),
      (TORCH_BIN, lambda: read_torch_bin(os.path.join(path, TORCH_BIN))),
      (TORCH_BIN_INDEX,
       lambda: _read_sharded(path, TORCH_BIN_INDEX, read_torch_bin)),
  ]
  for name, read in candidates:
    if os.path.exists(os.path.join(path, name)):
      return read()
  raise CheckpointImportError(
      f"{path}: no checkpoint found; expected one of "
      f"{[name for name, _ in candidates]}")


# ---------------------------------------------------------------------------
# Assigning into a param tree.


def transpose(x: np.ndarray) -> np.ndarray:
  """torch Linear `[out, in]` -> Flax kernel `[in, out]` (2-D transpose)."""
  return np.asarray(x).T


def identity(x: np.ndarray) -> np.ndarray:
  return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one target parameter comes from: a checkpoint key and a transform."""
  key: str
  transform: Callable[[np.ndarray], np.ndarray] = identity


def flatten_tree(tree: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
  """Nested dicts -> `{'a/b/c': leaf}` (boxed leaves are unboxed)."""
  out = {}

  def walk(prefix, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(f"{prefix}{sep}{k}" if prefix else str(k), v)
    else:
      out[prefix] = getattr(node, "unbox", lambda: node)()
  walk("", tree)
  return out


def unflatten_tree(flat: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _listing(title: str, items: Sequence[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = f" ... and {len(items) - _MAX_LISTED} more" if len(
      items) > _MAX_LISTED else ""
  return f"{title} ({len(items)}): {shown}{more}"


def _listings(*named: Tuple[str, Sequence[str]]) -> str:
  """'; '-joined `_listing`s of the (what, names) pairs with names ('' if
  none has any)."""
  return "; ".join(_listing(what, names) for what, names in named if names)


def assign_params(state_dict: Mapping[str, np.ndarray], target: Any,
                  mapping: Mapping[str, Any], *,
                  ignore: Iterable[str] = (), source: str = "checkpoint"
                  ) -> Dict[str, Any]:
  """Builds a param tree shaped like `target` from checkpoint tensors.

  Args:
    state_dict: `{checkpoint key: array}` (e.g. from `load_hf_state_dict`).
    target: nested dict whose leaves have `.shape` and `.dtype` (arrays,
      `jax.ShapeDtypeStruct`s, or boxed versions of either).
    mapping: `{'a/b/c' target path: Source | checkpoint key}`; every target
      leaf needs an entry.
    ignore: regular expressions (full match) for checkpoint keys that may be
      present and go unused.
    source: the checkpoint's name for error messages.

  Returns:
    Nested dict of NumPy arrays with target's structure, shapes and dtypes.

  Raises:
    CheckpointImportError listing, by name, every missing checkpoint key,
    unexpected (unused, not ignored) key and shape mismatch.
  """
  flat_target = flatten_tree(target)
  ignore_res = [re.compile(p) for p in ignore]
  no_rule = sorted(set(flat_target) - set(mapping))
  if no_rule:
    raise CheckpointImportError(
        f"{source}: " + _listing("parameters without a mapping rule", no_rule))
  missing, mismatched, used = [], [], set()
  out = {}
  for path, leaf in flat_target.items():
    src = mapping[path]
    if isinstance(src, str):
      src = Source(src)
    used.add(src.key)
    if src.key not in state_dict:
      missing.append(f"{src.key} (for {path})")
      continue
    value = src.transform(state_dict[src.key])
    want = tuple(leaf.shape)
    if tuple(value.shape) != want:
      raw = tuple(np.shape(state_dict[src.key]))
      shown = f"{raw}" if raw == tuple(value.shape) else (
          f"{raw} (after transform {tuple(value.shape)})")
      mismatched.append(f"{src.key}: got {shown}, expected {want} for {path}")
      continue
    out[path] = np.asarray(value, dtype=np.dtype(leaf.dtype))
  unexpected = sorted(
      k for k in state_dict
      if k not in used and not any(r.fullmatch(k) for r in ignore_res))
  problems = _listings(("missing keys", missing),
                       ("unexpected keys", unexpected),
                       ("shape mismatches", mismatched))
  if problems:
    raise CheckpointImportError(f"{source}: {problems}")
  return unflatten_tree(out)


def check_tree(params: Mapping[str, Any], target: Any, *, source: str,
               rewrite: str) -> None:
  """Raises unless `params` has exactly `target`'s paths and shapes.

  For params written earlier (e.g. an orbax export) and read back without a
  target: a tree from an older parameter layout is named as such, with the
  command that rewrites it (`rewrite`), instead of failing later in `apply`.
  """
  got, want = flatten_tree(params), flatten_tree(target)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  mismatched = [f"{k}: {tuple(np.shape(got[k]))}, expected "
                f"{tuple(want[k].shape)}" for k in sorted(set(got) & set(want))
                if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  problems = _listings(("missing parameters", missing),
                       ("unexpected parameters", unexpected),
                       ("shape mismatches", mismatched))
  if problems:
    raise CheckpointImportError(
        f"{source}: the parameters do not fit the model (" +
        problems + "); if they were written by an older version, "
        f"rewrite them: {rewrite}")


def check_same(state_dict: Mapping[str, np.ndarray], keys: Sequence[str], *,
               source: str = "checkpoint") -> Optional[str]:
  """The first of `keys` present; raises if the present ones differ.

  For tied weights that some writers store under several names.
  """
  present = [k for k in keys if k in state_dict]
  if not present:
    return None
  first = np.asarray(state_dict[present[0]])
  for k in present[1:]:
    other = np.asarray(state_dict[k])
    if other.shape != first.shape or not np.array_equal(other, first):
      raise CheckpointImportError(
          f"{source}: {k!r} should be tied to {present[0]!r} but differs "
          f"(shapes {other.shape} vs {first.shape})")
  return present[0]
