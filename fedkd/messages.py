"""What crosses the wire between ServerApp and ClientApp, and how many bytes it takes.

Train message (server → client), soft-label mode::

    "config":   ConfigRecord  — the ClientTask (see fedkd.config)
    "transfer": ArrayRecord   — "indices": int32 indices of the public transfer inputs
    "consensus": ArrayRecord  — (FedMD, DS-FL, co-distillation) "indices" and float16 "probs": last round's aggregate

Reply (client → server)::

    "soft-labels": ArrayRecord  — "probs": float32 (N, C), softmax(logits / T) per transfer input
    "metrics":     MetricRecord — "num-examples", "client-id", "train-loss"

With ``privacy=dpsgd`` the metrics also carry "epsilon" (the client's ε so far); with
``privacy=gnmax`` the "probs" rows are one-hot votes; with ``privacy=gaussian`` and
``noise_at=clients`` they are clipped rows plus the client's share of Gaussian noise.

Synthetic transfer (``transfer=synthetic``) adds a query message each round before the train
message: the server sends "config" (message type ``query.synthesize``) and each client replies::

    "synthetic": ArrayRecord  — "images": uint8 (n, C, H, W) inputs inverted from its teacher
    "metrics":   MetricRecord — "client-id", "synthesis-seconds"

The train message's "transfer" record then carries "images" (the pooled uint8 inputs) instead
of "indices"; the reply is unchanged.

FD sends "class-logits" (C×C float32 "logits", C int64 "counts") both ways instead of soft labels.
In weight mode (FedAvg, FedDF) the message carries "arrays" (the global model) both ways instead.
Arrays travel as ``.npy`` bytes loaded with ``allow_pickle=False``: no pickle anywhere.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, MetricRecordValues, RecordDict

from fedkd.mixup import MixupPairs

TASK_KEY = "config"
TRANSFER_KEY = "transfer"
TRANSFER_INDICES = "indices"
TRANSFER_IMAGES = "images"
MIXUP_FIRST, MIXUP_SECOND, MIXUP_WEIGHT = "mixup-first", "mixup-second", "mixup-weight"
SYNTHETIC_KEY = "synthetic"
SYNTHESIZE_MESSAGE = "query.synthesize"
CONSENSUS_KEY = "consensus"
CLASS_LOGITS_KEY = "class-logits"
LOGITS = "logits"
COUNTS = "counts"
SOFT_LABELS_KEY = "soft-labels"
SOFT_LABELS_ARRAY = "probs"
METRICS_KEY = "metrics"
WEIGHTS_KEY = "arrays"
NUM_EXAMPLES = "num-examples"
CLIENT_ID = "client-id"
EPSILON = "epsilon"
CLASS_COUNTS = "class-counts"


def transfer_record(indices: np.ndarray, mixup: MixupPairs | None = None) -> ArrayRecord:
    """The transfer inputs a client must label, as indices into the public split, and any mixup
    views of them (labelled after the indexed inputs, in order)."""
    arrays = {TRANSFER_INDICES: Array(np.ascontiguousarray(indices, dtype=np.int32))}
    if mixup is not None and len(mixup):
        arrays[MIXUP_FIRST] = Array(np.ascontiguousarray(mixup.first, dtype=np.int32))
        arrays[MIXUP_SECOND] = Array(np.ascontiguousarray(mixup.second, dtype=np.int32))
        arrays[MIXUP_WEIGHT] = Array(np.ascontiguousarray(mixup.weight, dtype=np.float32))
    return ArrayRecord(arrays)


def mixup_pairs(record: ArrayRecord) -> MixupPairs | None:
    """The mixup views a transfer record asks for, if any."""
    if MIXUP_FIRST not in record:
        return None
    return MixupPairs(record[MIXUP_FIRST].numpy(), record[MIXUP_SECOND].numpy(), record[MIXUP_WEIGHT].numpy())


def synthetic_transfer_record(images: np.ndarray) -> ArrayRecord:
    """Transfer inputs sent by value: the pooled synthetic images, uint8 ``(N, C, H, W)``."""
    return ArrayRecord({TRANSFER_IMAGES: Array(np.ascontiguousarray(images, dtype=np.uint8))})


def synthetic_reply(images: np.ndarray, *, client_id: int, seconds: float) -> RecordDict:
    """A client's answer to the synthesize query."""
    return RecordDict(
        {
            SYNTHETIC_KEY: ArrayRecord({TRANSFER_IMAGES: Array(np.ascontiguousarray(images, dtype=np.uint8))}),
            METRICS_KEY: MetricRecord({CLIENT_ID: client_id, "synthesis-seconds": float(seconds)}),
        }
    )


