"""Metric functions against answers worked out by hand."""

import math

import numpy as np
import pytest

from stratarec.evaluation.metrics import (
    catalogue_coverage,
    intra_list_diversity,
    mrr_at_k,
    ndcg_at_k,
    novelty,
    paired_exact_test,
    paired_relative_gap,
    ratio_estimate,
    recall_at_k,
)
from stratarec.evaluation.ranking import evaluate_scorer, rank_top_k, scorer_target_ranks, target_ranks

pytestmark = pytest.mark.unit


def test_ndcg_hand_computed():
    ranked = np.array([[5, 3, 9], [1, 2, 3], [7, 8, 9]])
    targets = np.array([5, 3, 4])
    # rank 1 -> 1/log2(2) = 1; rank 3 -> 1/log2(4) = 0.5; absent -> 0
    np.testing.assert_allclose(ndcg_at_k(ranked, targets, 3), [1.0, 0.5, 0.0])
    # with K=2 the rank-3 hit no longer counts
    np.testing.assert_allclose(ndcg_at_k(ranked, targets, 2), [1.0, 0.0, 0.0])


def test_ndcg_of_perfect_ranking_is_one():
    ranked = np.arange(1, 11)[None, :]
    assert ndcg_at_k(ranked, np.array([1]), 10)[0] == 1.0


def test_recall_and_mrr_hand_computed():
    ranked = np.array([[4, 2, 6, 8], [1, 2, 3, 4]])
    targets = np.array([6, 9])
    np.testing.assert_allclose(recall_at_k(ranked, targets, 4), [1.0, 0.0])
    np.testing.assert_allclose(mrr_at_k(ranked, targets, 4), [1 / 3, 0.0])
    np.testing.assert_allclose(mrr_at_k(ranked, targets, 2), [0.0, 0.0])


def test_coverage_counts_distinct_items():
    ranked = np.array([[0, 1], [1, 2]])
    assert catalogue_coverage(ranked, n_items=6, k=2) == pytest.approx(3 / 6)


def test_diversity_identical_and_orthogonal_items():
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # items 0 and 1 identical -> distance 0; items 0 and 2 orthogonal -> distance 1
    np.testing.assert_allclose(intra_list_diversity(np.array([[0, 1], [0, 2]]), vectors, 2), [0.0, 1.0])


def test_novelty_self_information():
    pop = np.array([4, 1])  # 4 of 4 users saw item 0 -> 0 bits; 1 of 4 saw item 1 -> 2 bits
    np.testing.assert_allclose(novelty(np.array([[0, 1]]), pop, n_users=4, k=2), [1.0])


class _FixedScorer:
    name = "fixed"

    def __init__(self, scores):
        self.scores = np.asarray(scores, dtype=np.float32)

    def score(self, histories):
        return np.repeat(self.scores[None, :], len(histories), axis=0)


def test_rank_excludes_seen_items():
    scorer = _FixedScorer([5.0, 4.0, 3.0, 2.0, 1.0])  # items 1..5 best first
    ranked = rank_top_k(scorer, [np.array([1, 2])], [np.array([1, 2])], k=2)
    assert ranked.tolist() == [[3, 4]]


def test_target_ranks_by_hand():
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    seen = [np.array([1, 2]), np.array([4]), np.array([], np.int64)]
    # row 0: items 1, 2 seen -> item 3 first; row 1: item 4 is the target, so it is kept
    # although it is in the history: items 1, 2, 3 beat it; row 2: a three-way tie counts against item 2.
    assert target_ranks(scores, seen, np.array([3, 4, 2])).tolist() == [1, 4, 3]
    # Among the pool {4, 5} only: row 1's target 4 beats 5; row 0's target 3 is outside the pool but still
    # competes, and beats both pool items.
    pool = np.array([False, False, False, True, True])
    assert target_ranks(scores[:2], seen[:2], np.array([3, 4]), pool).tolist() == [1, 1]


def test_target_ranks_rejects_bad_targets():
    with pytest.raises(ValueError, match="targets must be item rows 1..2"):
        target_ranks(np.zeros((1, 2)), [np.array([], np.int64)], np.array([3]))
    with pytest.raises(ValueError, match="must align"):
        target_ranks(np.zeros((2, 2)), [np.array([], np.int64)], np.array([1, 1]))


def test_scorer_target_ranks_matches_one_batch():
    scorer = _FixedScorer([5.0, 4.0, 3.0, 2.0, 1.0])
    histories = [np.array([1]), np.array([2, 3]), np.array([5])]
    targets = np.array([5, 4, 1])
    ranks, pool_ranks = scorer_target_ranks(scorer, histories, histories, targets, np.array([1, 0, 0, 1, 1], bool), batch_size=2)
    assert ranks.tolist() == [4, 2, 1]
    assert pool_ranks.tolist() == [2, 2, 1]  # among the unseen of items 1, 4, 5: item 1 beats 5 and 4
    assert scorer_target_ranks(scorer, histories, histories, targets)[1] is None


