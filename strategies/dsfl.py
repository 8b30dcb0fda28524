"""DS-FL: distillation-based semi-supervised federated learning.

Clients send soft labels on the unlabeled open (public) set. The server aggregates them with
*entropy reduction aggregation* (ERA): the averaged probabilities are the logits of a
temperature softmax, ``softmax(p̄ / T)`` with ``T < 1`` (the paper uses 0.1). Lowering the
entropy of the global soft labels speeds up and stabilizes training on non-IID data. The
entropy-reduced labels travel down; every client distills them into its model before its next
local training, and the server distills them into the global student.

What crosses the wire: up, an ``N × C`` float32 soft-label matrix and three scalars; down, the
task config, N int32 indices and (from round 2) the ``N × C`` float16 global soft labels.

Reference
---------
Itahara, Nishio, Koda, Morikura, Yamamoto, "Distillation-Based Semi-Supervised Federated
Learning for Communication-Efficient Collaborative Training with Non-IID Private Data",
IEEE Transactions on Mobile Computing, 2021 (ERA: Section IV-B, Eq. 9).
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.typing import NDArray

from fedkd.config import RunConfig
from strategies.aggregation import ENTROPY_REDUCING, Aggregator, entropy_reduce
from strategies.ensemble_distillation import build_soft_label_strategy
from strategies.fedmd import FedMD
from strategies.registry import BuildContext, StrategySpec, register
from strategies.transfer import PostProcessed


def entropy_reduced(aggregator: Aggregator, *, temperature: float) -> Aggregator:
    """``aggregator`` followed by ERA at ``temperature``."""

    def aggregate(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> NDArray[np.float32]:
        return entropy_reduce(aggregator(soft_labels, weights), temperature=temperature)

    aggregate.__name__ = f"era({getattr(aggregator, '__name__', 'aggregate')}, T={temperature})"
    return aggregate


class DSFL(FedMD):
    """FedMD's consensus loop with entropy-reduction aggregation."""


def build(context: BuildContext) -> DSFL:
    temperature = context.config.strategy.sharpen_temperature
    reduced = PostProcessed(
        context.aggregator,
        functools.partial(entropy_reduce, temperature=temperature),
        step_name=f"era(T={temperature})",
    )
    source = context.public_transfer(reduced)
    return build_soft_label_strategy(DSFL, context, source)


def refuse_double_reduction(config: RunConfig) -> None:
    if config.aggregator in ENTROPY_REDUCING:
        raise ValueError(
            f"strategy=dsfl already reduces entropy; strategy.aggregator={config.strategy.aggregator} would do it "
            "twice. Use the average it reduces (strategy.aggregator=weighted or mean), or "
            f"strategy=ensemble_distillation strategy.aggregator={config.strategy.aggregator}."
        )


register(
    StrategySpec(
        name="dsfl",
        client_mode="soft-labels",
        build=build,
        privacy=("dpsgd",),
        attacks=True,
        aggregators=True,
        mixup_views=True,
        needs_public_set=True,
        co_distillation=True,
        digests_consensus=True,
        extra_check=refuse_double_reduction,
    )
)
