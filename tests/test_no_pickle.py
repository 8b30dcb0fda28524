"""Nothing a client sends, and nothing the run folder holds, is unpickled."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedkd.messages import CLIENT_ID, METRICS_KEY, NUM_EXAMPLES, SOFT_LABELS_ARRAY, SOFT_LABELS_KEY
from strategies.ensemble_distillation import parse_soft_label_replies

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this would run code; the server must never do it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def test_a_pickled_object_array_in_a_reply_is_rejected_not_loaded(capsys):
    buffer = io.BytesIO()
    np.save(buffer, np.array([Payload()], dtype=object), allow_pickle=True)
    smuggled = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    content = RecordDict(
        {
            SOFT_LABELS_KEY: ArrayRecord({SOFT_LABELS_ARRAY: smuggled}),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: 10, CLIENT_ID: 0}),
        }
    )
    reply = Message(content, dst_node_id=0, message_type="train")
    reply.metadata.__dict__["_src_node_id"] = 7
    parsed = parse_soft_label_replies([reply], num_inputs=1, num_classes=10)
    assert parsed.accepted == [] and parsed.rejected_nodes == [7]
    assert "unpickled!" not in capsys.readouterr().out


def test_the_code_never_unpickles():
    sources = [p for folder in ("fedkd", "strategies", "generators") for p in (ROOT / folder).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert not re.search(r"\bimport pickle\b|\bpickle\.loads?\(|allow_pickle\s*=\s*True", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
    assert pickle  # the test itself uses pickle only to build the hostile payload
