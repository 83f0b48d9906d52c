"""Serving an exported ranking model: `python -m recsys_jax.recommend`.

`config_text` reads values of an export's config.gin without importing what
it names; `catalogue` resolves titles and ids; `inference` builds the
model's inference rows and the jitted top-k; `critiques` turns critique
texts into rows of a FLARE model's critique table; `requests` parses and
formats the session's lines. `runs/recommend_run.py` puts them together.
Nothing here imports TensorFlow or SeqIO (the FLARE encoder, only when a
free-text critique asks for it).
"""
