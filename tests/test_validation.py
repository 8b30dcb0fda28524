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