def consensus_record(indices: np.ndarray, probs: np.ndarray) -> ArrayRecord:
    """The aggregated soft labels sent back down (FedMD, DS-FL, co-distillation), with the inputs
    they label. The probabilities travel as float16, half of float32's bytes: a target for the
    KD loss needs three significant digits, not seven (:func:`consensus_targets` reads them)."""
    return ArrayRecord(
        {
            TRANSFER_INDICES: Array(np.ascontiguousarray(indices, dtype=np.int32)),
            SOFT_LABELS_ARRAY: Array(np.ascontiguousarray(probs, dtype=np.float16)),
        }
    )


def consensus_targets(record: ArrayRecord) -> tuple[np.ndarray, np.ndarray]:
    """The public positions and float32 probability rows of a :func:`consensus_record`, each row
    renormalized to sum to 1 (float16 rounding leaves them off by up to ~1e-3)."""
    probs = record[SOFT_LABELS_ARRAY].numpy().astype(np.float32)
    return record[TRANSFER_INDICES].numpy(), probs / probs.sum(axis=1, keepdims=True)


def soft_label_reply(
    probs: np.ndarray,
    *,
    num_examples: int,
    client_id: int,
    train_loss: float | None = None,
    epsilon: float | None = None,
    class_counts: list[int] | None = None,
) -> RecordDict:
    """The whole content of a client's soft-label reply.

    ``train_loss`` is computed on private data: it is left out (``None``) under any privacy
    mechanism. ``epsilon`` is the client's DP-SGD budget spent so far. ``class_counts``, the
    client's examples per class, is sent only for ``strategy.aggregator=class_weighted``, which
    the configuration refuses under every privacy mechanism.
    """
    metrics: dict[str, MetricRecordValues] = {NUM_EXAMPLES: num_examples, CLIENT_ID: client_id}
    if class_counts is not None:
        metrics[CLASS_COUNTS] = [int(count) for count in class_counts]
    if train_loss is not None:
        metrics["train-loss"] = float(train_loss)
    if epsilon is not None:
        metrics[EPSILON] = float(epsilon)
    return RecordDict(
        {
            SOFT_LABELS_KEY: ArrayRecord({SOFT_LABELS_ARRAY: Array(np.ascontiguousarray(probs, dtype=np.float32))}),
            METRICS_KEY: MetricRecord(metrics),
        }
    )


def class_logits_record(logits: np.ndarray, counts: np.ndarray) -> ArrayRecord:
    """Per-class mean logits (C×C) and class counts (C), FD's payload in both directions."""
    return ArrayRecord(
        {
            LOGITS: Array(np.ascontiguousarray(logits, dtype=np.float32)),
            COUNTS: Array(np.ascontiguousarray(counts, dtype=np.int64)),
        }
    )


def _value_bytes(value: object) -> int:
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(item) for item in value)
    return 8  # int, float and bool travel as 64-bit scalars


def payload_bytes(content: RecordDict) -> int:
    """Bytes of payload in a message: serialized array buffers plus scalar values.

    Protocol framing (record names, gRPC headers) is left out, so two strategies compare on
    what they choose to send.
    """
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            total += sum(_value_bytes(value) for value in record.values())
    return total


# Typed access to a RecordDict: Flower types ``content[key]`` as any of its three records, and a
# malformed reply may hold the wrong one. Each raises ``TypeError`` (a rejected reply) if so.


def array_record(content: RecordDict, key: str) -> ArrayRecord:
    return _record(content, key, ArrayRecord)


def metric_record(content: RecordDict, key: str) -> MetricRecord:
    return _record(content, key, MetricRecord)


def config_record(content: RecordDict, key: str) -> ConfigRecord:
    return _record(content, key, ConfigRecord)


_Record = TypeVar("_Record", ArrayRecord, MetricRecord, ConfigRecord)


def _record(content: RecordDict, key: str, kind: type[_Record]) -> _Record:
    record = content[key]
    if not isinstance(record, kind):
        raise TypeError(f"{key!r} holds a {type(record).__name__}, expected a {kind.__name__}.")
    return record


def number(record: MetricRecord | ConfigRecord, key: str) -> float:
    """A scalar metric or config value as a float (``TypeError`` if it is not a number)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key!r} is {value!r}, expected a number.")
    return float(value)


def values(record: MetricRecord | ConfigRecord, key: str) -> list[Any]:
    """A list-valued metric or config entry (``TypeError`` if it is not a list)."""
    value = record[key]
    if not isinstance(value, list):
        raise TypeError(f"{key!r} is {value!r}, expected a list.")
    return value
