import numpy as np
import pytest

from strategies.validation import InvalidReply, validate_soft_labels


def _good(n=3, c=4):
    return np.full((n, c), 1.0 / c, dtype=np.float32)


def test_accepts_probability_rows():
    out = validate_soft_labels(_good(), num_inputs=3, num_classes=4)
    assert out.dtype == np.float32 and out.shape == (3, 4)


@pytest.mark.parametrize(
    "probs, match",
    [
        (_good(2, 4), "shape"),
        (_good(3, 5), "shape"),
        (np.ones((3, 4), dtype=np.int64), "dtype"),
        (np.where(np.eye(3, 4) > 0, np.nan, 0.25).astype(np.float32), "NaN"),
        (np.full((3, 4), np.inf, dtype=np.float32), "NaN/Inf"),
        (np.tile(np.array([1.5, -0.5, 0.0, 0.0], dtype=np.float32), (3, 1)), "negative"),
        (np.full((3, 4), 0.3, dtype=np.float32), "sum to 1"),
        ([[0.25] * 4] * 3, "array"),
    ],
)
def test_rejects_bad_replies_with_reason(probs, match):
    with pytest.raises(InvalidReply, match=match):
        validate_soft_labels(probs, num_inputs=3, num_classes=4)


def test_a_round_with_many_bad_replies_logs_a_few_lines_and_a_count(caplog):
    import logging

    from strategies.validation import MAX_REASONS_LOGGED, log_reasons

    with caplog.at_level(logging.WARNING):
        log_reasons(logging.getLogger("test"), 3, "reply rejected", [f"node {k}: NaN" for k in range(1000)])
    assert len(caplog.records) == MAX_REASONS_LOGGED + 1
    assert "995 more reply rejected" in caplog.records[-1].getMessage()


# --- properties (hypothesis) --------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

_shapes = st.tuples(st.integers(1, 12), st.integers(2, 8))


@settings(max_examples=60, deadline=None)
@given(shape=_shapes, data=st.data())
def test_every_matrix_of_probability_rows_is_accepted_unchanged(shape, data):
    logits = data.draw(arrays(np.float64, shape, elements=st.floats(-30, 30)))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
    out = validate_soft_labels(probs, num_inputs=shape[0], num_classes=shape[1])
    np.testing.assert_array_equal(out, probs)


@settings(max_examples=80, deadline=None)
@given(
    shape=_shapes,
    data=st.data(),
    corruption=st.sampled_from(["nan", "inf", "negative", "scaled", "rows", "columns", "integer"]),
)
def test_every_corrupted_matrix_is_rejected_with_a_reason(shape, data, corruption):
    n, c = shape
    probs = np.full(shape, 1.0 / c)
    row, column = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, c - 1))
    if corruption == "nan":
        probs[row, column] = np.nan
    elif corruption == "inf":
        probs[row, column] = np.inf
    elif corruption == "negative":
        probs[row, column] = -data.draw(st.floats(1e-2, 10))
        probs[row, (column + 1) % c] += 1.0 - probs[row].sum()
    elif corruption == "scaled":
        probs = probs * data.draw(st.floats(1.01, 1e6) | st.floats(0, 0.99))
    elif corruption == "rows":
        probs = np.full((n + 1, c), 1.0 / c)
    elif corruption == "columns":
        probs = np.full((n, c + 1), 1.0 / (c + 1))
    else:
        probs = np.ones(shape, dtype=np.int64)
    with pytest.raises(InvalidReply):
        validate_soft_labels(probs, num_inputs=n, num_classes=c)
