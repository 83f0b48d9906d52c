"""The recommend run: an export answers histories (one-shot or a session).

`load_export` reads only the export (params-only checkpoint, export.json,
config.gin, item_titles.json): no training state, no input pipeline. A
Bert4Rec / SASRec-mode model is rebuilt from the architecture record of
export.json (no gin, no TensorFlow: start-up is JAX + orbax); any other
ranking model (FLARE: its text tables come from the caches its config.gin
names) through gin from the export's config.gin, as `eval` would build it.
Relative paths of that config are read from the directory the run was
trained from (MODEL_DIR's parent, inferred from export.json's
source_model_dir) when it exists, else from the working directory.

`Recommender.recommend` resolves a history (serving/catalogue.py), builds
the evaluation's inference row (serving/inference.py) and ranks all items
with the model's `score_fn`, the history excluded unless asked otherwise.
`recommend` answers one request or every line of a stream.
"""

import contextlib
import dataclasses
import importlib
import os
import sys
import time
from typing import Any, Dict, IO, List, Optional, Sequence

import gin
import jax.numpy as jnp
import numpy as np

from recsys_jax.cli import gin_utils
from recsys_jax.core import partitioning
from recsys_jax.data import prepared
from recsys_jax.model_lib import flare
from recsys_jax.model_lib import sequence
from recsys_jax.models import bert4rec
from recsys_jax.runs import restore
from recsys_jax.serving import catalogue as catalogue_lib
from recsys_jax.serving import config_text
from recsys_jax.serving import critiques as critiques_lib
from recsys_jax.serving import inference
from recsys_jax.serving import requests as requests_lib
from recsys_jax.text import item_texts

FORMATS = ("text", "json")
PROMPT = "> "


class ServingError(ValueError):
  """An export that cannot be served (one line: which file, why)."""


# -- loading -------------------------------------------------------------------


def training_root(manifest: dict, config: Optional[config_text.ConfigText]
                  ) -> Optional[str]:
  """The directory the run was trained from, when it can be inferred.

  A relative MODEL_DIR ('runs/x') resolved there gave export.json's
  absolute source_model_dir ('/repo/runs/x'), so the root is '/repo'.
  """
  source = manifest.get("source_model_dir")
  model_dir = config.macro("MODEL_DIR") if config else None
  if not source or not isinstance(model_dir, str) or os.path.isabs(
      model_dir):
    return None
  source, model_dir = os.path.normpath(source), os.path.normpath(model_dir)
  if not source.endswith(os.sep + model_dir):
    return None
  root = source[:-len(model_dir) - 1] or os.sep
  return root if os.path.isdir(root) else None


def resolve_path(path: str, root: Optional[str]) -> str:
  """`path` as the run read it: absolute, under `root`, else as given."""
  if os.path.isabs(path) or root is None:
    return path
  candidate = os.path.join(root, path)
  return candidate if os.path.exists(candidate) else path


@contextlib.contextmanager
def _working_directory(path: Optional[str]):
  if path is None or os.path.realpath(path) == os.path.realpath(os.getcwd()):
    yield
    return
  previous = os.getcwd()
  os.chdir(path)
  try:
    yield
  finally:
    os.chdir(previous)


def _compute_dtype(manifest: dict, config) -> str:
  dtype = manifest.get("compute_dtype")
  if dtype is None and config is not None:
    dtype = config.model_arg("dtype")
  return str(dtype or "float32")


