"""DS-FL: distillation-based semi-supervised federated learning.

Clients send soft labels on the unlabeled open (public) set. The server aggregates them with
*entropy reduction aggregation* (ERA): the average is sharpened, ``softmax(log p̄ / T_ERA)``
with ``T_ERA < 1`` (the paper uses 0.1). Sharpening pushes the global soft labels towards low
entropy, which the authors show speeds up and stabilizes training on non-IID data. The
sharpened labels travel down; every client distills them into its model before its next local
training, and the server distills them into the global student.

What crosses the wire: up, an ``N × C`` float32 soft-label matrix and three scalars; down, the
task config, N int32 indices and (from round 2) the ``N × C`` float32 global soft labels.

Reference
---------
Itahara, Nishio, Koda, Morikura, Yamamoto, "Distillation-Based Semi-Supervised Federated
Learning for Communication-Efficient Collaborative Training with Non-IID Private Data",
IEEE Transactions on Mobile Computing, 2021.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from strategies.aggregation import Aggregator, sharpen
from strategies.ensemble_distillation import EnsembleDistillation


def entropy_reduced(aggregator: Aggregator, *, temperature: float) -> Aggregator:
    """``aggregator`` followed by ERA sharpening at ``temperature``."""

    def aggregate(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> NDArray[np.float32]:
        return sharpen(aggregator(soft_labels, weights), temperature=temperature)

    aggregate.__name__ = f"era({getattr(aggregator, '__name__', 'aggregate')}, T={temperature})"
    return aggregate


class DSFL(EnsembleDistillation):
    """Ensemble distillation with entropy-reduction aggregation; global labels travel down."""

    shares_consensus = True

    def __init__(self, *, aggregator: Aggregator, sharpen_temperature: float = 0.1, **kwargs: Any) -> None:
        super().__init__(aggregator=entropy_reduced(aggregator, temperature=sharpen_temperature), **kwargs)
