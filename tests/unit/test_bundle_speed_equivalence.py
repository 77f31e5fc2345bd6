"""The serving fast path answers exactly what the plain computation answers.

``RecommenderBundle`` scores with an ``InferenceScorer`` (precomputed item table, embedding
norm and logits weight; a hand-written GPT-2 forward) and picks from precomputed per-item
tables. Here every answer is compared with a straightforward reference written from the
definitions: the model's own ``user_states`` and ``logits`` (the Hugging Face stack, as
training and evaluation run it), scores copied to float64, history and ``exclude`` masked,
``argpartition`` + ``argsort`` for the top-k, the layer round-robin for ``diversify``, and
titles/layers/reasons looked up from ``items.parquet`` and the layers file. Item ids and
their order must be identical, scores equal to 1e-5.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from stratarec.bundle import RecommenderBundle, item_table, load_layers, save_layers, write_json_atomic
from stratarec.config import LayerConfig
from stratarec.layering import build_interest_layers
from stratarec.model.sequential import Architecture, InferenceScorer, SequentialRecommender
from stratarec.schema import ITEM_ID, LAYER_COARSE, TITLE, USER_ID
from stratarec.sequences import ItemIndex, pad_right
from stratarec.training import save_trained_model

pytestmark = pytest.mark.unit

N_ITEMS = 60
GENRES = ["Action", "Comedy", "Drama", "Horror"]
NEXT = "next in your sequence; serves the '{layer_name}' layer"
LAYER_POPULAR = "popular in your interest layer '{layer_name}'"
GLOBAL_POPULAR = "popular with all users (cold start); serves the '{layer_name}' layer"


def _bundle(directory, kind: str, text_init: bool, seed: int, positions: str = "from_start"):
    """A bundle with an untrained (randomly initialised) model: equivalence needs no training."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    arch = Architecture(
        n_items=N_ITEMS,
        text_dim=8,
        kind=kind,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        dropout=0.1,
        max_len=8,
        text_init=text_init,
        positions=positions,
    )
    model = SequentialRecommender(arch, rng.normal(size=(N_ITEMS, 8)).astype(np.float32))
    with torch.no_grad():  # ID rows start at zero with text_init; make them matter too
        model.id_embedding.weight.add_(torch.randn_like(model.id_embedding.weight) * 0.1)
    model.eval()
    index = ItemIndex(np.arange(1, N_ITEMS + 1) * 11)  # external ids differ from rows
    save_trained_model(model, index, directory)
    genres = [GENRES[i % len(GENRES)] for i in range(N_ITEMS)]
    titles = [f"{genres[i]} movie {i}" for i in range(N_ITEMS)]
    users = np.arange(100, 140)
    histories = [rng.choice(np.arange(1, N_ITEMS + 1), size=int(rng.integers(2, 12)), replace=False) for _ in users]
    layers = build_interest_layers(
        users, rng.normal(size=(len(users), 5)), histories, genres, titles, GENRES, LayerConfig(n_coarse=3, n_fine=1)
    )
    save_layers(directory, layers)
    popularity = np.concatenate([[0], rng.integers(0, 6, size=N_ITEMS)])  # small counts: many ties
    catalog = pd.DataFrame({ITEM_ID: index.item_ids, TITLE: titles, "genres": genres})
    item_table(catalog, index, popularity, layers.item_layer).to_parquet(directory / "items.parquet")
    write_json_atomic(directory / "lineage.json", {"seed": seed})
    return directory


