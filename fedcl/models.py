"""Models for continual learning with single- or multi-head output.

Every model is a :class:`ContinualModel`: a feature extractor (``features``)
followed by one or more linear heads. A model with one head is *single-head*
(class-incremental / domain-incremental: the task id is ignored); a model with
several heads is *multi-head* (task-incremental: ``forward`` needs the task id
and uses ``heads[task]``).

Built-in architectures (:data:`MODELS`, built by name with :func:`build_model`; a plugin adds
more through :func:`fedcl.plugins.register_model`):

* ``"mlp"`` -- :class:`MLP`, 784-400-400 (two hidden layers of 400; dropout 0.2 on the input,
  0.5 after each hidden layer), fedcl's default.
* ``"mlp-fot"`` -- :func:`fot_mlp`, the MLP of FOT's public code for Permuted-MNIST: three
  hidden layers of 400 (784-400-400-400; its ``hidden_layer_num=2`` counts the layers after the
  first), dropout 0.2 after the first hidden layer and 0.5 after the other two, none on the
  input.
* ``"cnn"`` -- :class:`SmallCNN`, a two-conv-layer network for quick runs.
* ``"resnet18"`` -- :class:`ReducedResNet18`, the reduced ResNet-18 (nf=20)
  of GPM / FOT's 5-Datasets setup.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "BATCH_NORM_MODELS",
    "MLP",
    "MODELS",
    "MODEL_NAMES",
    "BasicBlock",
    "ContinualModel",
    "ModelSpec",
    "ReducedResNet18",
    "SmallCNN",
    "build_model",
    "count_parameters",
    "fot_mlp",
    "model_summary",
    "without_dropout",
]


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be (channels, height, width) with positive sizes, "
            f"got {tuple(input_shape)}"
        )
    return shape  # type: ignore[return-value]


class ContinualModel(nn.Module):
    """Base class: a feature extractor plus ``len(heads)`` linear heads.

    Subclasses call ``super().__init__()``, build their body, then call
    :meth:`_init_heads` (so the body's parameters come first in the
    ``state_dict``), and implement :meth:`features`.
    """

    #: Short architecture name used by :func:`model_summary`.
    name: str = "model"

    def __init__(self) -> None:
        super().__init__()
        self.feature_dim: int = 0
        self.num_classes_per_head: int = 0
        self.heads: nn.ModuleList = nn.ModuleList()

    def _init_heads(
        self, feature_dim: int, num_classes_per_head: int, num_heads: int
    ) -> None:
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        if num_classes_per_head < 1:
            raise ValueError(
                f"num_classes_per_head must be >= 1, got {num_classes_per_head}"
            )
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.feature_dim = feature_dim
        self.num_classes_per_head = num_classes_per_head
        self.heads = nn.ModuleList(
            nn.Linear(feature_dim, num_classes_per_head, bias=True)
            for _ in range(num_heads)
        )

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def multi_head(self) -> bool:
        """True when the model has more than one head (task-incremental)."""
        return len(self.heads) > 1

    def features(self, x: Tensor) -> Tensor:
        """Penultimate representation, shape ``[N, feature_dim]``."""
        raise NotImplementedError

    def head_for(self, task: int | None) -> nn.Linear:
        """The head used for ``task`` (``heads[0]`` on a single-head model)."""
        if len(self.heads) == 0:
            raise RuntimeError(f"{type(self).__name__} has no heads; call _init_heads")
        if not self.multi_head:
            return self.heads[0]  # type: ignore[return-value]
        if task is None:
            raise ValueError("multi-head model needs a task id")
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"task id must be an int, got {type(task).__name__}")
        if not 0 <= task < len(self.heads):
            raise ValueError(
                f"task id {task} out of range for a model with {len(self.heads)} heads "
                f"(valid: 0..{len(self.heads) - 1})"
            )
        return self.heads[task]  # type: ignore[return-value]

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        head = self.head_for(task)
        return head(self.features(x))


class MLP(ContinualModel):
    """flatten -> Dropout(input_dropout) -> [Linear -> ReLU -> Dropout] per hidden size -> head(s).

    Defaults: 784-400-400, Dropout(0.2) on the input and 0.5 after each hidden layer.
    ``hidden_dropouts`` gives each hidden layer its own rate instead of ``hidden_dropout``
    (:func:`fot_mlp`)."""

    name = "mlp"

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes_per_head: int,
        num_heads: int = 1,
        hidden_sizes: Sequence[int] = (400, 400),
        input_dropout: float = 0.2,
        hidden_dropout: float = 0.5,
        hidden_dropouts: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        c, h, w = _check_input_shape(input_shape)
        if len(hidden_sizes) == 0:
            raise ValueError("hidden_sizes must contain at least one layer size")
        rates = ([hidden_dropout] * len(hidden_sizes) if hidden_dropouts is None
                 else [float(r) for r in hidden_dropouts])
        if len(rates) != len(hidden_sizes):
            raise ValueError(f"hidden_dropouts needs one rate per hidden layer "
                             f"({len(hidden_sizes)}), got {len(rates)}")
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(input_dropout)]
        in_features = c * h * w
        for size, rate in zip(hidden_sizes, rates, strict=True):
            layers += [
                nn.Linear(in_features, int(size)),
                nn.ReLU(),
                nn.Dropout(rate),
            ]
            in_features = int(size)
        self.body = nn.Sequential(*layers)
        self._init_heads(in_features, num_classes_per_head, num_heads)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


def fot_mlp(input_shape: Sequence[int], num_classes_per_head: int, num_heads: int = 1) -> MLP:
    """The MLP of FOT's public code (Bakman et al., ICLR 2024) for Permuted-MNIST: flatten ->
    [Linear(400) -> ReLU -> Dropout] x 3 with rates 0.2, 0.5, 0.5 -> head(s); no dropout on
    the input. FOT projects its four Linear weights (three hidden layers and the head)."""
    return MLP(input_shape, num_classes_per_head, num_heads, hidden_sizes=(400, 400, 400),
               input_dropout=0.0, hidden_dropouts=(0.2, 0.5, 0.5))


class SmallCNN(ContinualModel):
    """conv(C,32)-ReLU-pool - conv(32,64)-ReLU-pool - Linear(64*(H/4)*(W/4), 256)-ReLU - head(s)."""

    name = "cnn"

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes_per_head: int,
        num_heads: int = 1,
        hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        c, h, w = _check_input_shape(input_shape)
        if h < 4 or w < 4:
            raise ValueError(f"SmallCNN needs height and width >= 4, got {h}x{w}")
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (h // 2 // 2) * (w // 2 // 2), hidden_dim),
            nn.ReLU(),
        )
        self._init_heads(hidden_dim, num_classes_per_head, num_heads)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False
    )


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN (+ 1x1 conv/BN shortcut when shapes change), ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ReducedResNet18(ContinualModel):
    """GPM-style reduced ResNet-18 (nf=20): 17 3x3 convs, 3 1x1 shortcuts, feature_dim 8*nf."""

    name = "resnet18"

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes_per_head: int,
        num_heads: int = 1,
        nf: int = 20,
    ) -> None:
        super().__init__()
        c, _, _ = _check_input_shape(input_shape)
        if nf < 1:
            raise ValueError(f"nf must be >= 1, got {nf}")
        self.nf = nf
        self.conv1 = _conv3x3(c, nf)
        self.bn1 = nn.BatchNorm2d(nf)
        in_planes = nf
        stages: list[nn.Module] = []
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            planes = mult * nf
            stages.append(
                nn.Sequential(
                    BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)
                )
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._init_heads(8 * nf, num_classes_per_head, num_heads)

    def features(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.pool(out), 1)


@dataclass(frozen=True)
class ModelSpec:
    """A model fedcl builds by name (``model = NAME`` in a config).

    ``build(input_shape, classes_per_head, num_heads)`` returns an ``nn.Module`` whose
    ``forward(x, task)`` maps images ``[N, C, H, W]`` (float, normalised) to logits
    ``[N, classes_per_head]`` of head ``task``. ``batch_norm`` declares running statistics
    (module state a batched cohort cannot share: such a model trains with cohort_size 1 only).
    """

    name: str
    build: Callable[[tuple[int, int, int], int, int], nn.Module]
    batch_norm: bool = False


#: The built-in architectures by name; :mod:`fedcl.plugins` finds plugin models beside them.
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("mlp", MLP),
    ModelSpec("cnn", SmallCNN),
    ModelSpec("resnet18", ReducedResNet18, batch_norm=True),
    ModelSpec("mlp-fot", fot_mlp),
)}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
#: built-in models with batch norm (running statistics are module state: no batched cohorts)
BATCH_NORM_MODELS: tuple[str, ...] = tuple(n for n, spec in MODELS.items() if spec.batch_norm)


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes_per_head: int,
    num_heads: int = 1,
) -> ContinualModel:
    """Build the built-in model ``name`` (one of :data:`MODEL_NAMES`) with default
    hyperparameters: ``num_heads`` heads of ``num_classes_per_head`` outputs on inputs of
    ``input_shape`` (C, H, W). Raises ``ValueError`` for an unknown name or bad sizes.

    Parameter initialisation draws from torch's global RNG, so the result is
    deterministic under ``torch.manual_seed``. A run's model comes from
    :func:`fedcl.plugins.build_model`, which also knows plugin models.
    """
    try:
        spec = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}"
        ) from None
    return spec.build(input_shape, num_classes_per_head, num_heads)  # type: ignore[return-value]


#: the dropout modules :func:`without_dropout` takes out
DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout)


def without_dropout(model: nn.Module) -> nn.Module:
    """``model`` with every dropout module (:data:`DROPOUT_MODULES`) replaced, in place, by
    ``nn.Identity``; returns ``model``. Dropout holds no parameters or buffers, so the
    ``state_dict`` keeps its keys and shapes, and eval-mode outputs do not change; train mode
    stops dropping units. Dropout written as a function call in ``forward`` is not seen."""
    for name, child in list(model.named_children()):
        if isinstance(child, DROPOUT_MODULES):
            setattr(model, name, nn.Identity())
        else:
            without_dropout(child)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of ``model``; buffers are not counted."""
    return sum(
        p.numel() for p in model.parameters() if p.requires_grad or not trainable_only
    )


def model_summary(model: nn.Module) -> str:
    """One line, e.g. ``"mlp: 478,410 params, 1 head"``."""
    name = getattr(model, "name", None) or type(model).__name__
    heads = getattr(model, "heads", None)
    n_heads = len(heads) if heads is not None else 0
    plural = "" if n_heads == 1 else "s"
    return f"{name}: {count_parameters(model):,} params, {n_heads} head{plural}"
