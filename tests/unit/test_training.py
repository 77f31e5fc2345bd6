"""Training behaviour: beats most-popular, never recommends seen items, resumes after a kill, warm-starts."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from stratarec.baselines import MostPopular
from stratarec.config import ModelConfig, TrainConfig
from stratarec.evaluation.ranking import evaluate_scorer, rank_top_k
from stratarec.sequences import ItemIndex, SequenceSplit
from stratarec.training import ModelScorer, save_trained_model, train_sequential, warm_start_model

pytestmark = pytest.mark.unit

N_ITEMS = 60


def walk_split(n_users=160, n_items=N_ITEMS, seed=0):
    """Users walk through items in steps of 1 or 2: strongly sequential, weakly popular."""
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for _ in range(n_users):
        start, step, length = rng.integers(1, n_items), rng.choice([1, 2]), rng.integers(8, 20)
        seq = (start + np.arange(length) * step) % n_items + 1
        train.append(seq[:-2])
        val.append(seq[-2])
        test.append(seq[-1])
    return SequenceSplit(users=np.arange(n_users), train=train, val_targets=np.array(val), test_targets=np.array(test))


def text_for(n_items=N_ITEMS, dim=16, seed=1):
    return np.random.default_rng(seed).normal(size=(n_items, dim)).astype(np.float32)


FAST = TrainConfig(epochs=12, patience=20, learning_rate=5e-3, batch_size=64, seed=3)
SMALL = ModelConfig(hidden_size=32, num_heads=2, num_layers=1, max_len=20, dropout=0.1)


def test_tiny_training_beats_most_popular(tmp_path):
    split = walk_split()
    idx = ItemIndex(np.arange(1, N_ITEMS + 1))
    res = train_sequential(split, idx, text_for(), SMALL, FAST, tmp_path / "ck")
    inputs = split.test_inputs()
    ours = evaluate_scorer(ModelScorer(res.model), inputs, inputs, split.test_targets, 10, N_ITEMS)["overall"]["ndcg@10"]
    pop = evaluate_scorer(MostPopular(split.train, N_ITEMS), inputs, inputs, split.test_targets, 10, N_ITEMS)["overall"]["ndcg@10"]
    assert ours > pop + 0.05, (ours, pop)
    assert res.best_epoch >= 1 and len(res.history) == res.epochs_run


def test_model_never_recommends_seen_items(tmp_path):
    split = walk_split(n_users=40)
    idx = ItemIndex(np.arange(1, N_ITEMS + 1))
    res = train_sequential(
        split, idx, None, SMALL.model_copy(update={"text_init": False}), FAST.model_copy(update={"epochs": 2}), tmp_path / "ck"
    )
    inputs = split.test_inputs()
    ranked = rank_top_k(ModelScorer(res.model), inputs, inputs, k=N_ITEMS - 25)
    for row, seen in zip(ranked, inputs, strict=True):
        assert not set(row.tolist()) & set(seen.tolist())


def test_bidirectional_variant_trains(tmp_path):
    split = walk_split(n_users=60)
    idx = ItemIndex(np.arange(1, N_ITEMS + 1))
    res = train_sequential(
        split,
        idx,
        text_for(),
        SMALL.model_copy(update={"architecture": "bidirectional"}),
        FAST.model_copy(update={"epochs": 2}),
        tmp_path / "ck",
    )
    scores = ModelScorer(res.model).score(split.test_inputs()[:3])
    assert scores.shape == (3, N_ITEMS) and np.isfinite(scores).all()


RUNNER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from unit.test_training import walk_split, text_for, SMALL
    from stratarec.config import TrainConfig
    from stratarec.sequences import ItemIndex
    from stratarec.training import train_sequential
    cfg = TrainConfig(epochs=6, patience=20, learning_rate=5e-3, batch_size=64, seed=3)
    train_sequential(walk_split(), ItemIndex(np.arange(1, 61)), text_for(), SMALL, cfg, {ck!r},
                     progress=lambda s: time.sleep(0.5))
    """
)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    ck = tmp_path / "ck"
    script = RUNNER.format(tests=os.path.dirname(os.path.dirname(__file__)), ck=str(ck))
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    state = ck / "state.json"
    deadline = time.monotonic() + 120
    import json

    while time.monotonic() < deadline:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"training subprocess exited early with {proc.returncode}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert 2 <= killed_at < 6

    cfg = TrainConfig(epochs=6, patience=20, learning_rate=5e-3, batch_size=64, seed=3)
    resumed = train_sequential(walk_split(), ItemIndex(np.arange(1, 61)), text_for(), SMALL, cfg, ck)
    assert resumed.resumed_from_epoch == killed_at
    assert len(resumed.history) == 6
    fresh = train_sequential(walk_split(), ItemIndex(np.arange(1, 61)), text_for(), SMALL, cfg, tmp_path / "fresh")
    # RNG, optimizer and weights are restored, so the resumed run ends where an uninterrupted one does.
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in fresh.history], rtol=1e-4)
    assert resumed.best_val_ndcg == pytest.approx(fresh.best_val_ndcg, abs=1e-6)


