import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation import (
    AGGREGATORS,
    PER_CLASS_WEIGHTS,
    class_weighted,
    confidence_weighted,
    coordinatewise_median,
    coordinatewise_trimmed_mean,
    entropy_reduction,
    entropy_weighted,
    get_aggregator,
    mean,
    median,
    sharpen,
    trimmed_mean,
    weighted_mean,
)


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


# ---------------------------------------------------------------------------------------------
# Input-dependent weights, robust statistics and sharpening.
# ---------------------------------------------------------------------------------------------

# One fast profile for every property test: the whole file must stay well under 10 s.
_PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


def _three_clients():
    # K=3 clients, N=2 inputs, C=2 classes; weights (1, 2, 1).
    stack = np.array(
        [
            [[1.0, 0.0], [0.5, 0.5]],
            [[0.75, 0.25], [0.2, 0.8]],
            [[0.0, 1.0], [0.4, 0.6]],
        ],
        dtype=np.float32,
    )
    return stack, np.array([1.0, 2.0, 1.0])


def _binary_entropy_bits(p):
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) if 0 < p < 1 else 0.0


def test_three_clients_weighted_mean_by_hand():
    # input 0: (1·1 + 2·0.75 + 1·0) / 4 = 2.5 / 4 = 0.625
    # input 1: (1·0.5 + 2·0.2 + 1·0.4) / 4 = 1.3 / 4 = 0.325
    result = AGGREGATORS["weighted"](*_three_clients())
    np.testing.assert_allclose(result, [[0.625, 0.375], [0.325, 0.675]], rtol=1e-6)


def test_confidence_weighted_by_hand():
    # input 0: confidences (1, 0.75, 1) -> weights (1·1, 2·0.75, 1·1) = (1, 1.5, 1), sum 3.5
    #          class 0: (1·1 + 1.5·0.75 + 1·0) / 3.5 = 2.125 / 3.5 = 17/28
    # input 1: confidences (0.5, 0.8, 0.6) -> weights (0.5, 1.6, 0.6), sum 2.7
    #          class 0: (0.5·0.5 + 1.6·0.2 + 0.6·0.4) / 2.7 = (0.25 + 0.32 + 0.24) / 2.7 = 0.3
    result = confidence_weighted(*_three_clients())
    np.testing.assert_allclose(result, [[17 / 28, 11 / 28], [0.3, 0.7]], rtol=1e-6)
    assert result.dtype == np.float32


def test_entropy_weighted_by_hand():
    # With C = 2, H(p) / log C is the binary entropy in bits, h(p).
    # input 0: one-hot rows have h = 0, so clients 0 and 2 keep their weight 1;
    #          client 1: h(0.75) = 0.75·log2(4/3) + 0.25·2 ≈ 0.8113 -> weight 2·(1 − 0.8113)
    w1 = 2 * (1 - _binary_entropy_bits(0.75))
    class0_input0 = (1 * 1.0 + w1 * 0.75 + 1 * 0.0) / (1 + w1 + 1)
    # input 1: client 0 is uniform, h = 1 -> weight 0;
    #          client 1: 2·(1 − h(0.2)) ≈ 2·0.2781, client 2: 1·(1 − h(0.4)) ≈ 0.0290
    v1, v2 = 2 * (1 - _binary_entropy_bits(0.2)), 1 * (1 - _binary_entropy_bits(0.4))
    class0_input1 = (v1 * 0.2 + v2 * 0.4) / (v1 + v2)
    result = entropy_weighted(*_three_clients())
    expected = [[class0_input0, 1 - class0_input0], [class0_input1, 1 - class0_input1]]
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    # the hand numbers: (1 + 0.3774·0.75) / 2.3774 ≈ 0.5397,
    #                   (0.5561·0.2 + 0.0290·0.4) / 0.5852 ≈ 0.2099
    np.testing.assert_allclose(expected, [[0.5397, 0.4603], [0.2099, 0.7901]], atol=1e-4)


