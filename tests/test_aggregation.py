import numpy as np
import pytest

from strategies.aggregation import get_aggregator, mean, weighted_mean


def _stack():
    # two clients, two transfer inputs, two classes
    return np.array(
        [
            [[1.0, 0.0], [0.5, 0.5]],
            [[0.0, 1.0], [0.1, 0.9]],
        ],
        dtype=np.float32,
    )


def test_weighted_mean_by_hand():
    result = weighted_mean(_stack(), np.array([3.0, 1.0]))
    expected = np.array([[0.75, 0.25], [0.4, 0.6]])
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    assert result.dtype == np.float32


def test_mean_ignores_weights():
    result = mean(_stack(), np.array([3.0, 1.0]))
    np.testing.assert_allclose(result, [[0.5, 0.5], [0.3, 0.7]], rtol=1e-6)


def test_rows_stay_probability_vectors():
    rng = np.random.default_rng(0)
    stack = rng.dirichlet(np.ones(10), size=(5, 7)).astype(np.float32)
    result = weighted_mean(stack, rng.uniform(1, 100, size=5))
    np.testing.assert_allclose(result.sum(axis=1), 1.0, atol=1e-5)


def test_client_order_does_not_matter():
    stack, weights = _stack(), np.array([3.0, 1.0])
    np.testing.assert_allclose(weighted_mean(stack, weights), weighted_mean(stack[::-1], weights[::-1]), rtol=1e-6)


def test_inputs_are_not_mutated():
    stack, weights = _stack(), np.array([3.0, 1.0])
    stack_copy, weights_copy = stack.copy(), weights.copy()
    weighted_mean(stack, weights)
    np.testing.assert_array_equal(stack, stack_copy)
    np.testing.assert_array_equal(weights, weights_copy)


@pytest.mark.parametrize(
    "stack, weights, match",
    [
        (np.zeros((0, 2, 2)), np.zeros(0), "no client"),
        (np.zeros((2, 2)), np.ones(2), "stacked"),
        (np.zeros((2, 2, 2)), np.ones(3), "one weight per client"),
        (np.zeros((2, 2, 2)), np.array([1.0, -1.0]), "non-negative"),
        (np.zeros((2, 2, 2)), np.zeros(2), "not all zero"),
    ],
)
def test_bad_input_is_rejected(stack, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_mean(stack, weights)


def test_unknown_aggregator_names_the_choices():
    with pytest.raises(ValueError, match="weighted"):
        get_aggregator("nope")
