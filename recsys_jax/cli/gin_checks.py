"""Checks of a parsed gin configuration: what gin itself lets through.

gin rejects a parameter its configurable lacks, but it ignores a macro nothing
reads (`--gin.TRAIN_STEPZ=5` trains the default number of steps without a
word) and passes a value of the wrong type (`learning_rate = 'x'`) into the
run, which fails far from the mistake. `check_parsed_config` runs after
parsing, before anything runs, and requires that

* every `%NAME` read names a macro that is set;
* every macro set is read by some binding, directly or through other macros,
  or by some gin file of the repository's gin/ directory: train, eval and
  export parse different run files (eval reads no TRAIN_STEPS) while one
  experiment file and the same flags serve all three;
* every literal bound to a parameter, directly or through macros, fits the
  parameter's type annotation (int, float, bool, str, None, Optional, Union,
  Literal, tuples, lists, sequences, dicts; other annotations are not judged).

Each error is a `GinConfigError` of one line that names where the binding was
made (`gin_sources`: the flag `--gin.X=V`, or the file and line) and the
closest known names. Parse errors are explained by `gin_errors`.
"""

import collections.abc
import difflib
import inspect
import sys
import types
import typing
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from gin import config as gin_config

from recsys_jax.cli import gin_sources

_MACRO = "gin.macro"  # the selector gin stores `NAME = value` under


class GinConfigError(ValueError):
  """A configuration mistake, explained in one line."""


# -- known names: configurables, parameters; the closest to a typo ------------


def registered_configurables() -> Dict[str, Any]:
  """{complete selector: Configurable} of gin's registry, builtins left out."""
  return {sel: c for sel, c in gin_config._REGISTRY._selector_map.items()  # pylint: disable=protected-access
          if not sel.startswith("gin.")}


def short_selector(complete: str) -> str:
  """`module.name`, the form the repository's gin files write."""
  return ".".join(complete.split(".")[-2:])


def parameters(fn_or_cls) -> List[inspect.Parameter]:
  try:
    params = inspect.signature(fn_or_cls).parameters.values()
  except (TypeError, ValueError):
    return []
  return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
          and p.name != "self"]


def _known_parameters() -> List[str]:
  return sorted(f"{short_selector(sel)}.{p.name}"
                for sel, c in registered_configurables().items()
                for p in parameters(c.wrapped))


def _close_matches(name: str, candidates: Sequence[str]) -> List[str]:
  """Up to 3 candidates close to `name`: those about as close as the best."""
  scored = []
  for c in candidates:
    ratio = difflib.SequenceMatcher(None, name, c).ratio()
    if ratio >= 0.6:
      scored.append((ratio, c))
  scored.sort(key=lambda rc: (-rc[0], rc[1]))
  return [c for r, c in scored[:3] if r >= scored[0][0] - 0.1]


def did_you_mean(name: str, candidates) -> str:
  """' did you mean A or B?' for the close matches of `name`, else ''."""
  matches = _close_matches(name, sorted(set(candidates) - {name}))
  return " did you mean " + " or ".join(matches) + "?" if matches else ""


def _macro_suggestion(name: str, known_macros) -> str:
  """A parameter of the same name (any case), else close macro names."""
  params = _known_parameters()
  same = [p for p in params if p.rsplit(".", 1)[-1] == name.lower()]
  if same:
    return " did you mean " + " or ".join(same[:3]) + "?"
  hint = did_you_mean(name, [m for m in known_macros
                              if not m.startswith("gin.")])
  if not hint:
    by_name = {p.rsplit(".", 1)[-1]: p for p in params}
    matches = _close_matches(name.lower(), sorted(by_name))
    if matches:
      hint = " did you mean " + " or ".join(by_name[m] for m in matches) + "?"
  return hint


# -- the checks ----------------------------------------------------------------


def _macro_reads(value) -> Iterator[str]:
  """Names of the macros a bound value reads."""
  for v in gin_config._iterate_flattened_values(value):  # pylint: disable=protected-access
    if (isinstance(v, gin_config.ConfigurableReference)
        and v.config_key[1] == _MACRO):
      yield v.config_key[0]


