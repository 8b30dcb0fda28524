"""What a run's models score before any training: the baseline a learning test must beat."""

from __future__ import annotations

from fedkd.config import RunConfig
from fedkd.data.local import evaluation_split, info_for
from fedkd.distillation import evaluate
from fedkd.models import build_model, model_for_client
from fedkd.seeding import SeedPurpose, derive_seed


def untrained_student_accuracy(config: RunConfig) -> float:
    """Test accuracy of the server's student as ``run_federation`` builds it, before round 1."""
    info = info_for(config.split_spec())
    student = build_model(
        config.student_model,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        seed=derive_seed(config.seed, SeedPurpose.STUDENT_INIT),
    )
    test = evaluation_split(config.split_spec())
    return evaluate(student, test.images, test.labels).accuracy


def untrained_client_accuracy(config: RunConfig) -> float:
    """The best test accuracy among the clients' freshly initialized models (FD reports theirs)."""
    info = info_for(config.split_spec())
    test = evaluation_split(config.split_spec())
    accuracies = []
    for client_id in range(config.num_clients):
        model = build_model(
            model_for_client(config.teacher_models, client_id),
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            seed=derive_seed(config.seed, client_id, SeedPurpose.TEACHER_INIT),
        )
        accuracies.append(evaluate(model, test.images, test.labels).accuracy)
    return max(accuracies)
