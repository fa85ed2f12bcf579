"""ResNet-101's convolutional trunk, written on torch alone, with torchvision's parameter names.

The authors extract features with torchvision's `resnet101(pretrained=True)` (the IMAGENET1K_V1
weights) less its last two layers (average pool and classifier): a 448 x 448 crop gives a
2048 x 14 x 14 map. torchvision does not import against the CPU build of torch, so the same
network is written here: the bottleneck with its stride on the 3 x 3 convolution (torchvision's
"ResNet v1.5"), layers of 3, 4, 23 and 3 blocks, and module names chosen so that torchvision's
state dict loads as it is (its `fc.*` entries are dropped). `tests/test_resnet.py` compares the
two where torchvision imports.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dedn.errors import DatasetError

__all__ = ["ResNetTrunk", "resnet101_trunk", "IMAGENET1K_V1_URL"]

# torchvision's IMAGENET1K_V1 weights for resnet101; the 8 hex digits are the start of the file's sha256
IMAGENET1K_V1_URL = "https://download.pytorch.org/models/resnet101-63fe2227.pth"


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetTrunk(nn.Module):
    """conv1 .. layer4 of a bottleneck ResNet: (B, 3, w, w) -> (B, 2048, w/32, w/32)."""

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 4, 23, 3)):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(64, blocks[0])
        self.layer2 = self._layer(128, blocks[1], stride=2)
        self.layer3 = self._layer(256, blocks[2], stride=2)
        self.layer4 = self._layer(512, blocks[3], stride=2)

    def _layer(self, planes: int, n: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _hub_weights() -> dict[str, torch.Tensor]:
    """torchvision's file from torch's hub cache (where `resnet101(weights=...)` puts it); downloaded there
    with its hash checked when missing and the network allows."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET1K_V1_URL).name
    try:
        return torch.hub.load_state_dict_from_url(IMAGENET1K_V1_URL, map_location="cpu", check_hash=True,
                                                  progress=False)
    except Exception as e:  # noqa: BLE001 - offline, proxy, disk: all mean "bring the file yourself"
        raise DatasetError(cached, "backbone weights", f"torchvision's ResNet-101 IMAGENET1K_V1 file in torch's hub "
                           f"cache, or --weights FILE (download {IMAGENET1K_V1_URL})",
                           f"none, and fetching it failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def resnet101_trunk(weights: str | Path | None = None) -> ResNetTrunk:
    """The authors' backbone: ResNet-101 less its pool and classifier, with IMAGENET1K_V1 weights (`weights`:
    a state-dict file of torchvision's resnet101, or None for torch's hub cache)."""
    model = ResNetTrunk()
    if weights is None:
        state, where = _hub_weights(), "torch hub cache"
    else:
        where = str(weights)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DatasetError(weights, "backbone weights", "a ResNet-101 state-dict file", "no such file") from None
        except Exception as e:  # noqa: BLE001 - torch.load's many ways of saying "not a state dict"
            raise DatasetError(weights, "backbone weights", "a torch state-dict file",
                               f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    if not isinstance(state, dict):
        raise DatasetError(where, "backbone weights", "a state dict (name -> tensor)", type(state).__name__)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape (another depth or width)
        raise DatasetError(where, "backbone weights", "torchvision resnet101 tensor shapes",
                           str(e).splitlines()[-1].strip()[:200]) from None
    if missing or unexpected:
        raise DatasetError(where, "backbone weights", "torchvision resnet101 parameter names",
                           f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                           f"(e.g. {unexpected[:3]})")
    return model.eval()
