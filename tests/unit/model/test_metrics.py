"""Operating points chosen on validation scores hold when those scores are counted again."""

from __future__ import annotations

import numpy as np
import pytest

from fracwatch.model.metrics import at_threshold, threshold_for_sensitivity, threshold_for_specificity


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("target", [0.9, 0.95, 0.99])
def test_chosen_thresholds_meet_their_targets_on_the_same_scores(dtype: type, target: float) -> None:
    rng = np.random.default_rng(7)
    labels = np.repeat([0, 1], 360)
    scores = np.concatenate([rng.beta(2, 5, 360), rng.beta(5, 2, 360)]).astype(dtype)  # network scores are float32

    positive = threshold_for_specificity(labels, scores, target)
    doubt = threshold_for_sensitivity(labels, scores, target)

    at_positive = at_threshold(labels, scores, positive)
    at_doubt = at_threshold(labels, scores, doubt)
    assert at_positive.specificity >= target and at_doubt.sensitivity >= target
    # The lowest such threshold: one negative fewer below it and the target would be missed.
    assert at_positive.tn == int(np.ceil(target * 360))
    assert at_doubt.tp == 360 - int(np.floor((1 - target) * 360))
    # Python floats (how the daemon compares one image's score) agree with the array comparison.
    assert sum(float(s) >= positive for s in scores[labels == 0]) == at_positive.fp


def test_one_class_gives_the_neutral_threshold() -> None:
    scores = np.array([0.2, 0.7], dtype=np.float32)
    assert threshold_for_specificity(np.array([1, 1]), scores, 0.95) == 0.5
    assert threshold_for_sensitivity(np.array([0, 0]), scores, 0.95) == 0.5