def _macro_reads_by_binding(config) -> Iterator[Tuple[tuple, str, str]]:
  """((scope, selector), param, macro) for every `%macro` in a binding."""
  for key, params in config.items():
    for param, value in params.items():
      for name in _macro_reads(value):
        yield key, param, name


def _binding_name(scope: str, selector: str, param: str) -> str:
  if selector == _MACRO:
    return scope
  return f"{scope + '/' if scope else ''}{short_selector(selector)}.{param}"


def _check_macro_reads_are_set(config, sources: gin_sources.Sources):
  bound = {scope for scope, sel in config if sel == _MACRO}
  for (scope, selector), param, name in _macro_reads_by_binding(config):
    if name in bound:
      continue
    if selector == _MACRO:
      where = next(iter(s.describe() for s in sources.of_macro(scope)), scope)
    else:
      st = sources.of_parameter(scope, selector, param)
      where = st.describe() if st else _binding_name(scope, selector, param)
    raise GinConfigError(
        f"{where} reads %{name}, but no gin file or --gin.{name}=... sets it;"
        + (did_you_mean(name, bound) or " set it or fix the name"))


def _check_every_macro_is_read(config, sources: gin_sources.Sources,
                               repo_reads):
  bound = {scope for scope, sel in config if sel == _MACRO}
  # Roots: bindings of configurables, and the macros some repo file reads
  # (another entry point's run file reads them); then what those macros read.
  frontier = [name for (_, sel), _, name in _macro_reads_by_binding(config)
              if sel != _MACRO] + sorted(bound & set(repo_reads))
  read = set()
  while frontier:
    name = frontier.pop()
    if name not in read:
      read.add(name)
      frontier.extend(_macro_reads(config.get((name, _MACRO), {})))
  unread = sorted(bound - read)
  if not unread:
    return
  known = (read | set(repo_reads)) - set(unread)
  # A macro read only by unread macros is not the mistake: they are.
  read_by_unread = {r for name in unread
                    for r in _macro_reads(config[(name, _MACRO)])}
  problems = []
  for name in unread:
    if name in read_by_unread:
      continue
    where = sources.of_macro(name)
    flags = [s for s in where if s.from_flag]
    what = (flags or where)[0].describe() if where else f"the macro {name}"
    problems.append(f"{what} is not used by anything;"
                    + (_macro_suggestion(name, known)
                       or f" no gin binding reads %{name}"))
  raise GinConfigError("; ".join(problems or [
      f"the macros {', '.join(unread)} only read each other"]))


def _resolve_macros(value, config) -> Tuple[Any, List[str]]:
  """(the value behind a chain of macros, the macro names of the chain)."""
  chain = []
  while (isinstance(value, gin_config.ConfigurableReference)
         and value.config_key[1] == _MACRO
         and value.config_key in config and value.config_key[0] not in chain):
    chain.append(value.config_key[0])
    value = config[value.config_key]["value"]
  return value, chain


def _check_value_types(config, sources: gin_sources.Sources):
  registered = registered_configurables()
  for (scope, selector), params in config.items():
    configurable = registered.get(selector)
    if selector == _MACRO or configurable is None:
      continue
    hints = _annotations(configurable.wrapped)
    for param, bound in params.items():
      if param not in hints:
        continue
      annotation, default = hints[param]
      value, chain = _resolve_macros(bound, config)
      if value is None and default is None:
        continue  # `x: str = None` means Optional[str]
      if _fits(value, annotation):
        continue
      name = _binding_name(scope, selector, param)
      expected = _describe_type(annotation)
      got = f"the {type(value).__name__} {value!r}"
      if chain:
        setters = sources.of_macro(chain[-1], value)
        where = setters[0].describe() if setters else chain[-1]
        raise GinConfigError(
            f"{where}: {chain[-1]} is read by {name}, which expects "
            f"{expected}, not {got}")
      st = sources.of_parameter(scope, selector, param, value)
      where = st.describe() if st else name
      raise GinConfigError(f"{where}: {name} expects {expected}, not {got}")


