"""The model bundle: one directory holding everything serving needs, and the recommender over it.

Layout (written by the train, layer and evaluate stages; read by serving and the gate)::

    model.safetensors  architecture.json  item_ids.json     # weights (safetensors only)
    items.parquet                                           # item_id, title, genres, popularity, layer
    layers/layers.json  layers/assignments.parquet  layers/centroids.safetensors
    config.json  lineage.json  metrics.json                 # lineage beside the weights

The library keeps this free of BentoML and Feast: the service passes in the features it
read, and the recommender answers from them.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from stratarec.atomic import write_json_atomic, write_parquet_atomic
from stratarec.layering import InterestLayers
from stratarec.model.sequential import InferenceScorer, SequentialRecommender, load_model
from stratarec.schema import GENRES, ITEM_ID, ITEM_POPULARITY, LAYER_COARSE, LAYER_NAME, TITLE, USER_ID
from stratarec.sequences import ItemIndex
from stratarec.training import ITEM_IDS_FILE, ModelScorer

ITEMS_FILE = "items.parquet"
LAYERS_DIR = "layers"
LINEAGE_FILE = "lineage.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
ITEM_LAYER = "layer"
_NEXT_REASON = "next in your sequence; serves the '{layer_name}' layer"
_NEW_ITEM_REASON = "discovery: new in the catalogue, no interactions yet"
_RARE_ITEM_REASON = "discovery: only {count} interactions so far"
_NO_ROWS = np.zeros(0, dtype=np.int64)
_COLD_CACHE_SIZE = 4096  # distinct (k, layer) cold-start answers kept


class StateCache:
    """A bounded LRU map from a history (its last model-visible item rows) to its user state.

    The transformer pass is most of a warm answer's CPU, and it is a pure function of the
    rows it sees: a user whose features did not change since the last request (the usual
    case between materializations: page reloads, pagination, several widgets) gets the same
    state back without running the network again. Keys are the exact rows, so a new event
    in the user's sequence is a new key, never a stale answer. Thread-safe.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._data: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        """The cached state of each key, or None; hits become the most recently used."""
        out: list[torch.Tensor | None] = []
        with self._lock:
            for key in keys:
                state = self._data.get(key)
                if state is not None:
                    self._data.move_to_end(key)
                out.append(state)
            found = sum(s is not None for s in out)
            self.hits += found
            self.misses += len(out) - found
        return out

    def put_many(self, keys: Sequence[bytes], states: torch.Tensor) -> None:
        """Store (len(keys), d) states, evicting the least recently used past capacity."""
        with self._lock:
            for key, state in zip(keys, states, strict=True):
                self._data[key] = state
                self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def stats(self) -> dict[str, int]:
        """Entries, capacity, hits and misses so far."""
        with self._lock:
            return {"entries": len(self._data), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}


@dataclass(frozen=True)
class Recommendation:
    """One recommended item and why it was chosen."""

    item_id: int
    title: str
    score: float
    layer: int
    layer_name: str
    reason: str


def save_layers(directory: Path, layers: InterestLayers) -> None:
    """Store a layering inside a bundle directory."""
    d = Path(directory) / LAYERS_DIR
    d.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(layers.assignments, d / "assignments.parquet")
    write_json_atomic(d / "layers.json", layers.layers.to_dict(orient="records"))
    tmp = d / "centroids.safetensors.tmp"
    save_numpy({"coarse_centroids": layers.coarse_centroids.astype(np.float32), "item_layer": layers.item_layer}, str(tmp))
    tmp.replace(d / "centroids.safetensors")


def load_layers(directory: Path) -> InterestLayers | None:
    """Read a layering back, or None when the bundle has not been layered yet."""
    d = Path(directory) / LAYERS_DIR
    if not (d / "layers.json").exists():
        return None
    arrays = load_numpy(str(d / "centroids.safetensors"))
    return InterestLayers(
        assignments=pd.read_parquet(d / "assignments.parquet"),
        layers=pd.DataFrame(json.loads((d / "layers.json").read_text())),
        coarse_centroids=arrays["coarse_centroids"],
        item_layer=arrays["item_layer"],
    )


