"""Initialising parameters of a new run from another run, an export or an import.

gin (gin/runs/train.gin):

  runs.train.init_from = @init_from.InitFrom()
  init_from.InitFrom:
    path = 'runs/pretrain/export'
    mapping = [('encoder/.*', r'\\g<0>'),             # same path
               ('item_embed/(.*)', r'items/\\1')]      # renamed subtree

Applied only when the run starts fresh: a checkpoint in the run's own
MODEL_DIR always wins (a resumed run already holds the initialised values,
trained on). Parameters no rule matches keep their fresh initialisation.
"""

import dataclasses
import difflib
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from recsys_jax.core import checkpoints
from recsys_jax.core import param_tree

_STEP_DIR = re.compile(re.escape(checkpoints.STEP_PREFIX) + r"_(\d+)")
_EXPORT_MANIFEST = "export.json"  # runs/restore.py writes it
_PARAMS_DIR = "params"
_LISTED = 8

Mapping_ = Union[Mapping[str, str], Sequence[Tuple[str, str]]]


class InitFromError(checkpoints.CheckpointError):
  """The mapping does not fit the model or the source (names every misfit)."""


@dataclasses.dataclass(frozen=True)
class InitFrom:
  """Where a fresh run's initial parameters come from, and which ones.

  Attributes:
    path: one of
      - a run directory (a MODEL_DIR with `checkpoint_<step>/`): the params
        of checkpoint `step` (default: the latest);
      - an export (`export.json` + `params/`, `python -m recsys_jax.export`);
      - an imported checkpoint (`params/` beside `t5_config.json` or
        `bert_config.json`: `python -m recsys_jax.checkpoint_import.t5`, or
        `checkpoint_import.bert.save_as_orbax`), or any params-only orbax
        checkpoint directory;
      - a Hugging Face model directory (`config.json` + `model.safetensors`
        or `pytorch_model.bin`): T5 / mT5 (`model_type` 't5' or 'mt5': the
        `models.t5.T5` tree) or BERT-family (`models.bert.BertEncoder`),
        converted by `recsys_jax.checkpoint_import`.
    mapping: `(target_regex, source_template)` pairs, or a dict of them. A
      target parameter whose '/'-joined path the regex matches in full (the
      first rule that does) is copied from the source parameter
      `match.expand(source_template)`: `\\g<0>` (or `\\0`) is the whole
      target path, `\\1`, `\\g<name>` its groups. Default: every parameter
      from the same path. Every rule must match some target parameter.
    step: the checkpoint step when `path` is a run directory.
  """
  path: str
  mapping: Mapping_ = ((".*", r"\g<0>"),)
  step: Optional[int] = None

  def rules(self) -> List[Tuple[str, "re.Pattern", str]]:
    """[(pattern, compiled, template)] in order; ValueError if malformed."""
    items = (list(self.mapping.items()) if isinstance(self.mapping, Mapping)
             else list(self.mapping))
    out = []
    for item in items:
      if (not isinstance(item, (tuple, list)) or len(item) != 2
          or not all(isinstance(x, str) for x in item)):
        raise InitFromError(
            f"InitFrom.mapping: {item!r} is not a (target_regex, "
            "source_template) pair of strings")
      pattern, template = item
      try:
        compiled = re.compile(pattern)
      except re.error as e:
        raise InitFromError(f"InitFrom.mapping: {pattern!r} is not a "
                            f"regular expression ({e})") from None
      # `\0` reads naturally as "the whole match"; re spells it \g<0>.
      # ('\0' unescaped in Python or gin is the NUL character: the same.)
      template = re.sub(r"\\0(?![0-9])", r"\\g<0>", template)
      out.append((pattern, compiled, template.replace("\x00", r"\g<0>")))
    if not out:
      raise InitFromError("InitFrom.mapping is empty: nothing would be "
                          "initialised")
    return out


def _run_step(path: str, step: Optional[int]) -> Optional[int]:
  """The checkpoint step to read when `path` is a run directory, else None."""
  steps = sorted(int(m.group(1)) for m in
                 (_STEP_DIR.fullmatch(n) for n in os.listdir(path)) if m)
  if not steps:
    return None
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"InitFrom: {path}/{checkpoints.STEP_PREFIX}_"
                            f"{step} does not exist; steps: {steps}")
  return step


def _hf_params(path: str) -> Any:
  """Params of a Hugging Face directory, converted by checkpoint_import."""
  with open(os.path.join(path, "config.json")) as f:
    model_type = json.load(f).get("model_type", "")
  # pylint: disable=g-import-not-at-top
  if model_type in ("t5", "mt5"):
    from recsys_jax.checkpoint_import import t5 as t5_import
    return t5_import.load_hf_t5(path)[1]
  from recsys_jax.checkpoint_import import bert as bert_import
  return bert_import.load_hf_bert(path)[1]


