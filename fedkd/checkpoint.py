"""Round checkpoints: what a run needs to continue after its server process dies.

After every finished round the run folder's ``checkpoint.fkd`` holds, as one Flower
``RecordDict`` serialized with Flower's own protobuf codec (no pickle anywhere):

* the round number and the global arrays Flower carries between rounds (the student's weights);
* the strategy's state across rounds (consensus, synthetic pools, released batches, the
  privacy accountant, FD's global logits, …), from its ``state_records()``;
* with the in-process engine, every simulated node's ``Context.state`` (its teacher, its DP-SGD
  ledger): the clients died with the process, so they are restored with the server;
* the global torch and NumPy RNG states. Every draw in a round is derived from
  ``(seed, round, client, purpose)``, so these only matter for code that uses the global
  streams; they are restored all the same.

The file is replaced atomically, so a kill mid-write leaves the previous round's checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedkd.messages import array_record, config_record, number, values

CHECKPOINT_FILE = "checkpoint.fkd"
_META, _ARRAYS, _RNG = "meta", "arrays", "rng"
_STRATEGY_PREFIX, _NODE_PREFIX = "strategy:", "node:"

Record = ArrayRecord | ConfigRecord


class ResumeError(ValueError):
    """A run cannot continue from its folder (no folder, another config, an unreadable file)."""


@dataclass
class Checkpoint:
    server_round: int
    arrays: ArrayRecord
    strategy: dict[str, Record] = field(default_factory=dict)
    nodes: dict[int, RecordDict] = field(default_factory=dict)


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``folder`` atomically; returns the file's path."""
    numpy_state = np.random.get_state(legacy=True)
    if not isinstance(numpy_state, tuple):  # legacy=True gives the MT19937 tuple
        raise RuntimeError("NumPy's global generator is not MT19937; it cannot be checkpointed.")
    _, numpy_keys, position, has_gauss, gauss = numpy_state
    records = RecordDict(
        {
            _META: ConfigRecord({"round": checkpoint.server_round, "nodes": sorted(checkpoint.nodes)}),
            _ARRAYS: checkpoint.arrays,
            _RNG: ArrayRecord(
                {
                    "torch": Array(torch.get_rng_state().numpy()),
                    "numpy-keys": Array(np.asarray(numpy_keys)),
                    "numpy-position": Array(np.asarray([position, has_gauss], dtype=np.int64)),
                    "numpy-gauss": Array(np.asarray([gauss], dtype=np.float64)),
                }
            ),
        }
    )
    for key, record in checkpoint.strategy.items():
        records[_STRATEGY_PREFIX + key] = record
    for node_id, state in checkpoint.nodes.items():
        for name, node_record in state.items():
            records[f"{_NODE_PREFIX}{node_id}:{name}"] = node_record
    path = Path(folder) / CHECKPOINT_FILE
    partial = path.with_suffix(".fkd.partial")
    partial.write_bytes(recorddict_to_proto(records).SerializeToString())
    partial.replace(path)
    return path


def load_checkpoint(folder: str | Path) -> Checkpoint | None:
    """The checkpoint in ``folder`` (``None`` if the run never finished a round), with the
    global RNG states restored."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        return None
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(path.read_bytes())
        records = recorddict_from_proto(proto)
        meta = config_record(records, _META)
        rng = array_record(records, _RNG)
        arrays = array_record(records, _ARRAYS)
    except Exception as error:  # noqa: BLE001 - any decoding failure means the same thing
        raise ResumeError(
            f"{path} is not a readable fedkd checkpoint ({type(error).__name__}: {error}); "
            "delete it to start the run afresh."
        ) from error
    torch.set_rng_state(torch.from_numpy(rng["torch"].numpy().copy()))
    position, has_gauss = (int(v) for v in rng["numpy-position"].numpy())
    np.random.set_state(
        ("MT19937", rng["numpy-keys"].numpy(), position, has_gauss, float(rng["numpy-gauss"].numpy()[0]))
    )
    nodes: dict[int, RecordDict] = {int(node): RecordDict() for node in values(meta, "nodes")}
    strategy: dict[str, Record] = {}
    for key, record in records.items():
        if key.startswith(_STRATEGY_PREFIX) and not isinstance(record, MetricRecord):
            strategy[key[len(_STRATEGY_PREFIX) :]] = record
        elif key.startswith(_NODE_PREFIX):
            node, name = key[len(_NODE_PREFIX) :].split(":", 1)
            nodes[int(node)][name] = record
    return Checkpoint(int(number(meta, "round")), arrays, strategy, nodes)


def arrays_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of plain NumPy arrays (strategy state)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})