def test_rerun_of_a_finished_run_returns_it_without_training_more(tmp_path):
    split = walk_split(n_users=60)
    idx = ItemIndex(np.arange(1, N_ITEMS + 1))
    cfg = FAST.model_copy(update={"epochs": 30, "patience": 2})
    first = train_sequential(split, idx, text_for(), SMALL, cfg, tmp_path / "ck")
    assert first.epochs_run < 30  # stopped early, so the rerun must not pick up from there
    again = train_sequential(split, idx, text_for(), SMALL, cfg, tmp_path / "ck")
    assert (again.resumed_from_epoch, again.epochs_run, again.best_epoch) == (first.epochs_run, first.epochs_run, first.best_epoch)
    assert again.history == first.history
    inputs = split.test_inputs()[:5]
    np.testing.assert_array_equal(ModelScorer(again.model).score(inputs), ModelScorer(first.model).score(inputs))


def test_checkpoint_of_other_data_is_not_resumed(tmp_path):
    split = walk_split(n_users=40)
    idx = ItemIndex(np.arange(1, N_ITEMS + 1))
    cfg = FAST.model_copy(update={"epochs": 2})
    train_sequential(split, idx, text_for(), SMALL, cfg, tmp_path / "ck")
    split.train[0] = split.train[0][::-1].copy()  # same users and sizes, one history changed
    again = train_sequential(split, idx, text_for(), SMALL, cfg, tmp_path / "ck")
    assert again.resumed_from_epoch == 0 and again.epochs_run == 2


def test_warm_start_with_new_items(tmp_path):
    split = walk_split()
    old_idx = ItemIndex(np.arange(1, N_ITEMS + 1))
    text = text_for(N_ITEMS + 5)
    base = train_sequential(split, old_idx, text[:N_ITEMS], SMALL, FAST, tmp_path / "ck0")
    save_trained_model(base.model, old_idx, tmp_path / "prod")
    # The catalogue grows by 5 items; row order changes too (new ids first).
    new_idx = ItemIndex(np.concatenate([np.arange(N_ITEMS + 1, N_ITEMS + 6), np.arange(1, N_ITEMS + 1)]))
    new_text = np.concatenate([text[N_ITEMS:], text[:N_ITEMS]])
    remapped = SequenceSplit(
        users=split.users,
        train=[new_idx.to_index(old_idx.to_ids(h)) for h in split.train],
        val_targets=new_idx.to_index(old_idx.to_ids(split.val_targets)),
        test_targets=new_idx.to_index(old_idx.to_ids(split.test_targets)),
    )
    cfg = FAST.model_copy(update={"warm_start_epochs": 2, "epochs": 2})
    warm = train_sequential(remapped, new_idx, new_text, SMALL, cfg, tmp_path / "ck1", init_from=tmp_path / "prod")
    scratch = train_sequential(remapped, new_idx, new_text, SMALL, cfg, tmp_path / "ck2")
    assert warm.warm_started and warm.epochs_run == 2
    # Carried-over knowledge: 2 warm epochs beat 2 epochs from scratch by far.
    assert warm.best_val_ndcg > scratch.best_val_ndcg + 0.05, (warm.best_val_ndcg, scratch.best_val_ndcg, base.best_val_ndcg)
    # New items are scorable (from text) and finite.
    scores = ModelScorer(warm.model).score(remapped.test_inputs()[:2])
    assert np.isfinite(scores[:, :5]).all()


