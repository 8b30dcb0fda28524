"""Data-free transfer set: pool the synthetic inputs the clients invert from their teachers.

Before each round's train message the server sends every sampled client a query
(``query.synthesize``); each client trains its teacher for the round and answers with uint8
inputs synthesized from that teacher's BatchNorm statistics (``generators/``). The server
checks the replies, concatenates them in client-id order and sends the pool down with the
train message, so every client labels the same inputs. The server never holds real data.

What crosses the wire, per sampled client and round: up, ``n × C × H × W`` bytes of synthetic
images (then the usual ``N × C`` float32 soft labels); down, the whole pool of ``N × C × H × W``
bytes. Both are counted in ``bytes_up`` / ``bytes_down``.

References
----------
Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020.
Zhang et al., "Fine-tuning Global Model via Data-Free Knowledge Distillation for Non-IID
Federated Learning" (FedFTG), CVPR 2022 — the server-side, data-free variant of this idea.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fedkd.checkpoint import arrays_record
from fedkd.data import DatasetInfo, to_tensor
from fedkd.messages import (
    SYNTHESIZE_MESSAGE,
    SYNTHETIC_KEY,
    TASK_KEY,
    TRANSFER_IMAGES,
    TRANSFER_KEY,
    array_record,
    synthetic_transfer_record,
)
from fedkd.seeding import SeedPurpose, numpy_generator
from strategies.aggregation import Aggregator
from strategies.transfer import (
    ClientAggregator,
    DistillationSet,
    RoundTransfer,
    StateRecords,
    aggregator_state,
    client_aggregator,
    load_aggregator_state,
    stored,
    stored_count,
)
from strategies.validation import InvalidReply, Triage, log_reasons, triage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticPool:
    """One round's pooled synthetic inputs and what happened to each query."""

    images: np.ndarray  # uint8 (N, C, H, W), client-id order
    contributors: list[int]
    failed: list[str]
    rejected: list[str]


def validate_synthetic_images(images: np.ndarray, *, input_shape: Sequence[int], max_count: int) -> np.ndarray:
    """Return ``images`` if they are 1..max_count uint8 inputs of ``input_shape``, else raise."""
    shape = tuple(input_shape)
    if images.dtype != np.uint8:
        raise InvalidReply(f"synthetic images must be uint8 pixels, got dtype {images.dtype}.")
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise InvalidReply(
            f"synthetic images must have shape (n, {', '.join(map(str, shape))}), got {tuple(images.shape)}."
        )
    if not 1 <= len(images) <= max_count:
        raise InvalidReply(f"expected 1..{max_count} synthetic images, got {len(images)}.")
    return images


def pool_synthetic_replies(
    replies: Iterable[Message], *, input_shape: Sequence[int], max_per_client: int
) -> SyntheticPool:
    """Validate the clients' synthetic inputs and concatenate them in client-id order."""

    def parse(reply: Message) -> np.ndarray:
        images = array_record(reply.content, SYNTHETIC_KEY)[TRANSFER_IMAGES].numpy()
        return validate_synthetic_images(images, input_shape=input_shape, max_count=max_per_client)

    sorted_out: Triage[np.ndarray] = triage(replies, parse)
    channels, height, width = tuple(input_shape)
    images = (
        np.concatenate(sorted_out.payloads)
        if sorted_out.accepted
        else np.zeros((0, channels, height, width), dtype=np.uint8)
    )
    return SyntheticPool(images, sorted_out.client_ids, sorted_out.failed, sorted_out.rejected)


def replay_draw(num_earlier: int, replay_inputs: int, rng: np.random.Generator) -> NDArray[np.int64] | None:
    """Sorted positions among ``num_earlier`` kept inputs to replay, or None for all of them
    (``replay_inputs`` 0, or at least as many as there are)."""
    if replay_inputs == 0 or replay_inputs >= num_earlier:
        return None
    return np.sort(rng.choice(num_earlier, size=replay_inputs, replace=False))