def test_entropy_weighted_falls_back_to_weighted_mean_where_every_client_is_uniform():
    # input 0: every client uniform -> all per-input weights 0 -> weighted mean, i.e. uniform.
    # input 1: only the weight-0 client is certain, the others are uniform -> all weights 0
    #          again -> weighted mean over the weighted clients = (0.5, 0.5).
    stack = np.array(
        [
            [[0.5, 0.5], [1.0, 0.0]],
            [[0.5, 0.5], [0.5, 0.5]],
            [[0.5, 0.5], [0.5, 0.5]],
        ]
    )
    weights = np.array([0.0, 1.0, 3.0])
    np.testing.assert_allclose(entropy_weighted(stack, weights), [[0.5, 0.5], [0.5, 0.5]], rtol=1e-6)


def test_median_by_hand():
    # input 0: class 0 values (1, 0.75, 0) -> 0.75; class 1 (0, 0.25, 1) -> 0.25
    # input 1: class 0 values (0.5, 0.2, 0.4) -> 0.4; class 1 (0.5, 0.8, 0.6) -> 0.6
    # (with C = 2 and odd K the medians already sum to 1); the weights (1, 2, 1) play no part.
    stack, weights = _three_clients()
    result = median(stack, weights)
    np.testing.assert_allclose(result, [[0.75, 0.25], [0.4, 0.6]], rtol=1e-6)
    np.testing.assert_array_equal(result, median(stack, np.array([1.0, 100.0, 1.0])))


def test_median_renormalizes_rows():
    # C=3: class 0 (0.6, 0.5, 0.2) -> 0.5; class 1 (0.4, 0.1, 0.3) -> 0.3; class 2 (0, 0.4, 0.5) -> 0.4
    # medians sum to 1.2 -> (0.5, 0.3, 0.4) / 1.2 = (5/12, 3/12, 4/12)
    stack = np.array([[[0.6, 0.4, 0.0]], [[0.5, 0.1, 0.4]], [[0.2, 0.3, 0.5]]])
    np.testing.assert_allclose(coordinatewise_median(stack), [[0.5, 0.3, 0.4]], rtol=1e-12)
    np.testing.assert_allclose(median(stack, np.ones(3)), [[5 / 12, 3 / 12, 4 / 12]], rtol=1e-6)


def test_median_of_total_disagreement_is_uniform():
    # three clients, one-hot on three different classes: every coordinate's median is 0.
    stack = np.eye(3)[:, None, :]
    np.testing.assert_allclose(median(stack, np.ones(3)), [[1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)


def test_trimmed_mean_by_hand():
    stack, weights = _three_clients()
    # default trim_fraction 0.1: floor(0.1·3) = 0 values trimmed -> unweighted mean
    # input 0: (1 + 0.75 + 0) / 3 = 1.75/3; input 1: (0.5 + 0.2 + 0.4) / 3 = 1.1/3
    np.testing.assert_allclose(trimmed_mean(stack, weights), [[1.75 / 3, 1.25 / 3], [1.1 / 3, 1.9 / 3]], rtol=1e-6)
    # trim_fraction 0.34: floor(0.34·3) = 1 trimmed at each end -> the middle value, i.e. the median
    np.testing.assert_allclose(trimmed_mean(stack, weights, trim_fraction=0.34), [[0.75, 0.25], [0.4, 0.6]], rtol=1e-6)


def test_trimmed_mean_drops_floor_of_fraction_times_k_per_end():
    # K=5, one coordinate with values (0, 0.1, 0.2, 0.3, 1.0); C=2 so class 1 is 1 − class 0.
    # trim 0.2 -> floor(1.0) = 1 per end -> (0.1 + 0.2 + 0.3) / 3 = 0.2
    # trim 0.39 -> floor(1.95) = 1 per end -> still 0.2; trim 0.4 -> 2 per end -> 0.2 (median)
    # trim 0.19 -> floor(0.95) = 0 -> plain mean 1.6 / 5 = 0.32
    values = np.array([0.0, 0.1, 0.2, 0.3, 1.0])
    stack = np.stack([values, 1 - values], axis=-1)[:, None, :]
    for fraction, expected in [(0.2, 0.2), (0.39, 0.2), (0.4, 0.2), (0.19, 0.32)]:
        result = coordinatewise_trimmed_mean(stack, trim_fraction=fraction)
        np.testing.assert_allclose(result[0, 0], expected, rtol=1e-12, err_msg=f"{fraction=}")


@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.7, float("nan")])
def test_trim_fraction_out_of_range_is_rejected(fraction):
    stack, weights = _three_clients()
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(stack, weights, trim_fraction=fraction)