def check_parsed_config(sources: gin_sources.Sources,
                        repo_reads=frozenset()):
  """Raises GinConfigError for unset or unread macros and mistyped values.

  Args:
    sources: where the bindings of the current parse were written.
    repo_reads: macros the repository's own gin files read (see module
      docstring): setting them is never an error.
  """
  config = gin_config._CONFIG  # pylint: disable=protected-access
  _check_macro_reads_are_set(config, sources)
  _check_every_macro_is_read(config, sources, repo_reads)
  _check_value_types(config, sources)


# -- types ---------------------------------------------------------------------


def _annotations(fn_or_cls) -> Dict[str, Tuple[Any, Any]]:
  """{parameter: (annotation, default)} for the annotations that resolve."""
  target = fn_or_cls.__init__ if inspect.isclass(fn_or_cls) else fn_or_cls
  try:
    hints = typing.get_type_hints(target)
  except Exception:  # pylint: disable=broad-except
    hints = {}
  module = sys.modules.get(getattr(fn_or_cls, "__module__", ""), None)
  out = {}
  for p in parameters(fn_or_cls):
    annotation = hints.get(p.name, p.annotation)
    if isinstance(annotation, str):  # unresolved forward reference
      try:
        annotation = eval(annotation, vars(module) if module else {})  # pylint: disable=eval-used
      except Exception:  # pylint: disable=broad-except
        continue
    if annotation is not p.empty:
      out[p.name] = (annotation, p.default)
  return out


def _fits(value: Any, annotation: Any) -> bool:
  """Whether a literal gin value can be passed where `annotation` is declared.

  References (anything gin builds at call time) and annotations this check
  does not understand always fit.
  """
  if isinstance(value, gin_config.ConfigurableReference):
    return True
  if annotation in (Any, object, inspect.Parameter.empty):
    return True
  if annotation is None or annotation is type(None):
    return value is None
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin is typing.Union or origin is getattr(types, "UnionType", None):
    return any(_fits(value, a) for a in args)
  if origin is typing.Literal:
    return value in args
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is str:
    return isinstance(value, str)
  if annotation in (tuple, list) or origin in (
      tuple, list, collections.abc.Sequence, collections.abc.Iterable,
      collections.abc.Collection, collections.abc.MutableSequence):
    if not isinstance(value, (tuple, list)):
      return False
    if origin is tuple and args and not (len(args) == 2 and args[1] is ...):
      return len(args) == len(value) and all(
          _fits(v, a) for v, a in zip(value, args))
    return not args or all(_fits(v, args[0]) for v in value)
  if annotation is dict or origin in (dict, collections.abc.Mapping,
                                      collections.abc.MutableMapping):
    if not isinstance(value, dict):
      return False
    if len(args) != 2:
      return True
    return all(_fits(k, args[0]) and _fits(v, args[1])
               for k, v in value.items())
  return True


def _describe_type(annotation: Any, plural: bool = False) -> str:
  """'an int', 'a float or None', "one of 'full', 'sampled'", ..."""
  names = {int: ("an int", "ints"), float: ("a float", "floats"),
           bool: ("a bool (True/False)", "bools"),
           str: ("a string (quoted)", "strings"),
           type(None): ("None", "None"), None: ("None", "None"),
           dict: ("a dict", "dicts"), tuple: ("a tuple", "tuples"),
           list: ("a list", "lists")}
  if annotation in names:
    return names[annotation][plural]
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin is typing.Union or origin is getattr(types, "UnionType", None):
    return " or ".join(_describe_type(a, plural) for a in args)
  if origin is typing.Literal:
    return "one of " + ", ".join(repr(a) for a in args)
  if origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
    return "dicts" if plural else "a dict"
  if origin is not None:
    what = "tuples or lists" if plural else "a tuple or list"
    return f"{what} of {_describe_type(args[0], True)}" if args else what
  return getattr(annotation, "__name__", str(annotation))