def test_new_item_rows_start_from_their_content_neighbours_by_hand():
    from stratarec.model.sequential import Architecture, SequentialRecommender
    from stratarec.training import init_rows_from_content_neighbours

    arch = Architecture(
        n_items=5, text_dim=2, kind="causal", hidden_size=4, num_layers=1, num_heads=1, dropout=0.0, max_len=4, text_init=True
    )
    # Items 1-3 are known, 4 and 5 new. Item 4 points the way of items 1 and 2, item 5 the way of item 3.
    content = np.array([[1, 0], [0.9, 0.1], [0, 1], [1, 0.05], [0.1, 1]], dtype=np.float32)
    model = SequentialRecommender(arch, content)
    with torch.no_grad():
        model.id_embedding.weight[1:4] = torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 8.0]])
    init_rows_from_content_neighbours(model, np.array([4, 5]), np.array([1, 2, 3]), k=2)
    rows = model.id_embedding.weight.detach().numpy()
    np.testing.assert_allclose(rows[4], [2.0, 0, 0, 0])  # mean of items 1 and 2
    np.testing.assert_allclose(rows[5], [1.5, 0, 0, 4.0])  # mean of items 3 and 2 (the next nearest)
    np.testing.assert_allclose(rows[1:4], [[1, 0, 0, 0], [3, 0, 0, 0], [0, 0, 0, 8]])  # known rows untouched


def test_warm_start_from_a_model_of_other_item_content_trains_from_scratch_and_says_why(tmp_path):
    split = walk_split(n_users=40)
    idx = ItemIndex(np.arange(1, N_ITEMS + 1))
    text = text_for()
    cfg = FAST.model_copy(update={"epochs": 2, "warm_start_epochs": 1})
    base = train_sequential(split, idx, text, SMALL, cfg, tmp_path / "ck0")
    save_trained_model(base.model, idx, tmp_path / "prod")
    # model.release_age switched on after the production model was trained: 10 more content columns.
    wider = np.hstack([text, np.eye(N_ITEMS, 10, dtype=np.float32)])
    res = train_sequential(split, idx, wider, SMALL, cfg, tmp_path / "ck1", init_from=tmp_path / "prod")
    assert not res.warm_started and res.epochs_run == 2  # the from-scratch budget, not the warm one
    assert "16 item content columns" in res.warm_start_skipped and "26" in res.warm_start_skipped
    # Called directly, the weight copy refuses rather than loading mismatched weights.
    with pytest.raises(ValueError, match="cannot warm-start: .*model.release_age"):
        warm_start_model(res.model, tmp_path / "prod", idx)
    same = train_sequential(split, idx, text, SMALL, cfg, tmp_path / "ck2", init_from=tmp_path / "prod")
    assert same.warm_started and same.warm_start_skipped is None


