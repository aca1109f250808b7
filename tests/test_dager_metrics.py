"""Text metrics against hand-computed values."""

from __future__ import annotations

import pytest

from dager.metrics import evaluate_text, match_sentences, normalizer_for


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


# --- evaluation shared by the metrics and the views: one pairing, one PSNR, one tiling


def test_match_sentences_is_the_scorers_pairing():
    """A view's diff pairs each prediction with the reference its score used."""
    refs = ["the cat sat on the mat", "the dog ran", "a bird flew away home"]
    preds = ["a bird flew home", "the cat sat on a mat", "dog ran the", "extra words here"]
    scores = evaluate_text(refs, preds)
    expected: list[int | None] = [None] * len(preds)
    for pair in scores.pairs:
        expected[pair.prediction_index] = pair.reference_index
    assert match_sentences(preds, refs) == expected == [2, 0, 1, None]
    assert match_sentences([], refs) == [] and match_sentences(preds, []) == [None] * 4


def test_match_sentences_normalises_like_the_score():
    refs = ["Hello World", "good morning"]
    preds = ["good morning", "hello world"]
    lower = str.lower
    assert match_sentences(preds, refs, normalize=lower) == [1, 0]
    assert [p.exact for p in evaluate_text(refs, preds, normalize=lower).pairs] == [True, True]


def test_normalizer_for_is_the_models_view_of_text(tiny):
    bert = tiny("bert")
    norm = normalizer_for(bert)
    assert norm("  Hello   World ") == "hello world"  # uncased, whitespace collapsed
    assert norm(norm("Hello World")) == norm("Hello World")  # idempotent
    assert evaluate_text(["Hello World"], ["hello world"], normalize=norm).exact_match == 1.0


def test_matched_psnr_is_the_scores_psnr_and_ignores_order():
    import torch

    from dlg.metrics import MAX_PSNR, evaluate_images, matched_psnr

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 3, 8, 8, generator=g)
    noisy = (ref + 0.05 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    shuffled = noisy[[2, 0, 1]]
    labels = torch.tensor([0, 1, 2])
    assert matched_psnr(ref, shuffled) == pytest.approx(evaluate_images(ref, shuffled, labels, labels[[2, 0, 1]]).psnr)
    assert matched_psnr(ref, shuffled) == pytest.approx(matched_psnr(ref, noisy))
    assert matched_psnr(ref, ref[[1, 2, 0]]) == MAX_PSNR


def test_one_tiling_for_previews_and_gif_frames():
    import numpy as np
    import torch

    from dlg.gif import frame_to_array
    from dlg.images import tile_images, to_grid

    images = torch.zeros(3, 1, 4, 4)  # black, one channel
    images[1] = 1.0
    grid = to_grid(images, scale=2, pad=2)
    assert grid.shape == (8, 3 * 8 + 2 * 2, 3) and grid.dtype == np.uint8
    assert (grid[:, 0:8] == 0).all() and (grid[:, 8:10] == 255).all() and (grid[:, 10:18] == 255).all()
    frame = frame_to_array(images, scale=2, pad=2)
    assert frame.shape == (8 + 4, 3 * (8 + 2) + 2, 3)
    assert (frame[2:10, 2:30] == tile_images(images, scale=2, pad=2)).all()  # the same row, with a margin
    assert (frame[:2] == 255).all() and (frame[:, :2] == 255).all()