class Reference:
    """The plain computation, from the bundle's files and the model's own forward pass."""

    def __init__(self, directory, model: SequentialRecommender) -> None:
        self.model = model
        self.item_ids = np.asarray(json.loads((directory / "item_ids.json").read_text()), dtype=np.int64)
        items = pd.read_parquet(directory / "items.parquet").set_index(ITEM_ID).loc[self.item_ids]
        self.titles = items[TITLE].astype(str).tolist()
        self.popularity = items["popularity"].to_numpy(dtype=np.float64)
        layers = load_layers(directory)
        self.item_layer = layers.item_layer[1:]
        coarse = layers.layers[layers.layers.level == "coarse"].set_index("layer")
        self.names = {int(k): str(v) for k, v in coarse["name"].items()}
        self.popular = {int(k): [int(i) for i in v] for k, v in coarse["popular_items"].items()}
        self.user_layer = dict(zip(layers.assignments[USER_ID].astype(int), layers.assignments[LAYER_COARSE].astype(int), strict=True))
        self.history_len = model.arch.max_len - (1 if model.arch.kind == "bidirectional" else 0)
        self._scored: dict[tuple, np.ndarray] = {}  # one forward pass per history, however many k / exclude cases

    def rows(self, ids) -> np.ndarray:
        lookup = {int(item): row + 1 for row, item in enumerate(self.item_ids)}
        return np.asarray([lookup[int(i)] for i in ids if int(i) in lookup], dtype=np.int64)

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        items, lengths = pad_right(histories, self.history_len)
        with torch.no_grad():
            states = self.model.user_states(torch.from_numpy(items), torch.from_numpy(lengths))
            return self.model.logits(states).numpy()

    def pick(self, scores, exclude_rows, k, diversify) -> list[int]:
        s = scores.astype(np.float64).copy()
        s[np.asarray(exclude_rows, dtype=np.int64) - 1] = -np.inf
        k = min(k, int(np.isfinite(s).sum()))
        if k <= 0:
            return []
        if not diversify:
            top = np.argpartition(-s, k - 1)[:k]
            return top[np.argsort(-s[top])].tolist()
        pool = np.argpartition(-s, min(len(s) - 1, 5 * k))[: 5 * k]
        pool = pool[np.argsort(-s[pool])]
        pool = pool[np.isfinite(s[pool])]
        by_layer: dict[int, list[int]] = {}
        for col in pool:
            by_layer.setdefault(int(self.item_layer[col]), []).append(int(col))
        queues = sorted(by_layer.values(), key=lambda q: -s[q[0]])
        picked: list[int] = []
        while len(picked) < k and any(queues):
            for q in queues:
                if q and len(picked) < k:
                    picked.append(q.pop(0))
        return picked

    def explain(self, cols, scores, reason) -> list[tuple]:
        out = []
        for c in cols:
            layer = int(self.item_layer[c])
            name = self.names.get(layer, "all users")
            out.append(
                (int(self.item_ids[c]), self.titles[c], float(scores[c]), layer, self.names.get(layer, ""), reason.format(layer_name=name))
            )
        return out

    def cold_start(self, k, layer=None, exclude=()) -> list[tuple]:
        excluded = self.rows(exclude)
        if layer is not None and layer in self.popular:
            rows = np.asarray([r for r in self.popular[layer] if r not in set(excluded.tolist())], dtype=np.int64)
            scores = np.full(len(self.item_ids), -np.inf)
            if len(rows):
                scores[rows - 1] = np.linspace(1.0, 0.5, num=len(rows))
            return self.explain(self.pick(scores, excluded, k, False), scores, LAYER_POPULAR)
        scores = np.log1p(self.popularity)
        return self.explain(self.pick(scores, excluded, k, True), scores, GLOBAL_POPULAR)

    def recommend(self, history, k, exclude=(), diversify=False) -> list[tuple]:
        rows = self.rows(history)
        if not len(rows):
            return self.cold_start(k, exclude=exclude)
        key = tuple(rows.tolist())
        if key not in self._scored:
            self._scored[key] = self.scores([rows])[0]
        scores = self._scored[key]
        excluded = np.concatenate([rows, self.rows(exclude)])
        return self.explain(self.pick(scores, excluded, k, diversify), scores, NEXT)


