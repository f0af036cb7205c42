"""Tests for fedcl.models: shapes, parameter counts, head routing, errors, determinism."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from fedcl.models import (
    MLP,
    MODEL_NAMES,
    ContinualModel,
    ReducedResNet18,
    SmallCNN,
    build_model,
    count_parameters,
    fot_mlp,
    model_summary,
    without_dropout,
)

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
FEATURE_DIMS = {"mlp": 400, "cnn": 256, "resnet18": 160, "mlp-fot": 400}


def _batch(shape: tuple[int, int, int], n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, *shape, generator=g)


def test_model_names() -> None:
    assert MODEL_NAMES == ("mlp", "cnn", "resnet18", "mlp-fot")


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [MNIST, CIFAR], ids=["1x28x28", "3x32x32"])
def test_single_head_shapes(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes_per_head=10)
    assert isinstance(model, ContinualModel)
    assert model.multi_head is False
    assert model.num_heads == 1
    assert model.feature_dim == FEATURE_DIMS[name]
    x = _batch(shape)
    model.train()
    assert tuple(model(x).shape) == (3, 10)
    model.eval()
    with torch.no_grad():
        assert tuple(model.features(x).shape) == (3, FEATURE_DIMS[name])
        out = model(x)
        # A single-head model ignores the task id entirely.
        assert torch.equal(model(x, task=7), out)
        assert torch.equal(model(x, task=None), out)
    assert tuple(out.shape) == (3, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [MNIST, CIFAR], ids=["1x28x28", "3x32x32"])
def test_multi_head_shapes(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes_per_head=2, num_heads=5)
    assert model.multi_head is True
    assert model.num_heads == 5
    assert len(model.heads) == 5
    for head in model.heads:
        assert isinstance(head, nn.Linear)
        assert head.in_features == FEATURE_DIMS[name]
        assert head.out_features == 2
        assert head.bias is not None
    x = _batch(shape)
    model.eval()
    with torch.no_grad():
        for task in (0, 4):
            assert tuple(model(x, task=task).shape) == (3, 2)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_multi_head_forward_uses_selected_head(name: str) -> None:
    torch.manual_seed(1)
    model = build_model(name, CIFAR, num_classes_per_head=4, num_heads=3)
    model.eval()
    x = _batch(CIFAR, n=2)
    with torch.no_grad():
        feats = model.features(x)
        out1 = model(x, task=1)
        expected = model.heads[1](feats)
        other = model.heads[0](feats)
    assert tuple(out1.shape) == (2, 4)
    assert torch.allclose(out1, expected, atol=0.0, rtol=0.0)
    assert not torch.allclose(out1, other)


def test_multi_head_needs_task_id() -> None:
    model = MLP(MNIST, num_classes_per_head=2, num_heads=3)
    x = _batch(MNIST, n=1)
    with pytest.raises(ValueError, match=r"^multi-head model needs a task id$"):
        model(x)
    with pytest.raises(ValueError, match=r"^multi-head model needs a task id$"):
        model(x, task=None)


@pytest.mark.parametrize("task", [3, -1, 100])
def test_multi_head_task_out_of_range(task: int) -> None:
    model = MLP(MNIST, num_classes_per_head=2, num_heads=3)
    x = _batch(MNIST, n=1)
    msg = f"task id {task} out of range for a model with 3 heads (valid: 0..2)"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        model(x, task=task)


def test_multi_head_task_must_be_int() -> None:
    model = MLP(MNIST, num_classes_per_head=2, num_heads=3)
    x = _batch(MNIST, n=1)
    with pytest.raises(TypeError, match=r"^task id must be an int, got float$"):
        model(x, task=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^task id must be an int, got bool$"):
        model(x, task=True)


def test_build_model_unknown_name() -> None:
    msg = "unknown model 'vgg16'; choose one of mlp, cnn, resnet18, mlp-fot"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        build_model("vgg16", CIFAR, 10)


def test_build_model_classes() -> None:
    assert type(build_model("mlp", MNIST, 10)) is MLP
    assert type(build_model("cnn", MNIST, 10)) is SmallCNN
    assert type(build_model("resnet18", MNIST, 10)) is ReducedResNet18


def test_bad_constructor_args() -> None:
    with pytest.raises(ValueError, match=r"^num_heads must be >= 1, got 0$"):
        build_model("mlp", MNIST, 10, num_heads=0)
    with pytest.raises(ValueError, match=r"^num_classes_per_head must be >= 1, got 0$"):
        build_model("cnn", MNIST, 0)
    with pytest.raises(
        ValueError, match=r"input_shape must be \(channels, height, width\)"
    ):
        build_model("mlp", (28, 28), 10)  # type: ignore[arg-type]


def test_mlp_parameter_count_and_structure() -> None:
    model = MLP(MNIST, num_classes_per_head=10)
    # 784*400 + 400   = 314,000   (Linear 784 -> 400)
    # 400*400 + 400   = 160,400   (Linear 400 -> 400)
    # 400*10  + 10    =   4,010   (head)
    # total           = 478,410
    assert count_parameters(model) == 478_410
    assert model_summary(model) == "mlp: 478,410 params, 1 head"
    linears = [m for m in model.body if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 400),
        (400, 400),
    ]
    assert all(m.bias is not None for m in linears)
    assert [m.p for m in model.body if isinstance(m, nn.Dropout)] == [0.2, 0.5, 0.5]

    # 3 heads of 2 classes: 314,000 + 160,400 + 3*(400*2 + 2) = 476,806
    multi = MLP(MNIST, num_classes_per_head=2, num_heads=3)
    assert count_parameters(multi) == 476_806
    assert model_summary(multi) == "mlp: 476,806 params, 3 heads"

    # 3x32x32 input: 3072*400 + 400 = 1,229,200; + 160,400 + 4,010 = 1,393,610
    assert count_parameters(MLP(CIFAR, num_classes_per_head=10)) == 1_393_610


def test_mlp_custom_hidden_sizes_and_dropout() -> None:
    model = MLP(
        MNIST, 10, hidden_sizes=(100, 50, 25), input_dropout=0.0, hidden_dropout=0.1
    )
    assert model.feature_dim == 25
    assert [m.p for m in model.body if isinstance(m, nn.Dropout)] == [
        0.0,
        0.1,
        0.1,
        0.1,
    ]
    # 784*100+100 + 100*50+50 + 50*25+25 + 25*10+10 = 78,500 + 5,050 + 1,275 + 260 = 85,085
    assert count_parameters(model) == 85_085


def test_cnn_parameter_count() -> None:
    # 1x28x28: conv 1*32*9+32 = 320; conv 32*64*9+64 = 18,496;
    # fc 64*7*7*256+256 = 803,072; head 256*10+10 = 2,570 -> 824,458
    assert count_parameters(build_model("cnn", MNIST, 10)) == 824_458
    # 3x32x32: conv 3*32*9+32 = 896; 18,496; fc 64*8*8*256+256 = 1,048,832; 2,570 -> 1,070,794
    assert (
        model_summary(build_model("cnn", CIFAR, 10)) == "cnn: 1,070,794 params, 1 head"
    )


def test_resnet_structure() -> None:
    model = build_model("resnet18", CIFAR, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    conv3 = [m for m in convs if m.kernel_size == (3, 3)]
    conv1 = [m for m in convs if m.kernel_size == (1, 1)]
    assert len(convs) == 20
    assert len(conv3) == 17
    assert len(conv1) == 3
    assert all(m.bias is None for m in convs)
    assert [m.out_channels for m in conv1] == [40, 80, 160]
    assert [m.stride for m in conv1] == [(2, 2), (2, 2), (2, 2)]
    assert convs[0].in_channels == 3 and convs[0].out_channels == 20
    assert convs[0].stride == (1, 1) and convs[0].padding == (1, 1)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20  # stem + 2 per block (16) + 3 shortcuts
    assert all(m.track_running_stats for m in bns)
    assert model.feature_dim == 160
    # Convs (bias-free): stem 3*20*9 = 540; stage1 4*20*20*9 = 14,400;
    # stage2 20*40*9 + 3*40*40*9 + 20*40 = 51,200; stage3 40*80*9 + 3*80*80*9 + 40*80 = 204,800;
    # stage4 80*160*9 + 3*160*160*9 + 80*160 = 819,200  -> 1,090,140
    # BN (weight+bias): 2*(20 + 4*20 + 5*40 + 5*80 + 5*160) = 3,000; head 160*10+10 = 1,610
    # total 1,094,750
    assert count_parameters(model) == 1_094_750
    # 1-channel stem: 1*20*9 = 180 instead of 540 -> 1,094,390
    assert count_parameters(build_model("resnet18", MNIST, 10)) == 1_094_390


def test_resnet_batchnorm_running_stats_update_in_train_mode() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", CIFAR, 10)
    assert torch.equal(model.bn1.running_mean, torch.zeros(20))
    model.train()
    model(_batch(CIFAR, n=2))
    assert int(model.bn1.num_batches_tracked) == 1
    assert not torch.equal(model.bn1.running_mean, torch.zeros(20))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_model_deterministic_under_seed(name: str) -> None:
    torch.manual_seed(42)
    a = build_model(name, CIFAR, 5, num_heads=2)
    torch.manual_seed(42)
    b = build_model(name, CIFAR, 5, num_heads=2)
    torch.manual_seed(43)
    c = build_model(name, CIFAR, 5, num_heads=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["heads.1.weight"], sc["heads.1.weight"])
    assert sum(t.numel() for t in sa.values()) == sum(t.numel() for t in sb.values())


def test_gradients_reach_body_and_only_the_selected_head() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", MNIST, 3, num_heads=2)
    model(_batch(MNIST, n=2), task=1).sum().backward()
    assert model.heads[0].weight.grad is None
    assert model.heads[1].weight.grad is not None
    assert model.body[0].weight.grad is not None
    assert tuple(model.heads[1].weight.grad.shape) == (3, 256)


def test_without_dropout_keeps_state_and_eval_outputs_and_makes_train_mode_deterministic() -> None:
    torch.manual_seed(0)
    model = MLP(MNIST, 10)
    x = _batch(MNIST, 5)
    model.eval()
    before_eval = model(x)
    keys = list(model.state_dict())
    assert without_dropout(model) is model
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before_eval)  # eval mode had no dropout anyway
    model.train()
    assert torch.equal(model(x), before_eval)  # train mode now drops nothing


def test_fot_mlp_is_the_authors_three_hidden_layers_of_400() -> None:
    from fedcl.subspace import projected_layers

    model = fot_mlp(MNIST, 10)
    linears = [m for m in model.body if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 400), (400, 400), (400, 400)]
    # no dropout on the input, 0.2 after the first hidden layer, 0.5 after the others
    assert [m.p for m in model.body if isinstance(m, nn.Dropout)] == [0.0, 0.2, 0.5, 0.5]
    # 314,000 + 160,400 + 160,400 + 4,010
    assert count_parameters(model) == 638_810
    assert build_model("mlp-fot", MNIST, 10).feature_dim == 400
    # FOT projects all four Linear weights, the head included
    assert len(projected_layers(model)) == 4
    with pytest.raises(ValueError, match="one rate per hidden layer"):
        MLP(MNIST, 10, hidden_sizes=(400, 400), hidden_dropouts=(0.5,))
