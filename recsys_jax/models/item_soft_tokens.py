"""REGEN's item soft tokens: frozen item embeddings -> adapter -> LM inputs.

Sayana et al. (2024), "Beyond Retrieval: Generating Narratives in
Conversational Recommender Systems": each history item enters the LM as
soft tokens made from its collaborative (CF) and semantic (text) embeddings:

  e_cf  = cf[item]        (or the learned `cf_missing` vector)     [dc]
  e_sem = semantic[item]  (or the learned `semantic_missing`)      [ds]
  x     = [e_cf / |e_cf| ; e_sem / |e_sem|]        (normalize=True)
  soft  = adapter(x)                                            [k * d_model]
        -> k tokens of d_model per item

Ablations choose the sources: 'fused' (both), 'cf', 'semantic'. The adapter
is 'linear' (one dense map of x, written as one kernel per source plus one
bias: W x + b = W_cf x_cf + W_sem x_sem + b, which `contributions` reads for
the paper's soft-token contribution analysis) or 'mlp' (per-source kernels
into `mlp_dim`, GELU, dropout, dense to k * d_model).

The tables (`model_lib.item_embeddings.ItemTables`, row = item vocabulary
id) are constants gathered with `jnp.take`, never parameters. The module
reads `history_items` `[B, H]` (0 = padding) and, with `next_item=True`,
`next_item` `[B, 1]` (0 = none), whose tokens get a learned `next_marker`
added. It returns `(embeds [B, S, d_model], mask [B, S])` with
S = (H + 1 if next_item else H) * k; masked tokens are zeros.

Kernel initialisation: the normalised source vectors have unit norm, so a
N(0, 1 / num_sources) kernel per source gives soft-token coordinates of
variance ~1 at initialisation, the scale of T5's N(0, 1) token embeddings.
"""

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.models import layers

Array = jax.Array

HISTORY_ITEMS = "history_items"
NEXT_ITEM = "next_item"
SOURCES = ("fused", "cf", "semantic")
ADAPTERS = ("linear", "mlp")
# Added inside the square root of normalisation: zero vectors stay finite
# (value and gradient).
NORM_EPS = 1e-12
HISTOGRAM_BINS = 20


@dataclasses.dataclass(frozen=True)
class ItemSoftTokensConfig:
  """Hyperparameters of `ItemSoftTokens`.

  Attributes:
    d_model: the LM's embedding width.
    sources: 'fused' (CF and semantic), 'cf' or 'semantic'.
    adapter: 'linear' or 'mlp'.
    mlp_dim: hidden width of the 'mlp' adapter.
    tokens_per_item: k, soft tokens per item.
    normalize: L2-normalise each source vector before concatenation.
    dropout_rate: dropout on the 'mlp' adapter's hidden layer.
    next_item: also emit `next_item`'s tokens (+ a learned marker).
    items_feature: the batch feature of the items, `[B, H]` (REGEN:
      `history_items`; CoLLM's baseline in ILM's slots: `slot_items`).
    dtype: compute dtype name ('float32', 'bfloat16'); params are float32.
  """
  d_model: int
  sources: str = "fused"
  adapter: str = "linear"
  mlp_dim: int = 512
  tokens_per_item: int = 1
  normalize: bool = True
  dropout_rate: float = 0.0
  next_item: bool = False
  items_feature: str = HISTORY_ITEMS
  dtype: str = "float32"

  def __post_init__(self):
    if self.sources not in SOURCES:
      raise ValueError(f"ItemSoftTokensConfig.sources={self.sources!r}: "
                       f"expected one of {SOURCES}")
    if self.adapter not in ADAPTERS:
      raise ValueError(f"ItemSoftTokensConfig.adapter={self.adapter!r}: "
                       f"expected one of {ADAPTERS}")
    for name in ("d_model", "mlp_dim", "tokens_per_item"):
      value = getattr(self, name)
      if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"ItemSoftTokensConfig.{name}={value!r}: expected a "
                         "positive integer")
    if not 0.0 <= float(self.dropout_rate) < 1.0:
      raise ValueError(f"ItemSoftTokensConfig.dropout_rate="
                       f"{self.dropout_rate!r}: expected 0 <= rate < 1")
    try:
      jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"ItemSoftTokensConfig.dtype={self.dtype!r}: not a "
                       "dtype name (e.g. 'float32', 'bfloat16')") from e

  def architecture_record(self) -> Dict[str, Any]:
    """The fields, `items_feature` left out at its default (checkpoints
    written before it existed keep their architecture)."""
    record = dataclasses.asdict(self)
    if record["items_feature"] == HISTORY_ITEMS:
      del record["items_feature"]
    return record

  @property
  def used_sources(self) -> tuple:
    """('cf', 'semantic'), ('cf',) or ('semantic',)."""
    return used_sources(self.sources)


