"""The singles' frontier and AFS's distance above it, on hand-made points and flags."""
import math

import numpy as np
import pytest

from afs_kit.explain.frontier import bootstrap_draws, distance, envelope, frontier_clean, frontier_study, frontier_text

# (robust, clean): a falling frontier of three networks, one dominated point and one under the chord
SINGLES = [(10.0, 60.0), (20.0, 50.0), (30.0, 30.0), (15.0, 40.0), (25.0, 38.0)]


def test_envelope_keeps_the_undominated_concave_corners():
    assert envelope(SINGLES).tolist() == [[10.0, 60.0], [20.0, 50.0], [30.0, 30.0]]
    # a point below the chord of its neighbours is beaten by mixing them: not a corner
    assert envelope([(0, 50), (10, 30), (20, 20)]).tolist() == [[0, 50], [20, 20]]
    # equal clean accuracy: only the more robust one; a single network is its own frontier
    assert envelope([(5, 40), (10, 40)]).tolist() == [[10, 40]]
    assert envelope([(7, 33)]).tolist() == [[7, 33]]


@pytest.mark.parametrize("afs, expected", [
    ((20.0, 55.0), 5.0),    # inside, above the corner at 20
    ((15.0, 55.0), 0.0),    # inside, on the segment between 10 and 20
    ((25.0, 35.0), -5.0),   # inside, below the segment 20-30 (which gives 40 at 25)
    ((5.0, 50.0), -10.0),   # left of the range: the frontier is flat at the best clean accuracy
])
def test_distance_on_hand_made_points(afs, expected):
    assert distance(afs, SINGLES) == pytest.approx(expected)


def test_no_distance_right_of_the_most_robust_network():
    assert math.isnan(distance((31.0, 10.0), SINGLES))
    assert math.isnan(frontier_clean(envelope(SINGLES), 30.5)) and frontier_clean(envelope(SINGLES), 30.0) == 30.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least one"):
        envelope([])
    with pytest.raises(ValueError, match="draws must be >= 1, got draws=0"):
        bootstrap_draws(10, 0)
    flags = {"clean": np.ones(10, bool), "robust": np.zeros(10, bool)}
    with pytest.raises(ValueError, match="same examples"):
        frontier_study(flags, {"x": {"clean": np.ones(9, bool), "robust": np.zeros(9, bool)}})


def _flags(rng, n, clean, robust):
    c = rng.random(n) < clean
    return {"clean": c, "robust": c & (rng.random(n) < robust / clean)}


def test_the_bootstrap_draws_the_same_examples_for_every_model():
    """AFS identical to the best single network lies exactly on the frontier in every draw: with examples
    drawn separately per model the interval could not be [0, 0]."""
    rng = np.random.default_rng(0)
    same = _flags(rng, 300, 0.6, 0.3)
    other = _flags(rng, 300, 0.4, 0.2)  # dominated in expectation, but not in every draw
    study = frontier_study(same, {"same": same, "other": other}, draws=500)
    assert study["distance"] == 0.0 and study["verdict"] == "on"
    assert study["ci95"][0] <= 0.0 <= study["ci95"][1]
    alone = frontier_study(same, {"same": same}, draws=500)
    assert alone["ci95"] == [0.0, 0.0] and alone["right_of_range_share"] == 0.0
    # reproducible: the draw is seeded
    assert (bootstrap_draws(50, 4, seed=3) == bootstrap_draws(50, 4, seed=3)).all()


def test_the_verdict_follows_the_interval():
    rng = np.random.default_rng(1)
    n = 2000
    weak = {"a": _flags(rng, n, 0.70, 0.05), "b": _flags(rng, n, 0.40, 0.40)}
    far_above = frontier_study(_flags(rng, n, 0.75, 0.30), weak, draws=400)
    assert far_above["position"] == "inside" and far_above["ci95"][0] > 0 and far_above["verdict"] == "above"
    assert "above the frontier" in frontier_text(far_above)
    far_below = frontier_study(_flags(rng, n, 0.30, 0.20), weak, draws=400)
    assert far_below["ci95"][1] < 0 and far_below["verdict"] == "below"
    beyond = frontier_study(_flags(rng, n, 0.60, 0.55), weak, draws=400)
    assert beyond["distance"] is None and beyond["verdict"] == "right of the range" and beyond["ci95"] is None
    assert "more robust than every single network" in frontier_text(beyond)
    # just right of the range: no distance on these images, but the interval still decides the verdict
    edge = frontier_study(_flags(rng, n, 0.40, 0.405), {"a": weak["a"], "b": weak["b"]}, draws=400)
    assert edge["position"] == "right" and edge["distance"] is None
    assert 0 < edge["right_of_range_share"] < 0.975 and edge["ci95"][1] is None and edge["verdict"] == "on"
    assert "on the frontier" in frontier_text(edge) and "right of the range in" in frontier_text(edge)