def test_evaluate_scorer_overall_and_slice():
    scorer = _FixedScorer([5.0, 4.0, 3.0, 2.0, 1.0])
    histories = [np.array([1]), np.array([2]), np.array([5])]
    targets = np.array([2, 1, 0])  # third user has no target and is ignored
    report = evaluate_scorer(scorer, histories, histories, targets, 2, 5, slices={"first": np.array([True, False, False])})
    # user 1: seen {1} -> ranks [2,3] -> target 2 at rank 1; user 2: seen {2} -> [1,3] -> rank 1
    assert report["overall"]["ndcg@2"] == pytest.approx(1.0)
    assert report["overall"]["users"] == 2
    assert report["first"]["users"] == 1
    assert math.isclose(report["overall"]["coverage@2"], 3 / 5)


def test_ratio_estimate_by_hand():
    # Sample: y is twice x on every unit, so the ratio is 2 in every bootstrap round; the
    # population's x averages 0.2, so the estimate is 0.4.
    got = ratio_estimate(np.array([0.2, 0.4]), np.array([0.1, 0.2]), np.array([0.1, 0.2, 0.3]))
    assert got["ratio"] == pytest.approx(2.0)
    assert got["estimate"] == pytest.approx(0.4)
    low, high = got["ci95"]
    assert 0.2 <= low <= 0.4 <= high <= 0.6  # 2 x (bootstrap means of the population, within [0.1, 0.3])
    # An easier sample (x 0.5 there, 0.25 everywhere) halves the sample's y; a constant
    # population leaves no spread from that side, and a constant ratio none from the other.
    flat = ratio_estimate(np.array([0.3, 0.3]), np.array([0.5, 0.5]), np.full(5, 0.25))
    assert flat["estimate"] == pytest.approx(0.15)
    assert flat["ci95"] == pytest.approx((0.15, 0.15))


def test_ratio_estimate_rejects_bad_input():
    with pytest.raises(ValueError, match="equally long"):
        ratio_estimate(np.array([1.0]), np.array([1.0, 0.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="mean 0"):
        ratio_estimate(np.array([1.0]), np.array([0.0]), np.array([1.0]))


def test_paired_exact_test_by_hand():
    # Events 0-4: B hits and A misses (5 discordant, all one way); event 5: both hit.
    a = np.array([0, 0, 0, 0, 0, 1, 0], dtype=bool)
    b = np.array([1, 1, 1, 1, 1, 1, 0], dtype=bool)
    got = paired_exact_test(a, b)
    assert (got["a_only"], got["b_only"], got["hits_a"], got["hits_b"], got["n"]) == (0, 5, 1, 6, 7)
    assert got["p_value"] == pytest.approx(2 * 0.5**5)  # P(0 of 5 fair coins go A's way), both sides
    # One discordant event each way: no evidence at all.
    assert paired_exact_test(np.array([1, 0, 0]), np.array([0, 1, 0]))["p_value"] == 1.0
    # 1 against 3: P(X <= 1 | 4, 1/2) = 5/16, doubled.
    got = paired_exact_test(np.array([1, 0, 0, 0, 1]), np.array([0, 1, 1, 1, 1]))
    assert got["p_value"] == pytest.approx(10 / 16)
    # No discordant events (identical hits): p = 1.
    assert paired_exact_test(np.ones(3), np.ones(3))["p_value"] == 1.0


def test_paired_exact_test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equally long"):
        paired_exact_test(np.zeros(3), np.zeros(4))


def test_paired_relative_gap_by_hand():
    ref = np.array([0.5, 0.0, 1.0, 0.5])
    # A candidate at exactly 90% of the reference on every user is 10% short on every resample.
    got = paired_relative_gap(ref, 0.9 * ref)
    assert got["gap"] == pytest.approx(0.1) and got["ci95"] == pytest.approx((0.1, 0.1)) and got["n_users"] == 4
    # Sums 2.0 against 1.5: 25% short; the interval spans the users' disagreement.
    cand = np.array([0.5, 0.5, 0.0, 0.5])
    got = paired_relative_gap(ref, cand)
    assert got["gap"] == pytest.approx(0.25)
    assert got["ci95"][0] < 0.25 < got["ci95"][1]
    # Two runs (rows): user columns resample together, and the gap pools the runs' sums.
    two = paired_relative_gap(np.stack([ref, ref]), np.stack([0.9 * ref, ref]))
    assert two["gap"] == pytest.approx(0.05) and two["ci95"] == pytest.approx((0.05, 0.05))
    with pytest.raises(ValueError, match="same shape"):
        paired_relative_gap(ref, cand[:3])