class RecommenderBundle:
    """A loaded bundle: model, catalogue and layers, ready to answer requests.

    Thread-safe for concurrent readers. Requests are scored by an
    :class:`~stratarec.model.sequential.InferenceScorer` built once at load (item table,
    embedding norm and logits weight precomputed; read-only, so threads need no lock unless
    it falls back to the Hugging Face encoder); what an answer shows per item (id, title,
    layer, reason) is precomputed too. :attr:`scorer` (a :class:`ModelScorer`) stays for
    evaluation, which scores whole catalogues in large batches.
    """

    def __init__(self, directory: Path, device: str = "cpu", state_cache_size: int = 0, discovery_max_events: int = 5) -> None:
        """Load a bundle directory.

        Args:
            directory: The bundle folder.
            device: Torch device for the evaluation scorer.
            state_cache_size: User states kept by :class:`StateCache` for serving (0: none).
            discovery_max_events: Items with at most this many training events may fill
                discovery slots (:meth:`recommend_rows`).
        """
        self.directory = Path(directory)
        self.model: SequentialRecommender = load_model(self.directory, device)
        ids = json.loads((self.directory / ITEM_IDS_FILE).read_text())
        self.index = ItemIndex(np.asarray(ids, dtype=np.int64))
        self.items = pd.read_parquet(self.directory / ITEMS_FILE).set_index(ITEM_ID).loc[self.index.item_ids].reset_index()
        self.titles = self.items[TITLE].astype(str).to_numpy()
        self.popularity = (
            self.items[ITEM_POPULARITY].to_numpy(dtype=np.float64) if ITEM_POPULARITY in self.items else np.zeros(len(self.index))
        )
        self.layers = load_layers(self.directory)
        if self.layers is not None:
            self.item_layer = self.layers.item_layer[1:]
            coarse = self.layers.layers[self.layers.layers.level == "coarse"].set_index("layer")
            self.layer_names = {int(k): str(v) for k, v in coarse["name"].items()}
            self.layer_popular = {int(k): [int(i) for i in v] for k, v in coarse["popular_items"].items()}
            self.user_layer = dict(
                zip(self.layers.assignments[USER_ID].astype(int), self.layers.assignments[LAYER_COARSE].astype(int), strict=True)
            )
        else:
            self.item_layer = np.full(len(self.index), -1)
            self.layer_names, self.layer_popular, self.user_layer = {}, {}, {}
        self.scorer = ModelScorer(self.model, device)
        self.fast = InferenceScorer(self.model)
        self.state_cache = StateCache(state_cache_size) if state_cache_size > 0 else None
        self._lock = threading.Lock()  # the Hugging Face encoder paths (bidirectional scoring)
        self.lineage = json.loads((self.directory / LINEAGE_FILE).read_text()) if (self.directory / LINEAGE_FILE).exists() else {}
        # What an answer shows per item, as Python objects, in column order (column = row - 1).
        self._item_ids = self.index.item_ids.tolist()
        self._titles = [str(t) for t in self.titles]
        self._layers = [int(x) for x in self.item_layer]
        self._layer_label = [self.layer_names.get(layer, "") for layer in self._layers]
        self._reasons: dict[str, list[str]] = {}  # reason template -> text per column
        self._log_popularity = np.log1p(self.popularity)
        # Discovery candidates (columns): items the model has seen at most this often, whose
        # score leans on their text rows rather than on their own events.
        self.discovery_max_events = discovery_max_events
        self._discovery_cols = np.flatnonzero(self.popularity <= discovery_max_events)
        self._cold_cache: dict[tuple[int, int | None], tuple[Recommendation, ...]] = {}
        with torch.inference_mode():
            self._unit_items = torch.nn.functional.normalize(self.fast.logit_table.float(), dim=1)

    @property
    def n_items(self) -> int:
        """Catalogue size."""
        return len(self.index)

    def history_rows(self, item_ids: Sequence[int] | np.ndarray | None) -> np.ndarray:
        """Model rows of the known items among ``item_ids`` (order kept, unknown ids dropped)."""
        if item_ids is None or not len(item_ids):
            return _NO_ROWS
        rows = self.index.to_index(np.asarray(item_ids, dtype=np.int64))
        return rows[rows > 0]

    _rows = history_rows

    def _pick(self, scores: np.ndarray, exclude_rows: np.ndarray, k: int, diversify: bool) -> np.ndarray:
        """Indices (0-based columns) of the top-k, optionally round-robin across layers."""
        s = scores.astype(np.float64)  # a copy: the caller's scores are not changed
        s[exclude_rows - 1] = -np.inf
        k = min(k, int(np.isfinite(s).sum()))
        if k <= 0:
            return np.zeros(0, np.int64)
        if not diversify or self.layers is None:
            top = np.argpartition(-s, k - 1)[:k]
            return top[np.argsort(-s[top])]
        # Diversify: take each layer's best items in turn, so one dominant layer cannot
        # fill the whole list; score order is kept within a layer.
        pool = np.argpartition(-s, min(len(s) - 1, 5 * k))[: 5 * k]
        pool = pool[np.argsort(-s[pool])]
        pool = pool[np.isfinite(s[pool])]
        by_layer: dict[int, list[int]] = {}
        for col in pool.tolist():
            by_layer.setdefault(self._layers[col], []).append(col)
        picked: list[int] = []
        queues = sorted(by_layer.values(), key=lambda q: -s[q[0]])
        while len(picked) < k and any(queues):
            for q in queues:
                if q and len(picked) < k:
                    picked.append(q.pop(0))
        return np.asarray(picked, dtype=np.int64)

    def _reason_texts(self, reason: str) -> list[str]:
        texts = self._reasons.get(reason)
        if texts is None:
            by_layer = {layer: reason.format(layer_name=self.layer_names.get(layer, "all users")) for layer in set(self._layers)}
            texts = self._reasons[reason] = [by_layer[layer] for layer in self._layers]
        return texts

    def _explain(self, cols: np.ndarray, scores: np.ndarray, reason: str) -> list[Recommendation]:
        reasons = self._reason_texts(reason)
        ids, titles, layers, labels = self._item_ids, self._titles, self._layers, self._layer_label
        return [
            Recommendation(ids[c], titles[c], score, layers[c], labels[c], reasons[c])
            for c, score in zip(cols.tolist(), scores[cols].tolist(), strict=True)
        ]

    def _states(self, rows: list[np.ndarray]) -> torch.Tensor:
        if self.fast.causal:
            return self.fast.states(rows)
        with self._lock:
            return self.fast.states(rows)

    def score_rows(self, rows: list[np.ndarray]) -> np.ndarray:
        """(B, n_items) float32 model scores for non-empty histories of model rows."""
        cache = self.state_cache
        if cache is None:
            return self.fast.scores_of(self._states(rows))
        # The model sees only the last history_len rows, so that suffix is the whole key.
        seen = [np.ascontiguousarray(r[-self.fast.history_len :], dtype=np.int64) for r in rows]
        keys = [r.tobytes() for r in seen]
        states = cache.get_many(keys)
        missing = [i for i, s in enumerate(states) if s is None]
        if missing:
            computed = self._states([seen[i] for i in missing])
            cache.put_many([keys[i] for i in missing], computed)
            for j, i in enumerate(missing):
                states[i] = computed[j]
        return self.fast.scores_of(torch.stack(states))

    def recommend(self, history: list[int], k: int, exclude: list[int] | None = None, diversify: bool = False) -> list[Recommendation]:
        """Next-item recommendations for a known history of item ids (oldest first).

        Items in the history and in ``exclude`` are never returned. Unknown item ids in the
        history are ignored; an empty history falls back to :meth:`cold_start`.
        """
        return self.recommend_rows(self.history_rows(history), k, exclude=exclude, diversify=diversify)

    def recommend_rows(
        self, rows: np.ndarray, k: int, exclude: list[int] | None = None, diversify: bool = False, discovery: int = 0
    ) -> list[Recommendation]:
        """:meth:`recommend` for a history already mapped to model rows (:meth:`history_rows`).

        Args:
            rows: The user's history as model rows, oldest first.
            k: Number of items.
            exclude: Item ids never to return (besides the history).
            diversify: Take the top items round-robin across interest layers.
            discovery: The last ``discovery`` of the ``k`` places go to the best-scored items
                with at most ``discovery_max_events`` training events (new or rarely rated),
                so they get exposure that a popularity-led top k never gives them. On ML-100K
                one such place raised the cold targets found in the top 10 from 0–4 to 8–14 of
                664 (per model and seed) and cost 6–7% of Recall@10 (``bench/quality.py``'s
                temporal cold-item study).
        """
        if len(rows) == 0:
            return self.cold_start(k, exclude=exclude)
        scores = self.score_rows([rows])[0]
        excluded = np.unique(np.concatenate([rows, self.history_rows(exclude)])) if exclude else rows
        discovery = min(max(discovery, 0), k)
        cols = self._pick(scores, excluded, k - discovery, diversify) if k > discovery else _NO_ROWS
        if not discovery:
            return self._explain(cols, scores, _NEXT_REASON)
        found = self._discover(scores, np.concatenate([excluded, cols + 1]), discovery)
        if len(found) < discovery:  # too few rare items left: the model's next best fill the places
            taken = np.concatenate([excluded, cols + 1, self.history_rows([r.item_id for r in found])])
            cols = np.concatenate([cols, self._pick(scores, taken, discovery - len(found), False)])
        return (self._explain(cols, scores, _NEXT_REASON) if len(cols) else []) + found

    def _discover(self, scores: np.ndarray, excluded_rows: np.ndarray, n: int) -> list[Recommendation]:
        """The ``n`` best-scored discovery candidates outside ``excluded_rows``, with their reasons."""
        cand = self._discovery_cols
        cand = cand[~np.isin(cand, excluded_rows - 1)]
        if not len(cand) or n <= 0:
            return []
        top = cand[np.argsort(-scores[cand], kind="stable")[:n]]
        out = []
        for c in top.tolist():
            count = int(self.popularity[c])
            reason = _NEW_ITEM_REASON if count == 0 else _RARE_ITEM_REASON.format(count=count)
            out.append(Recommendation(self._item_ids[c], self._titles[c], float(scores[c]), self._layers[c], self._layer_label[c], reason))
        return out

    def recommend_batch(self, histories: list[list[int]], k: int) -> list[list[Recommendation]]:
        """Score many users in one forward pass (cold users fall back individually)."""
        return self.recommend_batch_rows([self.history_rows(h) for h in histories], k)

    def recommend_batch_rows(self, rows: list[np.ndarray], k: int) -> list[list[Recommendation]]:
        """:meth:`recommend_batch` for histories already mapped to model rows (:meth:`history_rows`)."""
        warm = [i for i, r in enumerate(rows) if len(r)]
        out: list[list[Recommendation]] = [[] for _ in rows]
        if warm:
            scores = self.score_rows([rows[i] for i in warm])
            for j, i in enumerate(warm):
                cols = self._pick(scores[j], rows[i], k, False)
                out[i] = self._explain(cols, scores[j], _NEXT_REASON)
        for i, r in enumerate(rows):
            if not len(r):
                out[i] = self.cold_start(k)
        return out

    def cold_start(self, k: int, layer: int | None = None, exclude: list[int] | None = None) -> list[Recommendation]:
        """Popular items of the user's layer when known, else global popularity spread over layers."""
        if exclude:
            return self._cold_start(k, layer, self.history_rows(exclude))
        # Without excludes the answer depends on (k, layer) only: computed once, returned as a new list.
        key = (int(k), layer if layer in self.layer_popular else None)
        cached = self._cold_cache.get(key)
        if cached is None:
            cached = tuple(self._cold_start(k, layer, _NO_ROWS))
            if len(self._cold_cache) < _COLD_CACHE_SIZE:
                self._cold_cache[key] = cached
        return list(cached)

    def _cold_start(self, k: int, layer: int | None, excluded: np.ndarray) -> list[Recommendation]:
        if layer is not None and layer in self.layer_popular:
            drop = set(excluded.tolist())
            rows = np.asarray([r for r in self.layer_popular[layer] if r not in drop], dtype=np.int64)
            scores = np.full(self.n_items, -np.inf)
            scores[rows - 1] = np.linspace(1.0, 0.5, num=len(rows)) if len(rows) else []
            cols = self._pick(scores, excluded, k, False)
            return self._explain(cols, scores, "popular in your interest layer '{layer_name}'")
        scores = self._log_popularity
        cols = self._pick(scores, excluded, k, diversify=self.layers is not None)
        return self._explain(cols, scores, "popular with all users (cold start); serves the '{layer_name}' layer")

    def similar_items(self, item_id: int, k: int) -> list[Recommendation]:
        """Items whose learned embeddings are closest (cosine) to ``item_id``."""
        rows = self.history_rows([item_id])
        if not len(rows):
            raise KeyError(item_id)
        with torch.inference_mode():
            table = self._unit_items
            scores = (table @ table[rows[0] - 1]).cpu().numpy()
        cols = self._pick(scores, rows, k, False)
        return self._explain(cols, scores, "similar to the item you asked about")

    def layer_of_user(self, user_id: int) -> int | None:
        """Coarse layer of a user seen at layering time."""
        return self.user_layer.get(int(user_id))


def item_table(catalog: pd.DataFrame, index: ItemIndex, popularity: np.ndarray, item_layer: np.ndarray | None = None) -> pd.DataFrame:
    """The ``items.parquet`` frame, in model-row order."""
    cat = catalog.set_index(ITEM_ID).reindex(index.item_ids)
    out = pd.DataFrame(
        {
            ITEM_ID: index.item_ids,
            TITLE: cat[TITLE].astype("string").fillna("").to_numpy(),
            GENRES: cat[GENRES].astype("string").fillna("").to_numpy(),
            ITEM_POPULARITY: np.asarray(popularity[1:], dtype=np.int64),
        }
    )
    if item_layer is not None:
        out[ITEM_LAYER] = item_layer[1:]
    return out


__all__ = [
    "LAYER_NAME",
    "Recommendation",
    "RecommenderBundle",
    "item_table",
    "load_layers",
    "save_layers",
    "write_json_atomic",
    "write_parquet_atomic",
]
