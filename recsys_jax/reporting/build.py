"""The whole report: runs read, every section built, one HTML page."""

import datetime
import os
from typing import Callable, List, Sequence

from recsys_jax.reporting import html
from recsys_jax.reporting import result_sections
from recsys_jax.reporting import run_data
from recsys_jax.reporting import run_sections

# (anchor, navigation title, builder) in page order.
SECTIONS: List[tuple] = [
    ("runs", "Runs", run_sections.overview_section),
    ("metrics", "Metrics", result_sections.metrics_section),
    ("beyond", "Beyond accuracy", result_sections.beyond_section),
    ("frequency", "By target frequency", result_sections.frequency_section),
    ("training", "Training curves", run_sections.training_section),
    ("validation_test", "Validation vs test",
     run_sections.validation_test_section),
    ("critiquing", "Critiquing", result_sections.critique_section),
    ("other", "Other evaluations", result_sections.other_evaluations_section),
    ("config", "Configuration", run_sections.config_section),
]


def _safe(anchor: str, title: str, build: Callable, runs) -> str:
  """A section, or a note saying why it could not be built: one unexpected
  result layout must not cost the reader the rest of the page."""
  try:
    return build(runs)
  except Exception as e:  # pylint: disable=broad-except
    return html.section(anchor, title, [html.not_available(
        f"this section failed on these runs ({type(e).__name__}: {e})")])


def render(runs: Sequence[run_data.Run], title: str = "") -> str:
  """The report page of already loaded runs."""
  title = title or "Evaluation report: " + ", ".join(r.label for r in runs)
  stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  body = [f"<h1>{html.esc(title)}</h1>",
          html.paragraph(f"recsys_jax.report, {stamp}; "
                         f"{len(runs)} run(s).", "meta"),
          html.nav([(a, t) for a, t, _ in SECTIONS])]
  body += [_safe(a, t, build, runs) for a, t, build in SECTIONS]
  return html.page(title, body)


def write_report(model_dirs: Sequence[str], output: str,
                 title: str = "") -> str:
  """Reads the runs and writes the page to `output`; returns its path.

  Raises:
    run_data.RunError: a directory is missing or has no evaluation.
  """
  runs = run_data.load_runs(model_dirs)
  page = render(runs, title)
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  with open(output, "w", encoding="utf-8") as f:
    f.write(page)
  return output