def _same(got, want) -> None:
    got = [(r.item_id, r.title, r.score, r.layer, r.layer_name, r.reason) for r in got]
    assert [g[0] for g in got] == [w[0] for w in want]  # ids and order
    assert [(g[1], g[3], g[4], g[5]) for g in got] == [(w[1], w[3], w[4], w[5]) for w in want]
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=0, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As the service runs (torch threads only contend on two shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(
    scope="module",
    params=[
        ("causal", True, "from_start"),
        ("causal", False, "from_start"),
        ("bidirectional", True, "from_start"),
        ("causal", True, "from_end"),
        ("bidirectional", False, "from_end"),
    ],
    ids=lambda p: f"{p[0]}-text{p[1]}-{p[2]}",
)
def pair(request, tmp_path_factory):
    kind, text_init, positions = request.param
    directory = _bundle(tmp_path_factory.mktemp(f"{kind}-{text_init}-{positions}"), kind, text_init, seed=3, positions=positions)
    bundle = RecommenderBundle(directory)
    return bundle, Reference(directory, bundle.model)


def _histories(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ids = (np.arange(1, N_ITEMS + 1) * 11).tolist()
    out = [[ids[5]], ids[:2], [ids[i] for i in rng.choice(N_ITEMS, 7, replace=False)], ids[10:30]]  # 20 > max_len: cut
    out.append([999_999, ids[3], 123, ids[4]])  # unknown ids are dropped
    out.append([ids[2], ids[2], ids[9], ids[2]])  # repeats
    return out


def test_scores_match_the_models_own_forward_pass(pair):
    bundle, ref = pair
    assert bundle.fast.lean is (ref.model.arch.kind == "causal")  # GPT-2 stacks take the hand-written forward
    rows = [ref.rows(h) for h in _histories()]
    want = ref.scores(rows)
    np.testing.assert_allclose(bundle.score_rows(rows), want, rtol=0, atol=1e-5)
    for r, w in zip(rows, want, strict=True):  # one at a time: no padding at all
        np.testing.assert_allclose(bundle.score_rows([r])[0], w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 10, N_ITEMS])
def test_recommend_is_identical_to_the_reference(pair, k):
    bundle, ref = pair
    ids = (np.arange(1, N_ITEMS + 1) * 11).tolist()
    for history in _histories():
        for exclude in ([], ids[:3], [ids[40], 555, ids[41], ids[40]]):
            for diversify in (False, True):
                _same(bundle.recommend(history, k, exclude=exclude, diversify=diversify), ref.recommend(history, k, exclude, diversify))


def test_recommend_batch_is_identical_to_one_by_one_reference(pair):
    bundle, ref = pair
    histories = [*_histories(1), [], [424242]]  # the last two are cold
    for k in (3, 10):
        for got, history in zip(bundle.recommend_batch(histories, k), histories, strict=True):
            _same(got, ref.recommend(history, k))


@pytest.mark.parametrize("diversify", [False, True])
def test_discovery_places_go_to_the_best_scored_rare_items(pair, diversify):
    bundle, ref = pair
    rare = RecommenderBundle(bundle.directory, discovery_max_events=2)
    ids = (np.arange(1, N_ITEMS + 1) * 11).tolist()
    for history in _histories(2)[:4]:
        exclude = ids[:3]
        scores = ref.scores([ref.rows(history)])[0]
        for k, d in ((6, 2), (1, 1), (4, 9)):  # d > k: every place is a discovery place
            got = rare.recommend_rows(rare.history_rows(history), k, exclude=exclude, diversify=diversify, discovery=d)
            head = ref.recommend(history, k - min(d, k), exclude, diversify)
            assert [g.item_id for g in got[: len(head)]] == [h[0] for h in head]
            # The plain rule: among items with <= 2 training events that are not in the history,
            # the exclusions or the head, the best scores, in score order.
            taken = set(ref.rows(history).tolist()) | set(ref.rows(exclude).tolist()) | set(ref.rows([h[0] for h in head]).tolist())
            cand = [c for c in range(N_ITEMS) if ref.popularity[c] <= 2 and c + 1 not in taken]
            want = sorted(cand, key=lambda c: -scores[c])[: min(d, k)]
            tail = got[len(head) :]
            assert [t.item_id for t in tail] == [int(ref.item_ids[c]) for c in want]
            assert [t.score for t in tail] == pytest.approx([float(scores[c]) for c in want], abs=1e-5)
            for t, c in zip(tail, want, strict=True):
                count = int(ref.popularity[c])
                assert t.reason.startswith("discovery: ") and ("new in the catalogue" in t.reason) == (count == 0)
                assert count == 0 or f"only {count} interactions" in t.reason
        _same(rare.recommend(history, 5, exclude=exclude, diversify=diversify), ref.recommend(history, 5, exclude, diversify))


def test_discovery_places_the_rare_pool_cannot_fill_go_to_the_next_best_items(pair):
    bundle, ref = pair
    new_only = RecommenderBundle(bundle.directory, discovery_max_events=0)
    history = _histories(3)[2]
    rows = set(ref.rows(history).tolist())
    pool = [c for c in range(N_ITEMS) if ref.popularity[c] == 0 and c + 1 not in rows]
    k = len(pool) + 4
    got = new_only.recommend_rows(new_only.history_rows(history), k, discovery=k)
    found = [g for g in got if g.reason.startswith("discovery: ")]
    assert len(got) == k == len({g.item_id for g in got}) and not {g.item_id for g in got} & set(history)
    assert sorted(g.item_id for g in found) == sorted(int(ref.item_ids[c]) for c in pool)
    # The other four are the model's best items outside the pool, ahead of the discovery places.
    scores = ref.scores([ref.rows(history)])[0]
    rest = sorted((c for c in range(N_ITEMS) if c + 1 not in rows and c not in pool), key=lambda c: -scores[c])[:4]
    assert [g.item_id for g in got[:4]] == [int(ref.item_ids[c]) for c in rest]


def test_cold_start_is_identical_to_the_reference(pair):
    bundle, ref = pair
    ids = (np.arange(1, N_ITEMS + 1) * 11).tolist()
    for layer in (None, *sorted(ref.popular), 99):
        for exclude in ([], ids[:4], [777]):
            for k in (1, 6, 25, N_ITEMS + 5):
                want = ref.cold_start(k, layer, exclude)
                _same(bundle.cold_start(k, layer=layer, exclude=exclude), want)
                _same(bundle.cold_start(k, layer=layer, exclude=exclude), want)  # again: the cache returns the same
    first = bundle.cold_start(4)
    first.append(first[0])  # callers may extend the list they get (the service tops up layers)
    assert len(bundle.cold_start(4)) == 4


def test_similar_items_match_cosine_over_the_item_table(pair):
    bundle, ref = pair
    with torch.no_grad():
        table = torch.nn.functional.normalize(ref.model.item_matrix()[1 : N_ITEMS + 1], dim=1)
    for item in (11, 11 * 17, 11 * N_ITEMS):
        row = int(ref.rows([item])[0])
        scores = (table @ table[row - 1]).numpy()
        _same(bundle.similar_items(item, 7), ref.explain(ref.pick(scores, [row], 7, False), scores, "similar to the item you asked about"))


def test_inference_scorer_snapshot_is_safe_across_threads(pair):
    """One scorer, many threads at once (the service's API threads share it): same answers as alone."""
    from concurrent.futures import ThreadPoolExecutor

    bundle, ref = pair
    rows = [ref.rows(h) for h in _histories(2)] * 8
    want = ref.scores(rows)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: bundle.score_rows([r])[0], rows))
    np.testing.assert_allclose(np.stack(got), want, rtol=0, atol=1e-5)
    assert isinstance(bundle.fast, InferenceScorer)


