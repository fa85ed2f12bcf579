"""Backbones tests bring to `prepare_data.py from-images --backbone backbones:NAME` (tests/ is on the
Ray workers' path): small, deterministic, and cheap on a 2-core machine."""
from __future__ import annotations

import torch
from torch import nn


def tiny(weights: str | None = None) -> nn.Module:
    """(B, 3, w, w) -> (B, 16, 2, 2): a 2 x 2 average of the image, mixed by a fixed 1 x 1 convolution.

    Images of one colour give one feature vector: the test's classes are told apart by their colours.
    `weights`: a state-dict file of this network (the --weights path is exercised with it)."""
    g = torch.Generator().manual_seed(1234)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Conv2d(3, 16, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(16, 3, 1, 1, generator=g))
        net[1].bias.copy_(torch.randn(16, generator=g) * 0.1)
    if weights is not None:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net


def flat() -> nn.Module:
    """A network whose output is not a feature map (B, 3): refused by name (and it takes no weights)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
