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

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedkd.data import DatasetInfo, to_tensor
from fedkd.messages import CLIENT_ID, METRICS_KEY, SYNTHESIZE_MESSAGE, SYNTHETIC_KEY, TASK_KEY, TRANSFER_IMAGES
from strategies.validation import InvalidReply

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticPool:
    """One round's pooled synthetic inputs and what happened to each query."""

    images: np.ndarray  # uint8 (N, C, H, W), client-id order
    contributors: list[int]
    failed: list[str]
    rejected: list[str]


def validate_synthetic_images(
    images: np.ndarray, *, input_shape: Sequence[int], max_count: int
) -> np.ndarray:
    """Return ``images`` if they are 1..max_count uint8 inputs of ``input_shape``, else raise."""
    shape = tuple(input_shape)
    if images.dtype != np.uint8:
        raise InvalidReply(f"synthetic images must be uint8 pixels, got dtype {images.dtype}.")
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise InvalidReply(
            f"synthetic images must have shape (n, {', '.join(map(str, shape))}), "
            f"got {tuple(images.shape)}."
        )
    if not 1 <= len(images) <= max_count:
        raise InvalidReply(f"expected 1..{max_count} synthetic images, got {len(images)}.")
    return images


def pool_synthetic_replies(
    replies: Iterable[Message], *, input_shape: Sequence[int], max_per_client: int
) -> SyntheticPool:
    """Validate the clients' synthetic inputs and concatenate them in client-id order."""
    accepted: list[tuple[int, np.ndarray]] = []
    failed: list[str] = []
    rejected: list[str] = []
    for reply in replies:
        source = f"node {reply.metadata.src_node_id}"
        if reply.has_error():
            failed.append(f"{source}: {reply.error.reason}")
            continue
        try:
            images = reply.content[SYNTHETIC_KEY][TRANSFER_IMAGES].numpy()
            images = validate_synthetic_images(images, input_shape=input_shape, max_count=max_per_client)
            accepted.append((int(reply.content[METRICS_KEY][CLIENT_ID]), images))
        except (KeyError, TypeError, ValueError) as error:
            rejected.append(f"{source}: {error}")
    accepted.sort(key=lambda item: item[0])
    channels, height, width = tuple(input_shape)
    images = (
        np.concatenate([images for _, images in accepted])
        if accepted
        else np.zeros((0, channels, height, width), dtype=np.uint8)
    )
    return SyntheticPool(images, [client for client, _ in accepted], failed, rejected)


@dataclass(frozen=True)
class SyntheticTransfer:
    """Asks the sampled clients for synthetic inputs and pools them.

    Parameters
    ----------
    info : DatasetInfo
        Shape and normalization the synthetic inputs must have (no data is loaded).
    per_client : int
        How many inputs a client is asked for (more are rejected).
    keep_pools : bool
        Distill on every round's pool so far, each with the soft labels it got in its round
        (the memory bank of CMI and Fast-DFKD), rather than on this round's pool only. Costs
        no extra bytes: old pools are not sent again.
    timeout : float
        Seconds to wait for the clients' answers.
    """

    info: DatasetInfo
    per_client: int
    keep_pools: bool = True
    timeout: float = 3600.0

    def decode(self, images: np.ndarray) -> torch.Tensor:
        """The pooled uint8 images as normalized inputs for the student."""
        return to_tensor(images, self.info)

    def gather(self, grid: Grid, node_ids: Sequence[int], task: ConfigRecord) -> SyntheticPool:
        queries = [
            Message(RecordDict({TASK_KEY: task}), dst_node_id=node_id, message_type=SYNTHESIZE_MESSAGE)
            for node_id in node_ids
        ]
        replies = grid.send_and_receive(queries, timeout=self.timeout)
        return pool_synthetic_replies(
            replies, input_shape=self.info.input_shape, max_per_client=self.per_client
        )
