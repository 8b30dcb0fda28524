"""FedMD: heterogeneous federated learning via model distillation.

Each round the server averages the clients' class scores on the public transfer set into a
consensus and sends it back; each client first *digests* the consensus (fits its own model to
it on the transfer inputs, ``digest_epochs``), then *revisits* its private data
(``local_epochs``), then scores the transfer inputs again. FedMD has no global model; fedkd
still distills the consensus into a server-side student so that every strategy is measured on
the same test split.

What crosses the wire: up, an ``N × C`` float32 soft-label matrix and three scalars; down, the
task config, N int32 indices and (from round 2) the ``N × C`` float16 consensus.

Scores travel as probabilities ``softmax(z / T)`` rather than raw logits, so that every reply
can be validated as a probability matrix.

Reference
---------
Li & Wang, "FedMD: Heterogenous Federated Learning via Model Distillation", NeurIPS 2019
Workshop on Federated Learning. Consensus = unweighted mean (use ``aggregator=mean``).
"""

from __future__ import annotations

from strategies.ensemble_distillation import EnsembleDistillation, build_soft_label_strategy
from strategies.registry import BuildContext, StrategySpec, register


class FedMD(EnsembleDistillation):
    """Ensemble distillation on the public set whose consensus travels down to every client."""

    shares_consensus = True


def build(context: BuildContext) -> FedMD:
    return build_soft_label_strategy(FedMD, context, context.public_transfer())


register(
    StrategySpec(
        name="fedmd",
        client_mode="soft-labels",
        build=build,
        privacy=("dpsgd",),
        attacks=True,
        aggregators=True,
        mixup_views=True,
        needs_public_set=True,
        co_distillation=True,
        digests_consensus=True,
    )
)
