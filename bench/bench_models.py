"""torch.nn architectures of the benchmark models built by make_bench_models.py.

Shared so that the trained weights (``NAME.pt`` state_dicts in the bench cache)
can be loaded back later, e.g. for a side-by-side with Torch-Pruning:

    import torch, bench_models
    model = bench_models.build("resnet20_fmnist")
    model.load_state_dict(torch.load(path / "resnet20_fmnist.pt"))
    model.eval()

All models take float32 (N,1,28,28) in [0,1] (pixel / 255) and return (N,10) logits.
Only torch is needed.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))
from make_models import SmallResNet  # noqa: E402  (the ResNet blocks are shared with models/)

# Width multiplier of mobilenetv1_fmnist. Full width (1.0: stem 32, blocks
# 64..512) is affordable on a 2-core CPU once training runs channels_last
# (see make_bench_models.py); 0.5 would halve every width.
MOBILENET_WIDTH = 1.0


class AlexNetMNIST(nn.Module):
    """AlexNet-style CNN for 28x28 MNIST: 5 convs (no BN), 3 max-pools, 3 FC layers."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(96, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 7 -> 3 (floor)
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 3 * 3, 256), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(256, 128), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )
        # Without BN, torch's default init (kaiming_uniform with a=sqrt(5))
        # shrinks the signal layer by layer and the first epoch crawls; He init
        # for the ReLU layers trains quickly. Only the starting point changes.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)  # exports as Flatten (axis=1) -> Gemm
        return self.classifier(x)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # No conv bias: the BN that follows supplies it (and absorbs it when folded).
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: depthwise 3x3-BN-ReLU, then pointwise 1x1-BN-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = _conv_bn_relu(cin, cin, 3, stride=stride, groups=cin)
        self.pw = _conv_bn_relu(cin, cout, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class MobileNetV1FMNIST(nn.Module):
    """MobileNetV1-style CNN for 28x28 Fashion-MNIST.

    Stem conv3x3(1->32), then depthwise-separable blocks with output widths
    64, 128(s2), 128, 256(s2), 256, 512 (all times ``width``), global average
    pool, FC -> 10. Spatial size 28 -> 14 -> 7.
    """

    # (output width, stride) of each depthwise-separable block at width 1.0
    CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 1)]

    def __init__(self, num_classes: int = 10, width: float = MOBILENET_WIDTH):
        super().__init__()
        w = lambda c: int(c * width)  # noqa: E731
        cin = w(32)
        self.stem = _conv_bn_relu(1, cin, 3)
        blocks = []
        for cout, stride in self.CFG:
            blocks.append(DepthwiseSeparable(cin, w(cout), stride))
            cin = w(cout)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)  # exports as GlobalAveragePool
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def ResNet20FMNIST(num_classes: int = 10) -> nn.Module:
    """CIFAR-style ResNet-20: stem conv, 3 stages x 3 basic blocks (16/32/64), GAP, FC; the
    same module as models/make_models.py's small ResNet with one more block per stage."""
    return SmallResNet(num_classes, blocks_per_stage=3)


class VGGWideFMNIST(nn.Module):
    """A plain VGG-style stack whose last 3x3 convs read 192 and 256 channels: im2col rows
    1728 and 2304 wide, the widths where recovery chooses between its exact patch fit and the
    channel-level one (bench/patch_limit.py); the other benchmark models stop at 1152."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, 64, 3), nn.MaxPool2d(2),  # 14x14
            _conv_bn_relu(64, 128, 3), _conv_bn_relu(128, 192, 3), nn.MaxPool2d(2),  # 7x7
            _conv_bn_relu(192, 256, 3), _conv_bn_relu(256, 256, 3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


ARCHITECTURES = {
    "alexnet_mnist": AlexNetMNIST,
    "mobilenetv1_fmnist": MobileNetV1FMNIST,
    "resnet20_fmnist": ResNet20FMNIST,
    "vggwide_fmnist": VGGWideFMNIST,
}


def build(name: str) -> nn.Module:
    """A freshly initialised model of the named benchmark architecture."""
    return ARCHITECTURES[name]()
