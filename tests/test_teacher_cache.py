"""The teacher cache: which settings share teachers, and a cached run reports what a trained one does."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from federation import client_app
from federation.sim import simulate
from federation.teacher_cache import CachedTeacher, TeacherCache, entry_key
from fedkd.config import AttackConfig, PartitionConfig, RunConfig, StrategyConfig, SynthesisConfig
from fedkd.privacy.config import PrivacyConfig

RUN = RunConfig(dataset="digits", num_clients=4, public_size=200)
INDICES = {"indices": np.arange(200, dtype=np.int32)}


def key(run: RunConfig = RUN, **changes) -> str:
    where = {"server_round": 2, "client_id": 1, "flipped": False, "start": None, "received": INDICES}
    return entry_key(run, **{**where, **changes})


def test_settings_after_the_teacher_share_it_and_every_other_setting_does_not():
    same = [
        dataclasses.replace(RUN, strategy=StrategyConfig(aggregator="robust")),
        dataclasses.replace(RUN, attack=AttackConfig(kind="scale", fraction=0.3)),
        dataclasses.replace(RUN, mixup_views=100),
        dataclasses.replace(RUN, rounds=3, temperature=3.0, distill_epochs=1, student_model="cnn_small"),
        dataclasses.replace(RUN, distill_schedule="cosine", distill_ema=0.99),
        # The student's own shifts act on its inputs only; the teachers' are augment_shift.
        dataclasses.replace(RUN, student_shift=0.025),
        # The cache serves public transfer only, where no synthesis setting reaches a teacher.
        dataclasses.replace(RUN, synthesis=SynthesisConfig(steps=7, warm_steps=0, replay_inputs=5)),
        dataclasses.replace(RUN, engine="processes", teacher_cache="/elsewhere", data_root="/other/copy"),
    ]
    assert {key(run) for run in same} == {key()}
    different = [
        dataclasses.replace(RUN, local_epochs=1),
        dataclasses.replace(RUN, seed=1),
        dataclasses.replace(RUN, partition=PartitionConfig(alpha=0.1)),
        dataclasses.replace(RUN, strategy=StrategyConfig(name="fedmd")),
    ]
    changed = [key(run) for run in different] + [
        key(server_round=3),
        key(client_id=2),
        key(flipped=True),
        key(received={"indices": INDICES["indices"][::-1].copy()}),
        key(received={**INDICES, "consensus/probs": np.full((200, 10), 0.1, dtype=np.float32)}),
        key(start=ArrayRecord({"weight": torch.zeros(3)})),
    ]
    assert len({key(), *changed}) == 1 + len(changed)
    assert key(start=ArrayRecord({"weight": torch.zeros(3)})) != key(start=ArrayRecord({"weight": torch.ones(3)}))


def test_an_entry_comes_back_as_it_was_stored(tmp_path):
    cache = TeacherCache(tmp_path)
    entry = CachedTeacher({"weight": torch.randn(4, 3)}, torch.randn(5, 10), 0.25)
    assert cache.load(key()) is None
    cache.store(key(), entry)
    loaded = cache.load(key())
    assert loaded is not None and loaded.train_loss == 0.25
    assert torch.equal(loaded.teacher["weight"], entry.teacher["weight"]) and torch.equal(loaded.logits, entry.logits)
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_cache_refuses_private_runs_and_synthetic_transfer():
    with pytest.raises(ValueError, match="teacher_cache with privacy=dpsgd"):
        RunConfig(teacher_cache="cache", privacy=PrivacyConfig(mechanism="dpsgd"))
    with pytest.raises(ValueError, match="transfer=synthetic"):
        RunConfig(teacher_cache="cache", transfer="synthetic")


@pytest.mark.slow
def test_a_cached_run_trains_no_teacher_and_reports_what_the_trained_run_did(tmp_path, monkeypatch):
    base = RunConfig(
        dataset="digits",
        num_clients=4,
        rounds=2,
        public_size=200,
        local_epochs=1,
        distill_epochs=1,
        student_model="cnn_small",
        attack=AttackConfig(kind="flip", fraction=0.25),
        # Co-distilling teachers learn the aggregate, so another aggregator would retrain them.
        strategy=StrategyConfig(consensus_weight=0.0),
    )
    trained = simulate(base, run_dir=tmp_path / "trained")
    cached = dataclasses.replace(base, teacher_cache=str(tmp_path / "cache"))
    recorded = simulate(cached, run_dir=tmp_path / "recorded")

    def no_training(*args, **kwargs):
        raise AssertionError("a teacher trained although the cache holds it")

    monkeypatch.setattr(client_app, "train_locally", no_training)
    robust = dataclasses.replace(cached, strategy=StrategyConfig(aggregator="robust", consensus_weight=0.0))
    replayed = simulate(robust, run_dir=tmp_path / "replayed-robust")
    again = simulate(cached, run_dir=tmp_path / "replayed")

    def outcome(rows):
        return [(row["student_accuracy"], row["student_loss"], row["distill_loss"]) for row in rows]

    assert outcome(trained) == outcome(recorded) == outcome(again)
    assert [row["bytes_up"] for row in again] == [row["bytes_up"] for row in trained]
    assert outcome(replayed) != outcome(again)  # the aggregator still acts
