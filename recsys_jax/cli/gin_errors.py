"""gin parse errors explained in one line: where (flag, or file and line),
what is wrong, and the closest known names."""

import re
import tokenize
from typing import Optional, Sequence, Tuple

from gin import config as gin_config

from recsys_jax.cli import gin_checks
from recsys_jax.cli import gin_sources

_LOCATION = re.compile(
    r'\n\s*In (?:file "(?P<file>[^"]*)", line (?P<line>\d+)|bindings string '
    r"line (?P<bline>\d+))\n\s*(?P<text>[^\n]*)")
_NO_PARAMETER = re.compile(
    r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")
_NO_CONFIGURABLE = re.compile(
    r"No configurable matching (?:reference )?'@?([^'()]+)(?:\(\))?'")
_NOT_FOUND = re.compile(r"Unable to open file: (.*?)\. Searched config paths")
_NO_ATTRIBUTE = re.compile(
    r"Couldn't resolve selector (\S+); <module '([^']+)'.*has no attribute "
    r"(\w+)", re.S)
_NOT_IMPORTED = re.compile(r"'(\w+)' was not provided by an import statement")
_BAD_TOKEN = re.compile(r"Failed to parse token '(.*)'", re.S)


def _known_selectors():
  return {gin_checks.short_selector(s)
          for s in gin_checks.registered_configurables()}


def _first_line(text: str) -> str:
  return (text.strip().splitlines() or [""])[0].strip()


def _explain_message(err: Exception, flag_name: Optional[str] = None,
                     value: Optional[str] = None) -> str:
  """The body of a parse error: what is wrong and the closest known names.

  Args:
    err: what gin raised.
    flag_name, value: `--gin.NAME` and VALUE of the flag being parsed, if any.
  """
  msg = str(err.msg if isinstance(err, SyntaxError) else err)
  m = _NO_PARAMETER.search(msg)
  if m:
    selector, param = m.groups()
    configurable = gin_config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
    names = ([p.name for p in gin_checks.parameters(configurable.wrapped)]
             if configurable else [])
    hint = gin_checks.did_you_mean(param, names)
    return (f"{selector} has no parameter {param!r};" + hint if hint else
            f"{selector} has no parameter {param!r} (its parameters: "
            f"{', '.join(names)})")
  m = _NO_CONFIGURABLE.search(msg)
  if m:
    selector = m.group(1).rsplit("/", 1)[-1]
    known = _known_selectors()
    return (f"no configurable named {selector};"
            + (gin_checks.did_you_mean(selector, known)
               or f" known: {', '.join(sorted(known))}"))
  m = _BAD_TOKEN.search(msg)
  if m:
    token = value if value is not None else m.group(1)
    quote = ""
    if re.fullmatch(r"[\w./:~-]+", token):
      quote = (f" (strings need quotes: {flag_name}=\"'{token}'\")"
               if flag_name else f" (strings need quotes: '{token}')")
    return (f"{token} is not a value gin can read: expected a Python "
            "literal (5, 1e-3, True, None, 'text', (1, 2)), a %MACRO or an "
            f"@configurable(){quote}")
  if isinstance(err, tokenize.TokenError):
    return "unbalanced brackets or quotes"
  m = _NOT_FOUND.search(msg)
  if m:
    return f"no gin file {m.group(1)}"
  m = _NO_ATTRIBUTE.search(msg)
  if m:
    return f"{m.group(2)} has no attribute {m.group(3)}"
  m = _NOT_IMPORTED.search(msg)
  if m:
    return f"{m.group(1)} is not imported in this file"
  if isinstance(err, ImportError):
    return f"cannot import: {_first_line(msg)}"
  return _first_line(_LOCATION.split(msg)[0] if _LOCATION.search(msg) else msg)


def _written_selector(line: str) -> str:
  """'trainer.OptimizerConfig' of 'trainer.OptimizerConfig.lr = 1' or of a
  block header 'trainer.OptimizerConfig:'."""
  key = re.split(r"[=:]", line, maxsplit=1)[0].strip().rsplit("/", 1)[-1]
  return key if line.rstrip().endswith(":") else key.rsplit(".", 1)[0]


def _unbalanced_file(files_read: Sequence[str]) -> Optional[Tuple[str, int]]:
  """(path, line) of the first statement that a read file never closes."""
  for path in files_read:
    try:
      with open(path) as f:
        for _ in tokenize.generate_tokens(f.readline):
          pass
    except tokenize.TokenError as e:
      return path, e.args[1][0] if len(e.args) > 1 else 0
    except (OSError, SyntaxError):
      continue
  return None


def explain_parse_error(err: Exception, flag: Optional[str] = None,
                        files_read: Sequence[str] = ()) -> str:
  """One line: where a parse error happened (flag, or file and line), and why.

  Args:
    err: what gin raised while parsing.
    flag: the flag that was being parsed (None: a file was being parsed; gin
      names the file and line in the error).
    files_read: the files gin opened so far (to place a tokenizer error,
      which gin reports without a file).
  """
  if flag is not None:
    m = re.fullmatch(r"(--gin\.[^=]+)=(.*)", flag, re.S)
    body = _explain_message(err, *(m.groups() if m else ()))
    return f"{flag}: {body}"
  body = _explain_message(err)
  if isinstance(err, SyntaxError) and err.filename:
    where = gin_sources.display_path(err.filename)
    return f"{(err.text or '').strip()!r} ({where}, line {err.lineno}): {body}"
  if isinstance(err, tokenize.TokenError):
    where = _unbalanced_file(files_read)
    if where:
      return (f"{gin_sources.display_path(where[0])}: {body} (the file ends "
              "inside a statement)")
  m = _LOCATION.search(str(err))
  if m and m.group("file"):
    line = m.group("text").strip()
    if isinstance(err, (NameError, AttributeError)):
      known = _known_selectors()
      hint = gin_checks.did_you_mean(_written_selector(line), known)
      body = f"{body.rstrip('.')};{hint}" if hint else body
    return (f"{line!r} ({gin_sources.display_path(m.group('file'))}, "
            f"line {m.group('line')}): {body}")
  return body
