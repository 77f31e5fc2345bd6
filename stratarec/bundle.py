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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from stratarec.atomic import write_json_atomic, write_parquet_atomic
from stratarec.layering import InterestLayers
from stratarec.model.sequential import SequentialRecommender, load_model
from stratarec.schema import GENRES, ITEM_ID, ITEM_POPULARITY, LAYER_COARSE, LAYER_NAME, TITLE, USER_ID
from stratarec.sequences import ItemIndex
from stratarec.training import ITEM_IDS_FILE, ModelScorer

ITEMS_FILE = "items.parquet"
LAYERS_DIR = "layers"
LINEAGE_FILE = "lineage.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
ITEM_LAYER = "layer"


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

    Thread-safe for concurrent readers: torch inference is guarded by a lock because the
    service may call it from several worker threads.
    """

    def __init__(self, directory: Path, device: str = "cpu") -> None:
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
        self._lock = threading.Lock()
        self.lineage = json.loads((self.directory / LINEAGE_FILE).read_text()) if (self.directory / LINEAGE_FILE).exists() else {}

    @property
    def n_items(self) -> int:
        """Catalogue size."""
        return len(self.index)

    def _rows(self, item_ids: list[int] | np.ndarray) -> np.ndarray:
        rows = self.index.to_index(np.asarray(list(item_ids), dtype=np.int64))
        return rows[rows > 0]

    def _pick(self, scores: np.ndarray, exclude_rows: np.ndarray, k: int, diversify: bool) -> np.ndarray:
        """Indices (0-based columns) of the top-k, optionally round-robin across layers."""
        s = scores.astype(np.float64).copy()
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
        for col in pool:
            by_layer.setdefault(int(self.item_layer[col]), []).append(int(col))
        picked: list[int] = []
        queues = sorted(by_layer.values(), key=lambda q: -s[q[0]])
        while len(picked) < k and any(queues):
            for q in queues:
                if q and len(picked) < k:
                    picked.append(q.pop(0))
        return np.asarray(picked, dtype=np.int64)

    def _explain(self, cols: np.ndarray, scores: np.ndarray, reason: str) -> list[Recommendation]:
        out = []
        for c in cols:
            layer = int(self.item_layer[c])
            out.append(
                Recommendation(
                    item_id=int(self.index.item_ids[c]),
                    title=str(self.titles[c]),
                    score=float(scores[c]),
                    layer=layer,
                    layer_name=self.layer_names.get(layer, ""),
                    reason=reason.format(layer_name=self.layer_names.get(layer, "all users")),
                )
            )
        return out

    def recommend(self, history: list[int], k: int, exclude: list[int] | None = None, diversify: bool = False) -> list[Recommendation]:
        """Next-item recommendations for a known history of item ids (oldest first).

        Items in the history and in ``exclude`` are never returned. Unknown item ids in the
        history are ignored; an empty history falls back to :meth:`cold_start`.
        """
        rows = self._rows(history)
        if len(rows) == 0:
            return self.cold_start(k, exclude=exclude)
        with self._lock:
            scores = self.scorer.score([rows])[0]
        excluded = np.unique(np.concatenate([rows, self._rows(exclude or [])]))
        cols = self._pick(scores, excluded, k, diversify)
        return self._explain(cols, scores, "next in your sequence; serves the '{layer_name}' layer")

    def recommend_batch(self, histories: list[list[int]], k: int) -> list[list[Recommendation]]:
        """Score many users in one forward pass (cold users fall back individually)."""
        rows = [self._rows(h) for h in histories]
        warm = [i for i, r in enumerate(rows) if len(r)]
        out: list[list[Recommendation]] = [[] for _ in histories]
        if warm:
            with self._lock:
                scores = self.scorer.score([rows[i] for i in warm])
            for j, i in enumerate(warm):
                cols = self._pick(scores[j], rows[i], k, False)
                out[i] = self._explain(cols, scores[j], "next in your sequence; serves the '{layer_name}' layer")
        for i, r in enumerate(rows):
            if not len(r):
                out[i] = self.cold_start(k)
        return out

    def cold_start(self, k: int, layer: int | None = None, exclude: list[int] | None = None) -> list[Recommendation]:
        """Popular items of the user's layer when known, else global popularity spread over layers."""
        excluded = self._rows(exclude or [])
        if layer is not None and layer in self.layer_popular:
            rows = np.asarray([r for r in self.layer_popular[layer] if r not in set(excluded.tolist())], dtype=np.int64)
            scores = np.full(self.n_items, -np.inf)
            scores[rows - 1] = np.linspace(1.0, 0.5, num=len(rows)) if len(rows) else []
            cols = self._pick(scores, excluded, k, False)
            return self._explain(cols, scores, "popular in your interest layer '{layer_name}'")
        scores = np.log1p(self.popularity)
        cols = self._pick(scores, excluded, k, diversify=self.layers is not None)
        return self._explain(cols, scores, "popular with all users (cold start); serves the '{layer_name}' layer")

    def similar_items(self, item_id: int, k: int) -> list[Recommendation]:
        """Items whose learned embeddings are closest (cosine) to ``item_id``."""
        rows = self._rows([item_id])
        if not len(rows):
            raise KeyError(item_id)
        with self._lock, torch.inference_mode():
            table = self.model.item_matrix()[1 : self.n_items + 1].float()
            table = torch.nn.functional.normalize(table, dim=1)
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
