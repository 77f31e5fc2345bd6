"""Interest layers, the gate's decision and the bundle's recommendations."""

import json

import numpy as np
import pandas as pd
import pytest

from stratarec.bundle import RecommenderBundle, item_table, save_layers, write_json_atomic
from stratarec.config import LayerConfig, ModelConfig, StrataConfig, TrainConfig
from stratarec.layering import build_interest_layers, genre_matrix
from stratarec.sequences import ItemIndex, SequenceSplit
from stratarec.steps import gate_decision
from stratarec.training import save_trained_model, train_sequential

pytestmark = pytest.mark.unit

GENRES = ["Action", "Comedy", "Horror"]


def planted(n_per=30, seed=0):
    """Three groups of users with separated vectors, each watching one genre's items."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3) * 5
    vectors, histories, users = [], [], []
    for g in range(3):
        for _ in range(n_per):
            vectors.append(centres[g] + rng.normal(scale=0.3, size=3))
            histories.append(rng.choice(np.arange(1, 11) + 10 * g, size=6, replace=False))
            users.append(len(users) + 100)
    item_genres = [GENRES[(i - 1) // 10] for i in range(1, 31)]
    titles = [f"{GENRES[(i - 1) // 10]} movie {i}" for i in range(1, 31)]
    return np.array(users), np.array(vectors), histories, item_genres, titles


def test_layers_recover_planted_groups_and_are_named_by_genre():
    users, vectors, histories, item_genres, titles = planted()
    layers = build_interest_layers(users, vectors, histories, item_genres, titles, GENRES, LayerConfig(n_coarse=3, n_fine=2), seed=0)
    a = layers.assignments
    # each planted group lands in exactly one coarse layer
    for g in range(3):
        assert a.iloc[g * 30 : (g + 1) * 30]["layer_coarse"].nunique() == 1
    assert a["layer_coarse"].nunique() == 3
    coarse = layers.layers[layers.layers.level == "coarse"].set_index("layer")
    for g in range(3):
        layer = a.iloc[g * 30]["layer_coarse"]
        assert coarse.loc[layer, "name"].startswith(GENRES[g]), coarse.loc[layer, "name"]
        assert coarse.loc[layer, "top_genres"][0] == GENRES[g]
    fine = layers.layers[layers.layers.level == "fine"]
    assert len(fine) == 6 and set(fine.parent) == {0, 1, 2}
    assert fine.groupby("parent")["size"].sum().tolist() == [30, 30, 30]
    # items serve the layer whose members watch them
    item_layer = layers.item_layer
    assert item_layer[0] == -1
    assert item_layer[1] == a.iloc[0]["layer_coarse"] and item_layer[25] == a.iloc[60]["layer_coarse"]
    assert sum(layers.layer_shares().values()) == pytest.approx(1.0)
    assert (layers.assign(vectors[:1]) == a.iloc[0]["layer_coarse"]).all()


def test_genre_matrix_hand_case():
    m = genre_matrix(["Action|Horror", "", "Comedy"], GENRES)
    assert m.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]


def _report(cand, baselines, production=None):
    return {
        "candidate": {"overall": {"ndcg@10": cand}},
        "baselines": {k: {"overall": {"ndcg@10": v}} for k, v in baselines.items()},
        "production": {"overall": {"ndcg@10": production}} if production is not None else None,
    }


def test_gate_promotes_only_when_beating_everything():
    cfg = StrataConfig()
    assert gate_decision(_report(0.10, {"most_popular": 0.05, "ease": 0.08}), cfg)["promote"] is True
    no = gate_decision(_report(0.07, {"most_popular": 0.05, "ease": 0.08}), cfg)
    assert no["promote"] is False and "baseline:ease 0.0800" in no["reason"]
    prod = gate_decision(_report(0.10, {"most_popular": 0.05}, production=0.11), cfg)
    assert prod["promote"] is False and "production" in prod["reason"]
    # a tie is not an improvement
    assert gate_decision(_report(0.05, {"most_popular": 0.05}), cfg)["promote"] is False
    strict = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"min_relative_gain": 0.5})})
    assert gate_decision(_report(0.07, {"most_popular": 0.05}), strict)["promote"] is False


def test_gate_rejects_unknown_metric():
    cfg = StrataConfig()
    cfg.gate.metric = "ndcg@20"
    with pytest.raises(ValueError, match="gate.metric"):
        gate_decision(_report(0.1, {}), cfg)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle")
    users, vectors, histories, item_genres, titles = planted(n_per=20)
    idx = ItemIndex(np.arange(1, 31) * 7)  # external ids differ from rows
    split = SequenceSplit(
        users=users, train=histories, val_targets=np.zeros(len(users), np.int64), test_targets=np.zeros(len(users), np.int64)
    )
    res = train_sequential(
        split, idx, None, ModelConfig(hidden_size=16, num_layers=1, max_len=8, text_init=False), TrainConfig(epochs=2), d / "ck"
    )
    save_trained_model(res.model, idx, d / "b")
    catalog = pd.DataFrame({"item_id": idx.item_ids, "title": titles, "genres": item_genres})
    item_table(catalog, idx, split.train_item_counts(30)).to_parquet(d / "b" / "items.parquet")
    layers = build_interest_layers(users, vectors, histories, item_genres, titles, GENRES, LayerConfig(n_coarse=3, n_fine=1))
    save_layers(d / "b", layers)
    write_json_atomic(d / "b" / "lineage.json", {"seed": 0})
    return d / "b"


def test_bundle_never_returns_history_or_excluded(bundle_dir):
    b = RecommenderBundle(bundle_dir)
    history = [7, 14, 21]
    recs = b.recommend(history, k=10, exclude=[28, 35])
    ids = [r.item_id for r in recs]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert not set(ids) & {7, 14, 21, 28, 35}
    assert all(r.title and r.layer in (0, 1, 2) and r.layer_name for r in recs)
    # k larger than what is left returns what is left
    assert len(b.recommend(history, k=1000)) == 27


def test_bundle_cold_start_and_diversify(bundle_dir):
    b = RecommenderBundle(bundle_dir)
    cold = b.recommend([], k=6)
    assert len(cold) == 6 and all("cold start" in r.reason for r in cold)
    assert len({r.layer for r in cold}) >= 2  # cold start spreads over layers
    layer_recs = b.cold_start(k=5, layer=0)
    assert all("interest layer" in r.reason for r in layer_recs)
    div = b.recommend([7, 14], k=6, diversify=True)
    assert len({r.layer for r in div}) >= 2
    # unknown items in the history are ignored, not an error
    assert len(b.recommend([999999], k=3)) == 3


def test_bundle_similar_items(bundle_dir):
    b = RecommenderBundle(bundle_dir)
    sims = b.similar_items(7, k=5)
    assert len(sims) == 5 and 7 not in [r.item_id for r in sims]
    with pytest.raises(KeyError):
        b.similar_items(123456, k=5)
    json.dumps([r.__dict__ for r in sims])  # serialisable for the service