class SyntheticTransfer:
    """Transfer source that asks the sampled clients for synthetic inputs and pools them.

    Parameters
    ----------
    info : DatasetInfo
        Shape and normalization the synthetic inputs must have (no data is loaded).
    per_client : int
        How many inputs a client is asked for (more are rejected).
    aggregator : Aggregator
        Combines the clients' soft labels on the pool.
    keep_pools : bool
        Distill on every round's pool so far, each with the soft labels it got in its round
        (the memory bank of CMI and Fast-DFKD), rather than on this round's pool only. Costs
        no extra bytes: old pools are not sent again.
    replay_inputs : int
        With ``keep_pools``: how many inputs of the earlier pools the student replays each round
        beside the newest pool, drawn afresh every round without replacement (0 = all of them).
        Keeps the student's work per round from growing with the rounds.
    seed : int
        The run's seed; the replay draw follows ``(seed, round)``.
    timeout : float
        Seconds to wait for the clients' answers.
    """

    probabilities = True

    def __init__(
        self,
        *,
        info: DatasetInfo,
        per_client: int,
        aggregator: Aggregator | ClientAggregator,
        keep_pools: bool = True,
        replay_inputs: int = 0,
        seed: int = 0,
        timeout: float = 3600.0,
    ) -> None:
        if replay_inputs < 0:
            raise ValueError(f"replay_inputs must be ≥ 0 (0 = replay every earlier pool), got {replay_inputs}.")
        self.info = info
        self.per_client = per_client
        self.aggregator = client_aggregator(aggregator)
        self.keep_pools = keep_pools
        self.replay_inputs = replay_inputs
        self.seed = seed
        self.timeout = timeout
        self._round_inputs: torch.Tensor | None = None
        self._rejected = 0
        self._bank: list[tuple[torch.Tensor, NDArray[np.float32]]] = []

    def describe(self) -> str:
        replay = f", replay_inputs={self.replay_inputs}" if self.keep_pools and self.replay_inputs else ""
        return f"synthetic transfer, {self.per_client} inputs per client, keep_pools={self.keep_pools}{replay}"

    def decode(self, images: np.ndarray) -> torch.Tensor:
        """The pooled uint8 images as normalized inputs for the student."""
        return to_tensor(images, self.info)

    def gather(self, grid: Grid, node_ids: Sequence[int], task: ConfigRecord) -> SyntheticPool:
        queries = [
            Message(RecordDict({TASK_KEY: task}), dst_node_id=node_id, message_type=SYNTHESIZE_MESSAGE)
            for node_id in node_ids
        ]
        replies = grid.send_and_receive(queries, timeout=self.timeout)
        return pool_synthetic_replies(replies, input_shape=self.info.input_shape, max_per_client=self.per_client)

    def prepare(
        self, server_round: int, grid: Grid, node_ids: Sequence[int], task: ConfigRecord
    ) -> RoundTransfer | None:
        pool = self.gather(grid, node_ids, task)
        log_reasons(logger, server_round, "synthesis failed", pool.failed)
        log_reasons(logger, server_round, "synthetic inputs rejected", pool.rejected)
        self._rejected = len(pool.rejected)
        if len(pool.images) == 0:
            logger.warning("round %d: no client sent synthetic inputs; nothing to label.", server_round)
            self._round_inputs = None
            return None
        self._round_inputs = self.decode(pool.images)
        return RoundTransfer({TRANSFER_KEY: synthetic_transfer_record(pool.images)}, num_inputs=len(pool.images))

    def distillation_set(
        self,
        soft_labels: NDArray[np.float32],
        weights: NDArray[np.float64],
        *,
        server_round: int,
        client_ids: Sequence[int] = (),
    ) -> DistillationSet:
        if self._round_inputs is None:
            raise RuntimeError("distillation_set() before a round's pool was gathered.")
        aggregate = self.aggregator.aggregate(soft_labels, weights, client_ids=client_ids)
        if not self.keep_pools:
            return DistillationSet(self._round_inputs, aggregate, aggregate=aggregate)
        self._bank.append((self._round_inputs, aggregate))
        inputs = torch.cat([pool for pool, _ in self._bank])
        targets = np.concatenate([labels for _, labels in self._bank])
        num_earlier = len(targets) - len(aggregate)
        rng = numpy_generator(self.seed, server_round, SeedPurpose.POOL_REPLAY)
        replayed = replay_draw(num_earlier, self.replay_inputs, rng)
        if replayed is not None:
            keep = np.concatenate([replayed, np.arange(num_earlier, len(targets))])
            inputs, targets = inputs[torch.from_numpy(keep)], targets[keep]
        return DistillationSet(inputs, targets, aggregate=aggregate)

    def round_metrics(self) -> dict[str, Any]:
        inputs = 0 if self._round_inputs is None else len(self._round_inputs)
        return {"synthetic-inputs": inputs, "synthesis-rejected": self._rejected}

    def state_records(self) -> StateRecords:
        arrays: dict[str, np.ndarray] = {}
        for index, (inputs, labels) in enumerate(self._bank):
            arrays[f"bank-inputs-{index}"], arrays[f"bank-labels-{index}"] = inputs.numpy(), labels
        return {
            "bank": arrays_record(arrays),
            "bank-size": ConfigRecord({"pools": len(self._bank)}),
            **aggregator_state(self.aggregator),
        }

    def load_state_records(self, state: StateRecords) -> None:
        load_aggregator_state(self.aggregator, state)
        bank = stored(state, "bank", ArrayRecord)
        size = stored_count(state, "bank-size", "pools")
        self._bank = [
            (torch.from_numpy(bank[f"bank-inputs-{i}"].numpy().copy()), bank[f"bank-labels-{i}"].numpy())
            for i in range(size)
        ]
