import pytest
import torch

from fedkd.models import available_models, build_model, count_parameters, model_for_client


@pytest.mark.parametrize("name", available_models())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_maps_images_to_logits(name, shape):
    model = build_model(name, input_shape=shape, num_classes=10)
    model.eval()
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_teachers_have_batchnorm():
    for name in ("cnn_small", "lenet5_bn", "cnn_fc", "cnn_medium", "resnet8"):
        model = build_model(name, input_shape=(1, 28, 28), num_classes=10)
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), name


def test_seed_fixes_initial_weights_without_touching_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("cnn_small", input_shape=(1, 28, 28), num_classes=10, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_model("cnn_small", input_shape=(1, 28, 28), num_classes=10, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=False):
        assert torch.equal(pa, pb)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="cnn_small"):
        build_model("vgg99", input_shape=(1, 28, 28), num_classes=10)


def test_architectures_are_assigned_round_robin():
    assert [model_for_client(["a", "b"], k) for k in range(4)] == ["a", "b", "a", "b"]


def test_student_is_larger_than_the_logits_it_replaces():
    # FedAvg's per-client upload must dwarf a 2000×10 float32 soft-label matrix.
    student = build_model("cnn_fc", input_shape=(1, 28, 28), num_classes=10)
    assert count_parameters(student) * 4 > 5 * 2000 * 10 * 4


def test_lenet5_half_halves_every_layer():
    full = build_model("lenet5_bn", input_shape=(1, 28, 28), num_classes=10)
    half = build_model("lenet5_half", input_shape=(1, 28, 28), num_classes=10)

    def widths(model):
        return [
            m.out_channels if hasattr(m, "out_channels") else m.out_features
            for m in model.modules()
            if hasattr(m, "out_channels") or hasattr(m, "out_features")
        ]

    assert widths(full) == [6, 16, 120, 84, 10]
    assert widths(half) == [3, 8, 60, 42, 10]


def test_lenet5_bn4_normalizes_the_hidden_linear_layers_too():
    # BatchNorm after both hidden linear layers gives data-free synthesis 120 + 84 more
    # channels of training statistics to match than lenet5_bn's two convolution layers.
    model = build_model("lenet5_bn4", input_shape=(1, 28, 28), num_classes=10)
    assert [m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == [6, 16]
    assert [m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)] == [120, 84]


def test_lenet5_half_plain_is_dafls_student_without_normalization():
    model = build_model("lenet5_half_plain", input_shape=(1, 28, 28), num_classes=10)
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.GroupNorm)
    assert not any(isinstance(m, norms) for m in model.modules())
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [3, 8]
    assert all(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("name", ["cnn_fc", "cnn_small", "lenet5_bn", "resnet8"])
def test_convolution_weights_are_channels_last_and_travel_in_their_logical_order(name):
    from flwr.app import ArrayRecord

    model = build_model(name, input_shape=(1, 28, 28), num_classes=10, seed=0)
    convolutions = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    # What a message or a checkpoint carries is the weights' values, whatever their layout.
    received = build_model(name, input_shape=(1, 28, 28), num_classes=10, seed=1)
    received.load_state_dict(ArrayRecord(model.state_dict()).to_torch_state_dict())
    for sent, got in zip(model.state_dict().values(), received.state_dict().values(), strict=True):
        assert torch.equal(sent, got)
    inputs = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model.eval(), received.eval()
    assert torch.equal(model(inputs), received(inputs))