def test_sharpen_by_hand():
    probs = np.array([[0.5, 0.5], [0.2, 0.8], [1.0, 0.0], [0.75, 0.25]])
    # T = 0.5 squares: (0.25, 0.25) -> (0.5, 0.5); (0.04, 0.64) / 0.68 = (1/17, 16/17);
    # (1, 0) stays (1, 0) although log 0 is clipped; (0.5625, 0.0625) / 0.625 = (0.9, 0.1)
    np.testing.assert_allclose(
        sharpen(probs, temperature=0.5),
        [[0.5, 0.5], [1 / 17, 16 / 17], [1.0, 0.0], [0.9, 0.1]],
        rtol=1e-6,
    )
    # T = 0.1: (0.75, 0.25)^10 ∝ (3^10, 1) = (59049, 1)
    np.testing.assert_allclose(sharpen(probs[3:], temperature=0.1), [[59049 / 59050, 1 / 59050]], rtol=1e-6)
    # T = 1 leaves probability rows unchanged
    np.testing.assert_allclose(sharpen(probs, temperature=1.0), probs, atol=1e-7)
    assert sharpen(probs, temperature=0.5).dtype == np.float32


def test_sharpen_survives_tiny_temperatures():
    result = sharpen(np.array([[0.3, 0.3, 0.4], [0.0, 0.5, 0.5]]), temperature=1e-300)
    np.testing.assert_allclose(result, [[0.0, 0.0, 1.0], [0.0, 0.5, 0.5]], atol=1e-7)


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("inf"), float("nan")])
def test_sharpen_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        sharpen(np.array([[0.5, 0.5]]), temperature=temperature)


def test_sharpen_rejects_a_stack():
    with pytest.raises(ValueError, match="one \\(inputs, classes\\) matrix"):
        sharpen(np.full((2, 2, 2), 0.5), temperature=0.1)


def test_era_by_hand():
    # weighted mean (see above): (0.625, 0.375) and (0.325, 0.675); DS-FL's ERA is softmax(p̄ / T):
    # input 0 at T = 0.1: softmax(6.25, 3.75) -> class 0 = 1 / (1 + e^-2.5)
    # input 1 at T = 0.1: softmax(3.25, 6.75) -> class 0 = 1 / (1 + e^3.5)
    a, b = 1 / (1 + np.exp(-2.5)), 1 / (1 + np.exp(3.5))
    np.testing.assert_allclose(AGGREGATORS["era"](*_three_clients()), [[a, 1 - a], [b, 1 - b]], rtol=1e-6)
    # at T = 1: softmax(0.625, 0.375) -> 1 / (1 + e^-0.25); much softer than the mean itself
    c = 1 / (1 + np.exp(-0.25))
    np.testing.assert_allclose(entropy_reduction(*_three_clients(), temperature=1.0)[0], [c, 1 - c], rtol=1e-6)


def test_power_sharpened_by_hand():
    # weighted mean (0.625, 0.375): raised to the 10th and renormalized -> 1 / (1 + 0.6^10)
    result = AGGREGATORS["power_sharpened"](*_three_clients())
    np.testing.assert_allclose(result[0], [1 / (1 + 0.6**10), 0.6**10 / (1 + 0.6**10)], rtol=1e-6)


# --- the contract every registered aggregator keeps -------------------------------------------

# The contract below is for aggregators with one weight per client; class_weighted's (K, C)
# class counts have their own tests at the end.
ALL_NAMES = sorted(set(AGGREGATORS) - set(PER_CLASS_WEIGHTS))


def _random_stack(seed, *, clients=5, inputs=7, classes=4, alpha=0.5):
    rng = np.random.default_rng(seed)
    stack = rng.dirichlet(np.full(classes, alpha), size=(clients, inputs)).astype(np.float32)
    return stack, rng.uniform(1, 100, size=clients)


