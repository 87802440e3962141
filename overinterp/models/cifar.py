"""Small-image architectures in the forms the paper uses (all take normalised (N, C, H, W) input).

- DigitsCNN: a tiny CNN for the embedded 8x8 digits default (fast enough for exact BS on a CPU).
- resnet20: He et al.'s CIFAR ResNet with "option A" shortcuts (strided subsample + zero channels).
- resnet18: the CIFAR form — 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2].
- vgg16_bn: VGG16 with batch norm and a single linear classifier (512 -> classes).
- wrn28_10: Zagoruyko & Komodakis's Wide ResNet, depth 28, width 10 (pre-activation blocks, dropout
  0.3 between their convolutions, as the paper's code trains it); ~36.5M parameters.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitsCNN(nn.Module):
    """conv(8) -> conv(16) -> 2x2 max-pool -> linear. ~2k parameters at 8x8."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(4)  # (N, 2w, 4, 4) for any input size
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


class _ShortcutA(nn.Module):
    """Option A: subsample by stride and zero-pad the new channels (no parameters)."""

    def __init__(self, stride: int, extra: int):
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _ShortcutA(stride, cout - cin)
        else:  # "B": 1x1 projection, as in the CIFAR ResNet18
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks: list[int], widths: list[int], shortcut: str, num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, w, stride, shortcut))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int, in_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                # ceil_mode keeps a 1x1 map at 1x1, so small inputs (8x8 digits) still fit; at 32x32
                # every pool sees an even size and this is the usual floor pooling.
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)  # 1x1 already at 32x32
        return self.classifier(x.flatten(1))


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU, dropout, conv3x3; a 1x1 projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(pre)))))
        # the projection sees the pre-activated input, the identity the raw one (Zagoruyko & Komodakis)
        return out + (x if isinstance(self.shortcut, nn.Identity) else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, dropout: float, num_classes: int, in_channels: int):
        super().__init__()
        n = (depth - 4) // 6  # blocks per group: 4 at depth 28
        widths = [16, 16 * width, 32 * width, 64 * width]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        cin = widths[0]
        for group, w in enumerate(widths[1:]):
            for j in range(n):
                layers.append(WideBlock(cin, w, 2 if group > 0 and j == 0 else 1, dropout))
                cin = w
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU())
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


CIFAR_MODELS = {  # name -> builder(num_classes=, in_channels=)
    "resnet20": partial(CifarResNet, [3, 3, 3], [16, 32, 64], "A"),
    "resnet18": partial(CifarResNet, [2, 2, 2, 2], [64, 128, 256, 512], "B"),
    "vgg16_bn": partial(VGG, VGG16_CFG),
    "wrn28_10": partial(WideResNet, 28, 10, 0.3),  # depth 28, width 10, dropout 0.3
}