def test_state_cache_answers_equal_uncached_and_never_go_stale(pair):
    bundle, ref = pair
    cached = RecommenderBundle(bundle.directory, state_cache_size=3)
    rows = [ref.rows(h) for h in _histories()]
    want = ref.scores(rows)
    for _ in range(2):  # first pass fills the cache, second is answered from it
        np.testing.assert_allclose(cached.score_rows(rows), want, rtol=0, atol=1e-5)
    stats = cached.state_cache.stats()
    assert stats["entries"] == 3 and stats["capacity"] == 3  # least recently used evicted past capacity
    assert stats["hits"] + stats["misses"] == 2 * len(rows)
    # A history the model sees differently (one more event) is a new key, not the old answer.
    longer = np.append(rows[0], rows[1][0])
    np.testing.assert_allclose(cached.score_rows([longer])[0], ref.scores([longer])[0], rtol=0, atol=1e-5)
    # Rows beyond the model's window do not split the key: the same visible suffix hits.
    before = cached.state_cache.stats()["hits"]
    suffix = rows[3][-ref.history_len :]
    cached.score_rows([suffix])
    cached.score_rows([np.concatenate([rows[2], suffix])])
    assert cached.state_cache.stats()["hits"] == before + 1


def test_low_precision_scorer_stays_close(pair):
    bundle, ref = pair
    rows = [ref.rows(h) for h in _histories()]
    want = ref.scores(rows)
    got = InferenceScorer(bundle.model, low_precision=True).score(rows)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * np.abs(want).max())


def test_length_bucketed_chunks_score_like_one_padded_batch(pair):
    """Large batches run as chunks grouped by history length; the scores must not move."""
    bundle, ref = pair
    rows = [ref.rows(h) for h in _histories(1) + _histories(2) + _histories(3)]  # lengths 1..8, mixed order
    want = ref.scores(rows)
    for chunk_rows in (1, 2, 5, len(rows)):
        got = InferenceScorer(bundle.model, chunk_rows=chunk_rows).score(rows)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_rows"):
        InferenceScorer(bundle.model, chunk_rows=0)
