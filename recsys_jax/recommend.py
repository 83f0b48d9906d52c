r"""Recommendations from an export, one-shot or as a session.

  python -m recsys_jax.recommend --export_dir=runs/x/export \
      --history="Some title; 12; #57" [--critique="..."] [--top_k=10]
  python -m recsys_jax.recommend --export_dir=runs/x/export --format=json \
      < requests.txt

Without --history every stdin line is a request ('a; b; c' or JSON
{"history": [...], "critique": "...", "top_k": 5}); a line that fails gets
a one-line error and the session goes on. See docs/RECOMMEND.md.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_string("export_dir", None,
                    "the export directory (python -m recsys_jax.export)")
flags.DEFINE_string("history", None,
                    "item ids and titles separated by ';'; without it, "
                    "requests are read from stdin, one per line")
flags.DEFINE_string("critique", None,
                    "a critique text (FLARE models with critiques only)")
flags.DEFINE_integer("top_k", 10, "items to recommend")
flags.DEFINE_bool("include_history", False,
                  "allow items of the history among the recommendations")
flags.DEFINE_enum("format", "text", ["text", "json"],
                  "answers as text, or one JSON object per line")
flags.DEFINE_string("data_dir", None,
                    "prepared dataset to read titles from (default: the "
                    "export's item_titles.json, else the run's DATA_DIR)")
flags.mark_flag_as_required("export_dir")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; the history goes as "
             "--history='a; b; c'")
  if not any(a.startswith(("-v", "--verbosity")) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines
  from recsys_jax.core import checkpoints  # pylint: disable=g-import-not-at-top
  from recsys_jax.runs import recommend_run  # pylint: disable=g-import-not-at-top
  try:
    return recommend_run.recommend(
        export_dir=FLAGS.export_dir, history=FLAGS.history,
        critique=FLAGS.critique, top_k=FLAGS.top_k,
        include_history=FLAGS.include_history, output_format=FLAGS.format,
        data_dir=FLAGS.data_dir)
  except (FileNotFoundError, checkpoints.CheckpointError, ValueError) as e:
    # What the export lacks or holds wrongly (ServingError, a titles file,
    # a text cache built otherwise): one line, no traceback.
    sys.exit(f"error: {str(e).splitlines()[0] if str(e) else repr(e)}")
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