def test_cosine_schedule_by_hand():
    from stratarec.training import scheduled_lr

    assert scheduled_lr(1e-3, "constant", 500.0, 100.0, 0.9) == 1e-3
    # Half the time budget gone: cos(pi/2) = 0, so half the peak rate.
    assert scheduled_lr(1e-3, "cosine", 50.0, 100.0, 0.1) == pytest.approx(5e-4)
    # The epoch budget is further along (3/4): 0.5 * (1 + cos(3pi/4)) = 0.1464...
    assert scheduled_lr(1e-3, "cosine", 10.0, 100.0, 0.75) == pytest.approx(1e-3 * 0.5 * (1 - 2**-0.5))
    assert scheduled_lr(1e-3, "cosine", 200.0, 100.0, 0.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        scheduled_lr(1e-3, "linear", 0.0, 1.0, 0.0)


def test_warmup_cosine_schedule_by_hand():
    from stratarec.training import scheduled_lr

    # The first tenth of the progress rises linearly: at 0.05, half the peak.
    assert scheduled_lr(1e-3, "warmup_cosine", 0.0, 100.0, 0.05) == pytest.approx(5e-4)
    assert scheduled_lr(1e-3, "warmup_cosine", 0.0, 100.0, 0.1) == pytest.approx(1e-3)
    # The rest is a cosine over the other nine tenths: progress 0.55 is its midpoint.
    assert scheduled_lr(1e-3, "warmup_cosine", 0.0, 100.0, 0.55) == pytest.approx(5e-4)
    assert scheduled_lr(1e-3, "warmup_cosine", 100.0, 100.0, 0.0) == pytest.approx(0.0)


def test_cosine_run_anneals_to_zero_by_its_last_epoch(tmp_path):
    split = walk_split(n_users=160)  # 160 windows of batch 64: 3 batches per epoch
    cfg = FAST.model_copy(update={"epochs": 3, "lr_schedule": "cosine", "max_minutes": 60.0})
    res = train_sequential(split, ItemIndex(np.arange(1, N_ITEMS + 1)), text_for(), SMALL, cfg, tmp_path / "ck")
    rates = [h["lr"] for h in res.history]
    assert rates[0] > rates[1] > rates[2]
    # The last batch runs at progress (2 + 2/3) / 3, so at 0.5 * (1 + cos(8pi/9)) = 0.030 of the peak.
    assert rates[2] == pytest.approx(cfg.learning_rate * 0.5 * (1 + np.cos(8 * np.pi / 9)), rel=1e-6)


def test_best_model_is_chosen_by_the_moving_average_of_validation(tmp_path):
    split = walk_split(n_users=80)
    cfg = FAST.model_copy(update={"epochs": 6, "val_smoothing": 3})
    res = train_sequential(split, ItemIndex(np.arange(1, N_ITEMS + 1)), text_for(), SMALL, cfg, tmp_path / "ck")
    raw = np.array([h["val_ndcg@10"] for h in res.history])
    smoothed = np.array([h["val_ndcg@10_smoothed"] for h in res.history])
    # Epoch e averages epochs max(1, e - 2)..e.
    expected = [raw[max(0, i - 2) : i + 1].mean() for i in range(len(raw))]
    np.testing.assert_allclose(smoothed, expected, rtol=0, atol=1e-12)
    assert res.best_epoch == int(np.argmax(smoothed)) + 1  # first epoch of the best average
    assert res.best_val_ndcg == raw[res.best_epoch - 1]  # reported: the chosen model's own score


def test_warm_start_follows_its_own_schedule(tmp_path):
    """lr_schedule governs training from scratch, warm_start_lr_schedule a warm start's epochs."""
    split = walk_split(n_users=160)
    idx = ItemIndex(np.arange(1, N_ITEMS + 1))
    base = train_sequential(split, idx, text_for(), SMALL, FAST.model_copy(update={"epochs": 1}), tmp_path / "base")
    save_trained_model(base.model, idx, tmp_path / "prod")
    assert "lr" not in base.history[0]  # constant from scratch
    cfg = FAST.model_copy(update={"warm_start_epochs": 2, "warm_start_lr_schedule": "cosine", "max_minutes": 60.0})
    warm = train_sequential(split, idx, text_for(), SMALL, cfg, tmp_path / "warm", init_from=tmp_path / "prod")
    # Last batch of epoch 2 of 2 (3 batches an epoch): progress 5/6, rate 0.5 * (1 + cos(5pi/6)) of the peak.
    assert warm.history[-1]["lr"] == pytest.approx(cfg.learning_rate * 0.5 * (1 + np.cos(5 * np.pi / 6)), rel=1e-6)


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_model_scorer_batches_by_length_without_changing_scores(kind):
    """Rows are grouped by history length internally; every row must score as it does alone."""
    from stratarec.model.sequential import Architecture, SequentialRecommender

    torch.manual_seed(0)
    arch = Architecture(
        n_items=N_ITEMS, text_dim=8, kind=kind, hidden_size=16, num_layers=2, num_heads=2, dropout=0.1, max_len=8, text_init=False
    )
    model = SequentialRecommender(arch).eval()
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, N_ITEMS + 1, size=n) for n in (5, 1, 12, 3, 0, 7, 2)]  # 12 > max_len: cut; 0: empty
    scorer = ModelScorer(model, batch_size=2)
    alone = np.stack([ModelScorer(model).score([h])[0] for h in histories])
    np.testing.assert_allclose(scorer.score(histories), alone, rtol=0, atol=1e-5)
    vectors = scorer.user_vectors(histories)
    np.testing.assert_allclose(vectors, np.concatenate([ModelScorer(model).user_vectors([h]) for h in histories]), rtol=0, atol=1e-5)
    assert not vectors[4].any()  # the empty history's vector is zero