def _assert_probability_rows(result, shape):
    assert result.shape == shape
    assert result.dtype == np.float32
    assert np.isfinite(result).all()
    assert (result >= 0).all()
    np.testing.assert_allclose(result.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_contract_probability_rows(name):
    stack, weights = _random_stack(1)
    _assert_probability_rows(get_aggregator(name)(stack, weights), (7, 4))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_contract_client_order_does_not_matter(name):
    stack, weights = _random_stack(2)
    order = np.array([3, 0, 4, 2, 1])
    aggregate = get_aggregator(name)
    np.testing.assert_allclose(aggregate(stack, weights), aggregate(stack[order], weights[order]), atol=1e-6)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_contract_inputs_not_mutated_and_deterministic(name):
    stack, weights = _random_stack(3)
    stack_copy, weights_copy = stack.copy(), weights.copy()
    aggregate = get_aggregator(name)
    first = aggregate(stack, weights)
    np.testing.assert_array_equal(stack, stack_copy)
    np.testing.assert_array_equal(weights, weights_copy)
    np.testing.assert_array_equal(first, aggregate(stack, weights))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_contract_single_class_and_single_client(name):
    aggregate = get_aggregator(name)
    np.testing.assert_allclose(aggregate(np.ones((3, 2, 1)), np.ones(3)), np.ones((2, 1)))
    stack, weights = _random_stack(4, clients=1)
    _assert_probability_rows(aggregate(stack, weights), (7, 4))


@pytest.mark.parametrize("name", ALL_NAMES)
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
def test_contract_bad_input_is_rejected(name, stack, weights, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator(name)(stack, weights)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_contract_registered_under_a_meaningful_name(name):
    # strategies log the aggregator's __name__; a lambda or bare partial would say nothing.
    assert getattr(AGGREGATORS[name], "__name__", "<lambda>") != "<lambda>"


# --- properties --------------------------------------------------------------------------------


@st.composite
def _stacks(draw):
    """A Dirichlet stack with 1-7 clients, some of them with weight 0 (never all)."""
    seed = draw(st.integers(0, 2**32 - 1))
    clients, inputs = draw(st.integers(1, 7)), draw(st.integers(1, 4))
    classes = draw(st.integers(1, 6))
    alpha = draw(st.sampled_from([0.01, 0.3, 1.0, 10.0]))  # 0.01 gives (near) one-hot rows and zeros
    rng = np.random.default_rng(seed)
    stack = rng.dirichlet(np.full(classes, alpha), size=(clients, inputs)).astype(np.float32)
    weights = rng.uniform(0, 10, size=clients) * (rng.random(clients) < 0.7)
    weights[rng.integers(clients)] += 1.0
    return stack, weights


@_PROPERTY
@given(_stacks())
def test_property_every_aggregator_returns_probability_rows(drawn):
    stack, weights = drawn
    for name in ALL_NAMES:
        result = AGGREGATORS[name](stack, weights)
        assert result.shape == stack.shape[1:], name
        assert (result >= 0).all() and np.isfinite(result).all(), name
        np.testing.assert_allclose(result.sum(axis=1), 1.0, atol=1e-5, err_msg=name)


@_PROPERTY
@given(seed=st.integers(0, 2**32 - 1), position=st.integers(0, 4), one_hot=st.booleans())
def test_property_one_outlier_of_five_stays_within_the_honest_range(seed, position, one_hot):
    # Median of 5 values with at most one outlier is the 2nd-4th smallest honest value, and the
    # 0.2-trimmed mean averages the middle three values, which lie between the honest extremes.
    rng = np.random.default_rng(seed)
    inputs, classes = 3, 4
    honest = rng.dirichlet(np.ones(classes), size=(4, inputs))
    if one_hot:
        outlier = np.eye(classes)[rng.integers(classes, size=inputs)]
    else:
        outlier = rng.dirichlet(np.full(classes, 0.05), size=inputs)
    stack = np.insert(honest, position, outlier, axis=0)
    low, high = honest.min(axis=0), honest.max(axis=0)
    for statistic in (
        coordinatewise_median(stack),
        coordinatewise_trimmed_mean(stack, trim_fraction=0.2),
    ):
        assert (statistic >= low - 1e-12).all() and (statistic <= high + 1e-12).all()


def _entropy(rows):
    rows = rows / rows.sum(axis=1, keepdims=True)
    return -np.sum(rows * np.log(np.where(rows > 0, rows, 1.0)), axis=1)


@_PROPERTY
@given(
    seed=st.integers(0, 2**32 - 1),
    classes=st.integers(2, 8),
    alpha=st.sampled_from([0.05, 1.0, 20.0]),
    temperature=st.floats(0.01, 0.999),
)
def test_property_sharpen_keeps_argmax_and_never_adds_entropy(seed, classes, alpha, temperature):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(classes, alpha), size=6).astype(np.float32)
    sharpened = sharpen(probs, temperature=temperature)
    np.testing.assert_array_equal(sharpened.argmax(axis=1), probs.argmax(axis=1))
    before, after = _entropy(probs.astype(np.float64)), _entropy(sharpened.astype(np.float64))
    assert (after <= before + 1e-6).all()


# --- robustness to one malicious client ---------------------------------------------------------


def _four_honest_one_liar():
    """K=5, N=4, C=3: honest clients favour class n % 3 on input n (p between 0.45 and 0.51);
    client 2 sends a one-hot on the class after it and claims a huge data size."""
    inputs, classes = 4, 3
    truth = np.arange(inputs) % classes
    wrong, other = (truth + 1) % classes, (truth + 2) % classes
    honest = np.zeros((4, inputs, classes))
    for j in range(4):
        honest[j, np.arange(inputs), truth] = 0.45 + 0.02 * j
        honest[j, np.arange(inputs), wrong] = 0.30 - 0.01 * j
        honest[j, np.arange(inputs), other] = 0.25 - 0.01 * j
    liar = np.eye(classes)[wrong]
    stack = np.insert(honest, 2, liar, axis=0)
    return stack, np.array([10.0, 10.0, 1000.0, 10.0, 10.0]), truth


@pytest.mark.parametrize(
    "aggregate",
    [median, functools.partial(trimmed_mean, trim_fraction=0.2)],
    ids=["median", "trimmed_mean(0.2)"],
)
def test_robust_aggregators_keep_the_honest_argmax(aggregate):
    stack, weights, truth = _four_honest_one_liar()
    np.testing.assert_array_equal(aggregate(stack, weights).argmax(axis=1), truth)


def test_mean_is_swayed_by_one_liar():
    # class truth: mean of (0.45, 0.47, 0.49, 0.51, 0) = 0.384; class wrong: (1.14 + 1) / 5 = 0.428
    stack, weights, truth = _four_honest_one_liar()
    assert (mean(stack, weights).argmax(axis=1) != truth).all()
    assert (weighted_mean(stack, weights).argmax(axis=1) != truth).all()


def test_default_trimmed_mean_trims_nothing_below_ten_clients():
    # floor(0.1 · 5) = 0: with the default, five clients get the plain unweighted mean.
    stack, weights, _ = _four_honest_one_liar()
    np.testing.assert_allclose(trimmed_mean(stack, weights), mean(stack, weights), rtol=1e-6)


# --- class_weighted: (K, C) class counts as weights ---------------------------------------------


def test_class_weighted_by_hand():
    # Client 0 learned 9 examples of class 0 and 1 of class 1; client 1 only 4 of class 1.
    stack = np.array([[[0.6, 0.4]], [[0.2, 0.8]]], dtype=np.float32)
    counts = np.array([[9.0, 1.0], [0.0, 4.0]])
    # class 0: (9·0.6 + 0·0.2) / 9 = 0.6; class 1: (1·0.4 + 4·0.8) / 5 = 0.72; renormalized.
    np.testing.assert_allclose(class_weighted(stack, counts), [[0.6 / 1.32, 0.72 / 1.32]], rtol=1e-6)


def test_class_weighted_lets_the_clients_who_know_a_class_decide_it():
    # Three clients never saw class 2 yet put 0.2 on it; the one client that did is sure.
    # The size-weighted mean follows the uninformed majority, the class-weighted one the expert.
    uninformed = np.array([[0.5, 0.3, 0.2]], dtype=np.float32)
    expert = np.array([[0.05, 0.05, 0.9]], dtype=np.float32)
    stack = np.stack([uninformed, uninformed, uninformed, expert])
    counts = np.array([[50.0, 50.0, 0.0], [50.0, 50.0, 0.0], [50.0, 50.0, 0.0], [0.0, 0.0, 100.0]])
    assert weighted_mean(stack, counts.sum(axis=1)).argmax() == 0
    assert class_weighted(stack, counts).argmax() == 2


def test_class_weighted_gives_an_unreported_class_no_mass():
    stack, _ = _random_stack(5, classes=3)
    counts = np.tile([10.0, 5.0, 0.0], (5, 1))
    result = class_weighted(stack, counts)
    _assert_probability_rows(result, (7, 3))
    assert (result[:, 2] == 0).all()


def test_class_weighted_with_equal_class_counts_is_the_mean():
    stack, _ = _random_stack(6)
    np.testing.assert_allclose(class_weighted(stack, np.ones((5, 4))), mean(stack, np.ones(5)), atol=1e-6)


def test_class_weighted_contract():
    stack, _ = _random_stack(7)
    counts = np.random.default_rng(7).integers(0, 30, size=(5, 4)).astype(float)
    counts[:, 0] += 1  # no class unreported
    result = class_weighted(stack, counts)
    _assert_probability_rows(result, (7, 4))
    order = np.array([3, 0, 4, 2, 1])
    np.testing.assert_allclose(result, class_weighted(stack[order], counts[order]), atol=1e-6)
    assert "class_weighted" in PER_CLASS_WEIGHTS and AGGREGATORS["class_weighted"] is class_weighted


def test_class_weighted_power_by_hand():
    # The by-hand example with squared counts: class 0 is still client 0's alone (0.6); class 1 is
    # (1·0.4 + 16·0.8) / 17, nearer the client that holds four examples of it than with counts.
    stack = np.array([[[0.6, 0.4]], [[0.2, 0.8]]], dtype=np.float32)
    counts = np.array([[9.0, 1.0], [0.0, 4.0]])
    class_1 = (0.4 + 16 * 0.8) / 17
    expected = [[0.6 / (0.6 + class_1), class_1 / (0.6 + class_1)]]
    np.testing.assert_allclose(class_weighted(stack, counts, power=2.0), expected, rtol=1e-6)
    np.testing.assert_allclose(class_weighted(stack, counts, power=1.0), class_weighted(stack, counts))


def test_a_higher_power_lets_the_client_with_most_examples_of_a_class_outvote_many_with_a_few():
    # Class 2 of one input: four clients with 10 examples each call it unlikely; one with 30 is sure.
    few = np.array([[0.6, 0.3, 0.1]], dtype=np.float32)
    many = np.array([[0.05, 0.05, 0.9]], dtype=np.float32)
    stack = np.stack([few, few, few, few, many])
    counts = np.array([[40.0, 40.0, 10.0]] * 4 + [[5.0, 5.0, 30.0]])
    assert class_weighted(stack, counts).argmax() != 2
    assert class_weighted(stack, counts, power=2.0).argmax() == 2


@pytest.mark.parametrize("power", [0.0, -1.0, float("inf"), float("nan")])
def test_class_weighted_refuses_a_power_that_is_not_positive_and_finite(power):
    stack, _ = _random_stack(9)
    with pytest.raises(ValueError, match="power must be a finite number > 0"):
        class_weighted(stack, np.ones((5, 4)), power=power)


@pytest.mark.parametrize(
    "counts, match",
    [
        (np.ones(5), "class counts, shape \\(5, 4\\)"),
        (np.ones((5, 3)), "class counts, shape"),
        (-np.ones((5, 4)), "non-negative"),
        (np.zeros((5, 4)), "not all zero"),
    ],
)
def test_class_weighted_rejects_bad_counts(counts, match):
    stack, _ = _random_stack(8)
    with pytest.raises(ValueError, match=match):
        class_weighted(stack, counts)
