"""Text metrics against hand-computed values."""

from __future__ import annotations

import pytest

from dager.metrics import evaluate_text, token_diff


def test_perfect_recovery_in_another_order():
    refs = ["the cat sat", "a dog ran home", "hello"]
    preds = ["hello", "the cat sat", "a dog ran home"]
    s = evaluate_text(refs, preds)
    assert s.exact_match == 1.0 and s.token_accuracy == 1.0
    # "hello" has no bigram: rouge-score alone would give ROUGE-2 = 0.
    assert (s.rouge1, s.rouge2, s.rougeL) == (1.0, 1.0, 1.0)
    assert [p.prediction_index for p in s.pairs] == [1, 2, 0]
    assert s.matched_predictions == tuple(refs)
    assert s.num_exact == 3 and s.unmatched_predictions == ()


def test_one_wrong_word_hand_computed():
    # unigrams: 2 of 3 shared -> P = R = F1 = 2/3; bigrams: "the cat" of 2 -> 1/2;
    # LCS "the cat" = 2 of 3 -> 2/3; tokens in place: 2 of 3.
    s = evaluate_text(["the cat sat"], ["the cat ran"])
    assert s.rouge1 == pytest.approx(2 / 3)
    assert s.rouge2 == pytest.approx(1 / 2)
    assert s.rougeL == pytest.approx(2 / 3)
    assert s.exact_match == 0.0
    assert s.token_accuracy == pytest.approx(2 / 3)


def test_matching_maximises_total_rouge1_not_greedy():
    # Greedy on the first reference would take "a b c" (F1 6/7) and leave the second
    # "a b x d" (F1 4/7): total 10/7; crosswise pairs give 3/4 + 1 = 7/4, the optimum.
    refs = ["a b c d", "a b c"]
    preds = ["a b c", "a b x d"]
    s = evaluate_text(refs, preds)
    assert [p.prediction_index for p in s.pairs] == [1, 0]
    # pair 0: "a b c d" vs "a b x d": 3 of 4 unigrams -> 0.75; pair 1: exact -> 1.
    assert s.rouge1 == pytest.approx((0.75 + 1.0) / 2)
    assert s.exact_match == 0.5
    # tokens in place: a, b, d of 4 and a, b, c of 3 -> 6 / 7.
    assert s.token_accuracy == pytest.approx(6 / 7)


def test_fewer_predictions_score_missing_references_as_empty():
    s = evaluate_text(["one two", "three four"], ["three four"])
    assert s.exact_match == 0.5
    assert s.rouge1 == pytest.approx(0.5)
    assert s.pairs[0].prediction_index is None and s.pairs[0].prediction == ""
    assert s.token_accuracy == pytest.approx(2 / 4)


def test_extra_predictions_are_listed_not_penalised():
    s = evaluate_text(["one two"], ["zzz", "one two", "one"])
    assert s.exact_match == 1.0 and s.rouge1 == 1.0
    assert s.unmatched_predictions == (0, 2)


def test_ties_prefer_the_exact_permutation():
    # Both predictions have ROUGE-1 = 1 with both references; only one pairing is exact.
    refs = ["b a", "a b"]
    preds = ["a b", "b a"]
    s = evaluate_text(refs, preds)
    assert s.exact_match == 1.0
    assert [p.prediction_index for p in s.pairs] == [1, 0]


def test_normalize_applies_to_both_sides_and_pairs_keep_originals():
    s = evaluate_text(["Hello World"], ["hello world"], normalize=str.lower)
    assert s.exact_match == 1.0
    assert s.pairs[0].reference == "Hello World" and s.pairs[0].prediction == "hello world"
    assert evaluate_text(["Hello World"], ["hello world"]).exact_match == 0.0


def test_token_accuracy_is_positional():
    # Same words shifted by one: ROUGE-1 stays high, no token is in place.
    s = evaluate_text(["a b c d"], ["x a b c d"])
    assert s.token_accuracy == 0.0
    assert s.rouge1 == pytest.approx(2 * 1.0 * 0.8 / 1.8)


def test_empty_inputs():
    s = evaluate_text([], ["anything"])
    assert s.pairs == () and s.exact_match == 0.0 and s.unmatched_predictions == (0,)
    s = evaluate_text(["a b"], [])
    assert s.rouge1 == 0.0 and s.token_accuracy == 0.0


def test_token_diff():
    assert token_diff("the cat sat down", "the dog sat") == [
        ("the", "equal"),
        ("cat", "missing"),
        ("dog", "extra"),
        ("sat", "equal"),
        ("down", "missing"),
    ]
    assert token_diff("same text", "same text") == [("same", "equal"), ("text", "equal")]
    assert token_diff("a", "") == [("a", "missing")]