def load_source(init_from: InitFrom) -> Tuple[str, Dict[str, np.ndarray]]:
  """(description, `{path: array}`) of the parameters at `init_from.path`.

  Raises:
    FileNotFoundError: the path is none of the kinds `InitFrom` reads.
    checkpoints.CheckpointReadError: a file of it cannot be read.
  """
  path = os.path.abspath(init_from.path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"InitFrom.path={init_from.path!r}: no such "
                            "directory")
  if init_from.step is not None and _run_step(path, None) is None:
    raise ValueError(f"InitFrom.step={init_from.step} applies to a run "
                     f"directory (checkpoint_<step>/); {path} is not one")
  step = _run_step(path, init_from.step)
  if step is not None:
    state_dir = os.path.join(path, f"{checkpoints.STEP_PREFIX}_{step}",
                             "state")
    params = checkpoints.restore_to_host(state_dir, subtree="params")
    what = f"{path} ({checkpoints.STEP_PREFIX}_{step})"
  elif os.path.isdir(os.path.join(path, _PARAMS_DIR)):
    params = checkpoints.restore_to_host(os.path.join(path, _PARAMS_DIR))
    kind = ("export" if os.path.exists(os.path.join(path, _EXPORT_MANIFEST))
            else "imported checkpoint")
    what = f"{path} ({kind})"
  elif any(os.path.exists(os.path.join(path, n))
           for n in ("manifest.ocdbt", "_METADATA")):
    params = checkpoints.restore_to_host(path)
    what = f"{path} (params checkpoint)"
  elif os.path.exists(os.path.join(path, "config.json")):
    params = _hf_params(path)
    what = f"{path} (Hugging Face checkpoint)"
  else:
    raise FileNotFoundError(
        f"InitFrom.path={init_from.path!r} is not a run directory "
        f"({checkpoints.STEP_PREFIX}_<step>/), an export ({_EXPORT_MANIFEST} "
        f"+ {_PARAMS_DIR}/), an imported checkpoint ({_PARAMS_DIR}/) or a "
        "Hugging Face directory (config.json)")
  return what, {k: np.asarray(v) for k, v in param_tree.flatten(params).items()}


def _listing(items: Sequence[str]) -> str:
  shown = ", ".join(items[:_LISTED])
  return shown + (f", ... ({len(items)} in all)" if len(items) > _LISTED
                  else "")


def plan(target_shapes: Mapping[str, Tuple[int, ...]],
         source_shapes: Mapping[str, Tuple[int, ...]], init_from: InitFrom,
         where: str = "") -> Dict[str, str]:
  """`{target path: source path}` of the parameters to copy.

  Raises:
    InitFromError listing the rules that match no target parameter, the
    source parameters missing (with the closest names the source has) and
    the shape mismatches (both shapes).
  """
  rules = init_from.rules()
  used, copies, missing, mismatched = set(), {}, [], []
  for target, shape in target_shapes.items():
    for pattern, compiled, template in rules:
      m = compiled.fullmatch(target)
      if m:
        used.add(pattern)
        source = m.expand(template)
        break
    else:
      continue
    if source not in source_shapes:
      close = difflib.get_close_matches(source, list(source_shapes), 2, 0.6)
      hint = f" (closest: {', '.join(close)})" if close else ""
      missing.append(f"{source} for {target}{hint}")
    elif tuple(source_shapes[source]) != tuple(shape):
      mismatched.append(f"{target} {list(shape)} <- {source} "
                        f"{list(source_shapes[source])}")
    else:
      copies[target] = source
  unmatched = [p for p, _, _ in rules if p not in used]
  problems = []
  if unmatched:
    problems.append(f"target patterns matching no parameter: "
                    f"{', '.join(map(repr, unmatched))} (parameters: "
                    f"{_listing(list(target_shapes))})")
  if missing:
    problems.append(f"source parameters missing: {_listing(missing)} "
                    f"(source has: {_listing(list(source_shapes))})")
  if mismatched:
    problems.append(f"shape mismatches (target <- source): "
                    f"{_listing(mismatched)}")
  if problems:
    raise InitFromError(f"InitFrom {where or init_from.path}:\n  "
                        + "\n  ".join(problems))
  return copies


InitFromArg = Union[InitFrom, Sequence[InitFrom]]


def as_list(init_from: Optional[InitFromArg]) -> List[InitFrom]:
  """`init_from` as a list of `InitFrom` (None: empty). Each source is
  applied in order; a later one overwrites what an earlier one copied."""
  if init_from is None:
    return []
  items = [init_from] if isinstance(init_from, InitFrom) else list(init_from)
  bad = [type(x).__name__ for x in items if not isinstance(x, InitFrom)]
  if bad:
    raise TypeError(f"init_from: expected an InitFrom or a list of them; "
                    f"got {', '.join(bad)} (gin: [@a/init_from.InitFrom(), "
                    "@b/init_from.InitFrom()])")
  return items


def initialise(params: Any, init_from: InitFrom) -> Tuple[Any, str]:
  """`params` with the mapped leaves replaced by the source's values.

  Args:
    params: the fresh (unboxed) parameters, jax arrays with shardings.
    init_from: what to copy from where.

  Returns:
    (params, a one-line summary of what was copied). Copied leaves keep the
    target's dtype and sharding; the others are the same arrays.
  """
  what, source = load_source(init_from)
  flat = param_tree.flatten(params)
  copies = plan({k: tuple(v.shape) for k, v in flat.items()},
                {k: tuple(v.shape) for k, v in source.items()}, init_from,
                what)

  def place(path, leaf):
    if path not in copies:
      return leaf
    value = np.asarray(source[copies[path]], dtype=leaf.dtype)
    return jax.make_array_from_callback(value.shape, leaf.sharding,
                                        lambda index: value[index])

  leaves = [place(k, v) for k, v in flat.items()]
  new = jax.tree.unflatten(param_tree.structure(params), leaves)
  values = sum(int(np.prod(flat[k].shape)) for k in copies)
  total = sum(int(np.prod(v.shape)) for v in flat.values())
  return new, (f"Initialised {len(copies)} of {len(flat)} parameter arrays "
               f"({values:,} of {total:,} values) from {what}")