def used_sources(sources: str) -> tuple:
  """The tables a `sources` setting reads: ('cf', 'semantic') for 'fused'."""
  return ("cf", "semantic") if sources == "fused" else (sources,)


def check_tables(config, tables) -> None:
  """Raises ValueError when `tables` lack a source `config` reads.

  `config`: any config with `sources` and `used_sources` (this module's,
  LANCER's `LancerConfig`); the error names its class.
  """
  for source in config.used_sources:
    if np.shape(getattr(tables, source))[1] == 0:
      hint = ("fit or load a CF table (load_item_tables cf='als' or an "
              "export)" if source == "cf" else
              "pass an item-text cache (load_item_tables item_text_cache=)")
      raise ValueError(f"{type(config).__name__}.sources={config.sources!r} "
                       f"reads the {source} table, which is empty "
                       f"(shape {np.shape(getattr(tables, source))}): {hint}")


def _normalize(x, xp=jnp, eps: float = NORM_EPS):
  """`x / |x|` over the last axis (`xp`: jnp or np), finite (value and
  gradient) at 0."""
  return x / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True) + eps)


def _source_init(num_sources: int):
  return nn.initializers.normal(stddev=float(1.0 / np.sqrt(num_sources)))


# Logical axes of each source's input width ('text_embed' as the Perceiver's
# text input; the CF width has no name of its own and is never sharded).
_INPUT_AXIS = {"cf": None, "semantic": "text_embed"}


def source_vectors(module: nn.Module, tables, ids: Array, *, sources: str,
                   normalize: bool) -> Dict[str, Array]:
  """Per source of `sources`: the frozen rows of item ids `[...]`,
  `[..., d_s]` float32, normalised when `normalize`.

  An item the table misses (its `*_missing` flag) or an id outside the
  table reads the learned vector `<source>_missing`, a parameter of
  `module` (call this from its compact method: ItemSoftTokens, LANCER's
  reasoning prompt).
  """
  num_rows = int(np.shape(tables.cf)[0])
  in_range = (ids >= 0) & (ids < num_rows)
  idx = jnp.where(in_range, ids, 0).astype(jnp.int32)
  out = {}
  for source in used_sources(sources):
    table = jnp.asarray(getattr(tables, source), jnp.float32)
    missing = jnp.take(jnp.asarray(getattr(tables, f"{source}_missing"), bool),
                       idx, axis=0) | ~in_range
    learned = module.param(
        f"{source}_missing",
        layers.logical(layers.default_kernel_init, (_INPUT_AXIS[source],)),
        (table.shape[1],), jnp.float32)
    x = jnp.where(missing[..., None], learned, jnp.take(table, idx, axis=0))
    out[source] = _normalize(x) if normalize else x
  return out


