"""Seed purposes: each value is part of every derived seed, so none may change or collide."""

from __future__ import annotations

import pytest

from fedkd.seeding import SeedPurpose, derive_seed

# The values every committed result was drawn with. A new purpose takes a new value; an
# existing one never changes.
PURPOSE_VALUES = {
    "TEACHER_INIT": 0,
    "TEACHER_TRAIN": 1,
    "STUDENT_INIT": 2,
    "DISTILL": 3,
    "SAMPLE_CLIENTS": 4,
    "TEACHER_DIGEST": 5,
    "SYNTHESIS": 6,
    "PRIVACY_NOISE": 7,
    "PRIVACY_QUERIES": 8,
    "CLIENT_NOISE": 9,
    "FEATURE_NOISE": 10,
    "FEATURE_REFERENCE": 11,
    "ATTACK_SELECTION": 12,
    "ATTACK_NOISE": 13,
    "TEACHER_SHARDS": 14,
    "SEMI_SUPERVISED": 15,
    "ATTACK_COLLUSION": 16,
    "CRASHES": 17,
    "MIXUP_VIEWS": 18,
    "POOL_REPLAY": 19,
    "VALIDATION_SPLIT": 20,
}


def test_purpose_values_are_unique() -> None:
    # An IntEnum silently turns a repeated value into an alias; __members__ keeps aliases.
    values = [purpose.value for purpose in SeedPurpose.__members__.values()]
    assert len(values) == len(set(values))


@pytest.mark.parametrize(("name", "value"), PURPOSE_VALUES.items())
def test_existing_purposes_keep_their_values(name: str, value: int) -> None:
    assert SeedPurpose[name] == value


def test_every_purpose_is_in_the_table() -> None:
    # A purpose added to the enum is added here too, with the value it was given.
    assert set(SeedPurpose.__members__) == set(PURPOSE_VALUES)


@pytest.mark.parametrize("purpose", list(SeedPurpose))
def test_a_purpose_derives_the_seed_its_integer_does(purpose: SeedPurpose) -> None:
    assert derive_seed(3, 2, 1, purpose) == derive_seed(3, 2, 1, int(purpose))