def _bert4rec_from_architecture(arch: dict, dtype: str, where: str):
  """The Bert4Rec / SASRec wrapper of an architecture record."""
  fields = {k: v for k, v in arch.items() if k != "module"}
  known = {f.name for f in dataclasses.fields(bert4rec.Bert4RecConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ServingError(f"{where}: architecture fields {unknown} are unknown "
                       "to this version of Bert4RecConfig")
  config = bert4rec.Bert4RecConfig(
      **fields, dtype=getattr(jnp, dtype), dropout_rate=0.0,
      attention_dropout_rate=0.0)
  return sequence.Bert4RecModel(config)


def _model_from_gin(export_dir: str, root: Optional[str]):
  """`%MODEL` of the export's config.gin, built as `eval` builds it."""
  path = os.path.abspath(os.path.join(export_dir, "config.gin"))
  if not os.path.exists(path):
    raise ServingError(f"{export_dir}: no config.gin; this model is rebuilt "
                       "from the run's config (only Bert4Rec / SASRec "
                       "exports are rebuilt from export.json alone)")
  try:
    with _working_directory(root):
      gin_utils.parse_gin([path], [], finalize=False)
      reference = gin.query_parameter("MODEL/macro.value")
      # A macro's value is evaluated in the macro's scope (MODEL/...).
      with gin.config_scope("MODEL"):
        return reference.scoped_configurable_fn()
  except gin_utils.GinConfigError as e:
    raise ServingError(f"{path}: {e}") from e
  finally:
    gin.clear_config()


def describe_model(model) -> str:
  """'Bert4Rec (bidirectional)', 'SASRec-mode Bert4Rec (causal)', 'FLARE
  on a causal backbone', ..."""
  name = type(model).__name__
  causal = getattr(model, "causal", False)
  if name == "Bert4RecModel":
    return ("SASRec-mode Bert4Rec (causal)" if causal
            else "Bert4Rec (bidirectional)")
  if name == "FlareModel":
    return f"FLARE on a {'causal' if causal else 'bidirectional'} backbone"
  return name


def _catalogue(export_dir: str, manifest: dict, config, root: Optional[str],
               data_dir: Optional[str], num_items: int
               ) -> "tuple[catalogue_lib.Catalogue, List[str]]":
  """The titles (export's item_titles.json, else the dataset's items.jsonl)
  and the notes to show about where they came from."""
  path = os.path.join(export_dir, catalogue_lib.TITLES_FILE)
  if data_dir is None and os.path.exists(path):
    return catalogue_lib.Catalogue(
        catalogue_lib.read_titles(path, num_items), num_items), []
  notes = []
  if data_dir is None:
    notes.append(f"{export_dir} has no {catalogue_lib.TITLES_FILE} (exported "
                 "before titles were copied; export again to add it)")
    named = None
    if config is not None:
      named = config.model_arg("data_dir") or config.macro("DATA_DIR")
    if not isinstance(named, str):
      reason = "no --data_dir and config.gin names no DATA_DIR"
      notes.append(f"no titles: {reason}; give items by id")
      return catalogue_lib.Catalogue(None, num_items, reason), notes
    data_dir = resolve_path(named, root)
  items = os.path.join(data_dir, prepared.ITEMS_FILE)
  if not os.path.exists(items):
    reason = f"{items} is not there"
    notes.append(f"no titles: {reason}; give items by id or pass --data_dir")
    return catalogue_lib.Catalogue(None, num_items, reason), notes
  rows = item_texts.read_rows(data_dir)
  if len(rows) != num_items:
    raise ServingError(f"{items}: {len(rows)} items, the exported model has "
                       f"{num_items}; pass the dataset it was trained on")
  titles = [""] + [str(r.get(item_texts.TITLE) or r.get("item_id") or "")
                   for r in rows]
  notes.append(f"titles from {items}")
  return catalogue_lib.Catalogue(titles, num_items), notes


def _critique_input(model, config, root: Optional[str], where: str):
  """(CritiqueInput or None, why there is none)."""
  what = describe_model(model)
  host = getattr(model, "host_tables", None)
  if host is None:
    return None, (f"{where} holds a {what} model, which has no critique "
                  "input (only FLARE models read critiques)")
  if host.num_critiques == 0:
    return None, (f"{where} holds a {what} model trained without critiques "
                  "(no critique_text_cache)")
  cache = config.model_arg("critique_text_cache") if config else None
  if not isinstance(cache, str):
    return None, f"{where}: config.gin names no critique_text_cache"
  try:
    return critiques_lib.CritiqueInput(model, resolve_path(cache, root)), ""
  except (critiques_lib.CritiqueError, FileNotFoundError) as e:
    return None, str(e)


@dataclasses.dataclass
class LoadedExport:
  """An export ready to serve.

  Attributes:
    export_dir, manifest, step: what was loaded.
    model, params, mesh, rules: the wrapper and its (single-device) params.
    catalogue: titles and resolution.
    critiques: the FLARE critique input, or None (`no_critique` says why).
    notes: where titles came from and the like, shown at start.
    seconds: load time.
  """
  export_dir: str
  manifest: Dict[str, Any]
  step: int
  model: Any
  params: Any
  mesh: Any
  rules: Any
  catalogue: catalogue_lib.Catalogue
  critiques: Optional[critiques_lib.CritiqueInput]
  no_critique: str
  notes: List[str]
  seconds: float

  @property
  def description(self) -> str:
    return describe_model(self.model)


def load_export(export_dir: str, data_dir: Optional[str] = None
                ) -> LoadedExport:
  """Reads an export for serving (module docstring).

  Args:
    export_dir: the directory `python -m recsys_jax.export` wrote.
    data_dir: read titles from this prepared dataset instead of the
      export's item_titles.json.

  Raises:
    ServingError, FileNotFoundError, checkpoints.CheckpointError: one line.
  """
  start = time.time()
  manifest = restore.read_export_manifest(export_dir)
  where = f"the export in {export_dir}"
  if "embedding_shape" not in manifest:
    module = (manifest.get("architecture") or {}).get("module", "text")
    raise ServingError(f"{where} holds a {module} model without an item "
                       "table; recommend serves ranking models (use predict "
                       "for text models)")
  config = config_text.read(export_dir)
  root = training_root(manifest, config)
  arch = manifest.get("architecture") or {}
  if arch.get("module") == "Bert4Rec":
    model = _bert4rec_from_architecture(
        arch, _compute_dtype(manifest, config),
        os.path.join(export_dir, restore.EXPORT_MANIFEST))
  else:
    model = _model_from_gin(export_dir, root)
    if not callable(getattr(model, "score_fn", None)):
      raise ServingError(f"{where} holds a {type(model).__name__}, which "
                         "does not rank items (no score_fn)")
  mesh = inference.single_device_mesh()
  rules = partitioning.get_rules("data_parallel")
  params, step = restore.restore_params(model, None, mesh, rules,
                                        exported_dir=export_dir)
  catalogue, notes = _catalogue(export_dir, manifest, config, root, data_dir,
                                model.num_items)
  crit, no_critique = _critique_input(model, config, root, where)
  return LoadedExport(export_dir, manifest, step, model, params, mesh, rules,
                      catalogue, crit, no_critique, notes,
                      time.time() - start)


# -- answering -----------------------------------------------------------------


class Recommender:
  """Answers histories with an export's model (module docstring).

  Args:
    loaded: the export.
    compiler_options: XLA options of the scorer's compilation (see
      `inference.TopK`).
  """

  def __init__(self, loaded: LoadedExport,
               compiler_options: Optional[dict] = None):
    self.loaded = loaded
    model = loaded.model
    self.model = model
    self._top_k = inference.TopK(
        model, loaded.mesh, loaded.rules,
        with_tables=(critiques_lib.model_with_critique_table
                     if loaded.critiques is not None else None),
        compiler_options=compiler_options)

  def recommend(self, history: Sequence[requests_lib.Entry],
                critique: Optional[str] = None, top_k: int = 10,
                include_history: bool = False) -> Dict[str, Any]:
    """The answer to one request (a JSON-able dict).

    Raises:
      ValueError (catalogue.ResolveError, critiques.CritiqueError, ...):
        one line naming the entry or value at fault.
    """
    model, cat = self.model, self.loaded.catalogue
    if not 1 <= int(top_k) <= model.num_items:
      raise ValueError(f"top_k={top_k}: expected 1..{model.num_items} (the "
                       "number of items)")
    entries = requests_lib.history_entries(history)
    if not entries:
      raise ValueError("empty history: give at least one item id or title")
    resolved = [cat.resolve(e) for e in entries]
    ids = [r.item_id for r in resolved]
    notes = []
    row, mask_pos = inference.inference_row(ids, model.max_len, model.mask_id)
    if len(ids) > model.max_len - 1:
      notes.append(f"the model reads the last {model.max_len - 1} items of "
                   f"this {len(ids)}-item history (max_len {model.max_len})")
    batch = {inference.ITEM_IDS: row}
    tables = None
    crit_answer = None
    if critique is not None:
      if self.loaded.critiques is None:
        raise critiques_lib.CritiqueError(
            f"critique refused: {self.loaded.no_critique}")
      crit = self.loaded.critiques.resolve(critique)
      crit_row = np.zeros_like(row)
      # At the [MASK], where the critiquing evaluation puts it; without a
      # critique the batch is the evaluation's own (no critique ids).
      crit_row[0, mask_pos] = crit.critique_id
      batch[flare.INPUT_CRITIQUE_IDS] = crit_row
      tables = self.loaded.critiques.tables()
      notes += list(crit.notes)
      crit_answer = {"text": crit.text, "how": crit.how,
                     "id": (crit.critique_id if crit.how != "encoded"
                            else None)}
    exclude = [] if include_history else ids
    scores, items = self._top_k(self.loaded.params, batch,
                                inference.exclude_row(exclude), int(top_k),
                                tables)
    keep = np.isfinite(scores)
    if not keep.all():
      notes.append(f"only {int(keep.sum())} items are left once the "
                   "history is excluded")
    recs = [{"rank": r + 1, "id": int(i), "title": cat.title(int(i)),
             "score": round(float(s), 6)}
            for r, (s, i) in enumerate(zip(scores[keep], items[keep]))]
    return {"history": [{"id": r.item_id, "title": cat.title(r.item_id),
                         "entry": r.entry, "match": r.how} for r in resolved],
            "critique": crit_answer, "notes": notes,
            "recommendations": recs}


# -- the run -------------------------------------------------------------------


def _answer(rec: Recommender, request: requests_lib.Request, defaults: dict
            ) -> Dict[str, Any]:
  return rec.recommend(
      request.history,
      critique=(request.critique if request.critique is not None
                else defaults["critique"]),
      top_k=(request.top_k if request.top_k is not None
             else defaults["top_k"]),
      include_history=(request.include_history
                       if request.include_history is not None
                       else defaults["include_history"]))


def recommend(*, export_dir: str, history: Optional[str] = None,
              critique: Optional[str] = None, top_k: int = 10,
              include_history: bool = False, output_format: str = "text",
              data_dir: Optional[str] = None,
              stdin: Optional[IO[str]] = None,
              stdout: Optional[IO[str]] = None,
              stderr: Optional[IO[str]] = None) -> int:
  """Answers `history` (one-shot) or every line of `stdin`; the exit status.

  Args:
    export_dir: an export directory.
    history: 'a; b; c' (ids and titles); None: read requests from `stdin`,
      one per line (serving/requests.py), until its end.
    critique, top_k, include_history: the defaults of every request.
    output_format: 'text' or 'json' (one JSON object per answer).
    data_dir: titles from this prepared dataset (else the export's).
    stdin, stdout, stderr: the streams (default sys's); a prompt goes to
      stderr when stdin is a terminal.

  Returns:
    0 when every request was answered, 1 otherwise (errors are one line
    each: on stderr, and as {"error": ...} answers in JSON format).
  """
  stdin = stdin or sys.stdin
  stdout = stdout or sys.stdout
  stderr = stderr or sys.stderr
  if output_format not in FORMATS:
    raise ValueError(f"--format={output_format!r}: expected one of {FORMATS}")
  loaded = load_export(export_dir, data_dir)
  rec = Recommender(loaded)
  print(f"Loaded {loaded.description} ({loaded.model.num_items} items, step "
        f"{loaded.step}) from {export_dir} in {loaded.seconds:.1f} s",
        file=stderr, flush=True)
  for note in loaded.notes:
    print(f"note: {note}", file=stderr, flush=True)
  defaults = {"critique": critique, "top_k": top_k,
              "include_history": include_history}

  emitted = [0]

  def emit(answer):
    if output_format == "json":
      text = requests_lib.format_json(answer)
    else:  # readable blocks, a blank line between answers
      text = ("\n" if emitted[0] else "") + requests_lib.format_text(answer)
    emitted[0] += 1
    print(text, file=stdout, flush=True)

  def fail(message: str, line: Optional[int]):
    where = f"line {line}: " if line is not None else ""
    print(f"error: {where}{message}", file=stderr, flush=True)
    if output_format == "json":
      emit(requests_lib.error_answer(message, line))

  if history is not None:
    try:
      emit(_answer(rec, requests_lib.Request(
          requests_lib.split_history(history)), defaults))
      return 0
    except ValueError as e:
      fail(str(e), None)
      return 1
  interactive = stdin.isatty()
  # A terminal on both ends: input() with line editing and history.
  editing = interactive and stdin is sys.stdin and stdout is sys.stdout and (
      stdout.isatty())
  if editing:
    try:
      importlib.import_module("readline")  # line editing for input()
    except ImportError:
      pass
  if interactive:
    print("One history per line ('title; 12; #57' or JSON {\"history\": "
          "[...], \"critique\": ..., \"top_k\": ...}); Ctrl-D ends.",
          file=stderr, flush=True)
  failed = False
  number = 0
  while True:
    if editing:
      try:
        line = input(PROMPT) + "\n"
      except EOFError:
        line = ""
    else:
      if interactive:
        print(PROMPT, end="", file=stderr, flush=True)
      line = stdin.readline()
    if not line:
      break
    number += 1
    try:
      request = requests_lib.parse_line(line)
      if request is None:
        continue
      emit(_answer(rec, request, defaults))
    except ValueError as e:
      failed = True
      fail(str(e), number)
  if interactive:
    print(file=stderr)
  return 1 if failed else 0