class ItemSoftTokens(nn.Module):
  """`batch -> (embeds [B, S, d_model], mask [B, S])` (module docstring)."""
  config: ItemSoftTokensConfig
  tables: Any  # model_lib.item_embeddings.ItemTables (frozen constants)

  def _source_vectors(self, ids: Array) -> Dict[str, Array]:
    """Per used source: `[..., d_s]` float32 rows (`source_vectors`)."""
    cfg = self.config
    return source_vectors(self, self.tables, ids, sources=cfg.sources,
                          normalize=cfg.normalize)

  def _adapter(self, vectors: Mapping[str, Array], deterministic: bool
               ) -> Array:
    """Per-source kernels summed (+ bias), then the MLP's second layer."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    k_d = cfg.tokens_per_item * cfg.d_model
    width = k_d if cfg.adapter == "linear" else cfg.mlp_dim
    out_axis = "embed" if cfg.adapter == "linear" else "mlp"
    init = _source_init(len(vectors))
    lead = next(iter(vectors.values())).shape[:-1]
    h = 0.0
    for source, x in vectors.items():
      proj = layers.dense(width, (_INPUT_AXIS[source], out_axis),
                          dtype=dtype, use_bias=False, init=init,
                          name=f"{source}_proj")
      h = h + proj(x.reshape(-1, x.shape[-1]))  # 2-D (layers.matmul_2d)
    bias = self.param("bias" if cfg.adapter == "linear" else "hidden_bias",
                      layers.logical(nn.initializers.zeros, (out_axis,)),
                      (width,), jnp.float32)
    h = h + bias.astype(dtype)
    if cfg.adapter == "mlp":
      h = layers.gelu(h)
      h = layers.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
      h = layers.dense(
          k_d, ("mlp", "embed"), dtype=dtype,
          init=nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
          name="output")(h)
    return h.reshape(lead + (cfg.tokens_per_item, cfg.d_model))

  def _item_tokens(self, ids: Array, deterministic: bool) -> Array:
    """`[..., k, d_model]` soft tokens of item ids `[...]` (unmasked)."""
    return self._adapter(self._source_vectors(ids), deterministic)

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], *,
               deterministic: bool = True):
    """Soft tokens of the batch's history (and next) items.

    Args:
      batch: `history_items` `[B, H]` int (0 = padding), and `next_item`
        `[B, 1]` (or `[B]`) int (0 = none) when `config.next_item`.
      deterministic: False applies the MLP adapter's dropout (needs a
        'dropout' rng).

    Returns:
      (embeds `[B, S, d_model]` in the compute dtype, mask `[B, S]` bool),
      S = (H + next_item) * k; item h's tokens are positions h*k..h*k+k-1.
    """
    cfg = self.config
    check_tables(cfg, self.tables)
    feature = cfg.items_feature
    if feature not in batch:
      raise KeyError(f"ItemSoftTokens reads batch[{feature!r}] "
                     f"([batch, H] item ids); got features {sorted(batch)}")
    ids = jnp.asarray(batch[feature])
    if ids.ndim != 2:
      raise ValueError(f"batch[{feature!r}]: expected [batch, H] item "
                       f"ids, got shape {ids.shape}")
    if cfg.next_item:
      if NEXT_ITEM not in batch:
        raise KeyError(f"ItemSoftTokensConfig.next_item=True reads batch["
                       f"{NEXT_ITEM!r}] ([batch, 1]); got features "
                       f"{sorted(batch)}")
      nxt = jnp.asarray(batch[NEXT_ITEM]).reshape(ids.shape[0], -1)
      if nxt.shape[1] != 1:
        raise ValueError(f"batch[{NEXT_ITEM!r}]: expected [batch, 1], got "
                         f"{jnp.shape(batch[NEXT_ITEM])}")
      ids = jnp.concatenate([ids, nxt.astype(ids.dtype)], axis=1)
    b, n = ids.shape
    k = cfg.tokens_per_item
    tokens = self._item_tokens(ids, deterministic)  # [B, n, k, d]
    if cfg.next_item:
      marker = self.param("next_marker",
                          layers.logical(layers.default_kernel_init,
                                         ("embed",)),
                          (cfg.d_model,), jnp.float32)
      is_next = (jnp.arange(n) == n - 1)[None, :, None, None]
      tokens = tokens + jnp.where(is_next, marker.astype(tokens.dtype), 0)
    mask = jnp.repeat(ids > 0, k, axis=1)                      # [B, n*k]
    embeds = tokens.reshape(b, n * k, cfg.d_model)
    embeds = jnp.where(mask[..., None], embeds, 0).astype(embeds.dtype)
    return embeds, mask


# -- contribution analysis -----------------------------------------------------


def contributions(params, config: ItemSoftTokensConfig, tables,
                  item_ids) -> Dict[str, np.ndarray]:
  """Each source's share of the linear adapter's soft tokens (REGEN's
  soft-token contribution analysis).

  Per item and soft token j: `cf_norm = |x_cf W_cf[:, j]|`,
  `semantic_norm = |x_sem W_sem[:, j]|` (x as the module builds it: learned
  vector where missing, normalised when configured; the bias left out) and
  `cf_share = cf_norm / (cf_norm + semantic_norm)` (NaN where both are 0).

  Args:
    params: the module's params (boxed or not).
    config: its config (adapter 'linear').
    tables: its `ItemTables`.
    item_ids: item vocabulary ids, any shape `[...]`.

  Returns:
    NumPy arrays: 'item_ids' `[...]`, 'cf_norm', 'semantic_norm', 'cf_share'
    `[..., k]`, 'cf_missing', 'semantic_missing' `[...]` bool.
  """
  if config.adapter != "linear":
    raise ValueError(
        f"contributions: adapter={config.adapter!r}; the per-source "
        "contribution is defined for the linear adapter only (an MLP mixes "
        "the sources non-linearly)")
  params = nn.meta.unbox(params)
  ids = np.asarray(item_ids, np.int64)
  num_rows = int(np.shape(tables.cf)[0])
  in_range = (ids >= 0) & (ids < num_rows)
  idx = np.where(in_range, ids, 0)
  k = config.tokens_per_item
  out = {"item_ids": ids}
  for source in ("cf", "semantic"):
    missing = np.asarray(getattr(tables, f"{source}_missing"), bool)[idx]
    missing |= ~in_range
    out[f"{source}_missing"] = missing
    if source not in config.used_sources:
      out[f"{source}_norm"] = np.zeros(ids.shape + (k,), np.float32)
      continue
    table = np.asarray(getattr(tables, source), np.float32)
    learned = np.asarray(params[f"{source}_missing"], np.float32)
    x = np.where(missing[..., None], learned, table[idx])
    if config.normalize:
      x = _normalize(x, np)
    kernel = np.asarray(params[f"{source}_proj"]["kernel"], np.float32)
    y = (x @ kernel).reshape(ids.shape + (k, config.d_model))
    out[f"{source}_norm"] = np.linalg.norm(y, axis=-1)
  total = out["cf_norm"] + out["semantic_norm"]
  with np.errstate(invalid="ignore", divide="ignore"):
    out["cf_share"] = np.where(total > 0, out["cf_norm"] / total, np.nan)
  return out


def _stats(values: np.ndarray) -> Dict[str, Optional[float]]:
  v = values[np.isfinite(values)]
  if not len(v):
    return {"count": 0}
  q25, median, q75 = np.percentile(v, [25, 50, 75])
  return {"count": int(len(v)), "mean": float(np.mean(v)),
          "median": float(median), "q25": float(q25), "q75": float(q75),
          "min": float(np.min(v)), "max": float(np.max(v))}


def write_contribution_report(result: Mapping[str, np.ndarray], out_dir: str
                              ) -> Dict[str, Optional[str]]:
  """Writes `contributions.json` (and `cf_share_hist.png`) under `out_dir`.

  The JSON holds summary numbers of cf_share (count, mean, median,
  quartiles, min, max; a 20-bin histogram over [0, 1]), per soft token and
  over all, of cf_norm and semantic_norm, and the missing counts. The PNG
  needs matplotlib; without it the JSON's 'png' field says why none was
  written.

  Returns:
    {'json': path, 'png': path or None}.
  """
  os.makedirs(out_dir, exist_ok=True)
  share = np.asarray(result["cf_share"], np.float64)
  k = share.shape[-1]
  flat = share.reshape(-1)
  finite = flat[np.isfinite(flat)]
  counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
  report: Dict[str, Any] = {
      "num_items": int(np.size(result["item_ids"])),
      "tokens_per_item": int(k),
      "cf_share": dict(_stats(flat), undefined=int(np.sum(~np.isfinite(
          flat)))),
      "cf_share_histogram": {"bin_edges": [float(e) for e in edges],
                             "counts": [int(c) for c in counts]},
      "cf_share_per_token": [_stats(share[..., j].reshape(-1))
                             for j in range(k)],
      "cf_norm": _stats(np.asarray(result["cf_norm"]).reshape(-1)),
      "semantic_norm": _stats(np.asarray(result["semantic_norm"]
                                         ).reshape(-1)),
      "cf_missing": int(np.sum(result["cf_missing"])),
      "semantic_missing": int(np.sum(result["semantic_missing"])),
  }
  png_path = os.path.join(out_dir, "cf_share_hist.png")
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    png_path = None
    report["png"] = f"no PNG: matplotlib is not importable ({e})"
  else:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(finite, bins=edges)
    ax.set_xlabel("CF share of soft-token norm")
    ax.set_ylabel("item soft tokens")
    ax.set_title("Item soft tokens: CF vs semantic contribution")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    report["png"] = os.path.basename(png_path)
  json_path = os.path.join(out_dir, "contributions.json")
  with open(json_path, "w") as f:
    json.dump(report, f, indent=2)
  return {"json": json_path, "png": png_path}
