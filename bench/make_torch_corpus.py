"""Export the PyTorch corpus: one small CNN per family users deploy, plus the real MTCNN nets.

    /tmp/torchenv/bin/python bench/make_torch_corpus.py [--only NAME,...] [--mtcnn-wheel PATH]

Needs torch (2.13 CPU), onnx, onnxruntime and numpy; writes models/corpus/NAME.onnx and
models/corpus/manifest.json (what each file is: family, opset, input shape, whether
BatchNormalization is folded, whether weights sit in Constant nodes, torch-vs-onnxruntime
difference). The files are committed, so tests and bench/torch_corpus.py need no torch.

The synthetic models are written in torch.nn (there is no torchvision here) at small widths,
with seeded random weights. Every BatchNorm gets random affine parameters and then
running statistics measured on random inputs (a few training-mode passes with a
cumulative average), so running means and variances are non-trivial and activations stay
of order one however deep the net is.

Export variants, as users' files come:

- BN folded: eval export with do_constant_folding=True (the TorchScript exporter folds
  every Conv+BatchNorm pair); pre-activation BNs (DenseNet) stay as nodes anyway.
- BN unfolded: eval export with do_constant_folding=False, which skips the fold; the
  script checks that BatchNormalization nodes are present and run in inference mode.
  (training=TrainingMode.PRESERVE is not used: it would export whatever mode the module
  happens to be in.)
- Constant nodes: after export every initializer is moved into a Constant node, as
  Paddle's exporter writes weights.
- Opsets 11..20 come straight from the TorchScript exporter (its newest is 20); 21 and
  above (up to 26, the newest onnxruntime 1.31 runs) are converted from 20 with
  onnx.version_converter, given the IR version their opset needs, and checked to run.

MTCNN (P-, R- and O-Net) are the real pretrained face-detection networks of
facenet-pytorch: the architectures are written out below exactly as facenet_pytorch's
models/mtcnn.py has them, and the weights are read from the wheel's data/{pnet,rnet,onet}.pt
(``pip download facenet-pytorch --no-deps``, then pass the wheel or the unpacked folder
with --mtcnn-wheel). Without it the MTCNN models are skipped.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import version_converter

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = REPO / "models" / "corpus"
TORCHSCRIPT_MAX_OPSET = 20


# -- building blocks ------------------------------------------------------------------

def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: Optional[nn.Module] = None,
            p: Optional[int] = None) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, s, k // 2 if p is None else p, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class SiLUMul(nn.Module):
    """SiLU spelled out as x * sigmoid(x), as EfficientNet code and older exports have it."""

    def forward(self, x):
        return x * torch.sigmoid(x)


# ResNet: basic blocks, 1x1 conv + BN projection shortcut where the shape changes

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride, act=nn.ReLU(inplace=True))
        self.conv2 = conv_bn(cout, cout, 3, 1)
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return F.relu(self.conv2(self.conv1(x)) + identity)


class ResNet(nn.Module):
    def __init__(self, widths=(16, 24, 32), blocks=(2, 1, 1), classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, widths[0], 3, 1, act=nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


# ResNeXt: bottleneck with a grouped 3x3 (cardinality 8, then 4)

class ResNeXtBlock(nn.Module):
    def __init__(self, cin: int, width: int, cout: int, cardinality: int, stride: int = 1):
        super().__init__()
        self.reduce = conv_bn(cin, width, 1, act=nn.ReLU(inplace=True))
        self.grouped = conv_bn(width, width, 3, stride, groups=cardinality, act=nn.ReLU(inplace=True))
        self.expand = conv_bn(width, cout, 1)
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return F.relu(self.expand(self.grouped(self.reduce(x))) + identity)


class ResNeXt(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, act=nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(
            ResNeXtBlock(16, 32, 48, cardinality=8),
            ResNeXtBlock(48, 32, 48, cardinality=8),
            ResNeXtBlock(48, 48, 64, cardinality=4, stride=2),
        )
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# MobileNetV2: inverted residuals, depthwise 3x3, ReLU6 (exported as Clip)

class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, act=nn.ReLU6(inplace=True))]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6(inplace=True)),
                   conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        cfg = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2)]  # expand, out, repeats, first stride
        layers, cin = [conv_bn(3, 16, 3, 2, act=nn.ReLU6(inplace=True))], 16
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, 128, 1, act=nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# MobileNetV3: Squeeze-Excite with Hardsigmoid, HardSwish

def make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int, act: Callable[[], nn.Module], gate: Callable[[], nn.Module]):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class Bneck(nn.Module):
    def __init__(self, cin: int, exp: int, cout: int, k: int, se: bool, hs: bool, stride: int):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers = [] if exp == cin else [conv_bn(cin, exp, 1, act=act())]
        layers.append(conv_bn(exp, exp, k, stride, groups=exp, act=act()))
        if se:
            layers.append(SqueezeExcite(exp, make_divisible(exp // 4), nn.ReLU, nn.Hardsigmoid))
        layers.append(conv_bn(exp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.Hardswish()),
            Bneck(16, 16, 16, 3, se=True, hs=False, stride=2),
            Bneck(16, 48, 24, 3, se=False, hs=False, stride=2),
            Bneck(24, 64, 24, 3, se=True, hs=True, stride=1),
            Bneck(24, 96, 40, 5, se=True, hs=True, stride=2),
            conv_bn(40, 96, 1, act=nn.Hardswish()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(96, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# EfficientNet-style: MBConv with SE, SiLU written as x * sigmoid(x)

class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, act=SiLUMul())]
        layers += [conv_bn(hidden, hidden, k, stride, groups=hidden, act=SiLUMul()),
                   SqueezeExcite(hidden, max(1, cin // 4), SiLUMul, nn.Sigmoid),
                   conv_bn(hidden, cout, 1)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class EfficientNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=SiLUMul())
        self.blocks = nn.Sequential(
            MBConv(16, 16, 1, 3, 1),
            MBConv(16, 24, 4, 3, 2),
            MBConv(24, 24, 4, 5, 1),
            MBConv(24, 40, 4, 5, 2),
        )
        self.head = conv_bn(40, 128, 1, act=SiLUMul())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, classes))

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


# DenseNet: pre-activation dense layers concatenated, transitions with 1x1 conv + avg pool

class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(bn_size * growth), nn.Conv2d(bn_size * growth, growth, 3, 1, 1,
                                                                              bias=False)

    def forward(self, features: List[torch.Tensor]):
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, layers: int, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, bn_size) for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            DenseBlock(3, 16, growth, 2), Transition(16 + 3 * growth, 24),
            DenseBlock(3, 24, growth, 2), Transition(24 + 3 * growth, 32),
            DenseBlock(2, 32, growth, 2), nn.BatchNorm2d(32 + 2 * growth),
        )
        self.classifier = nn.Linear(32 + 2 * growth, classes)

    def forward(self, x):
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


# Inception: parallel 1x1, 3x3, double-3x3 and pool branches concatenated

class InceptionModule(nn.Module):
    def __init__(self, cin: int, b1: int, b3r: int, b3: int, b5r: int, b5: int, pool: int):
        super().__init__()
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.branch1 = conv_bn(cin, b1, 1, act=relu())
        self.branch3 = nn.Sequential(conv_bn(cin, b3r, 1, act=relu()), conv_bn(b3r, b3, 3, act=relu()))
        self.branch5 = nn.Sequential(conv_bn(cin, b5r, 1, act=relu()), conv_bn(b5r, b5, 3, act=relu()),
                                     conv_bn(b5, b5, 3, act=relu()))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pool, 1, act=relu()))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class Inception(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 32, 3, act=nn.ReLU(inplace=True)), nn.MaxPool2d(3, 2, 1))
        self.a = InceptionModule(32, 16, 16, 24, 8, 8, 8)  # -> 56
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.b = InceptionModule(56, 24, 24, 32, 8, 16, 8)  # -> 80
        self.fc = nn.Linear(80, classes)

    def forward(self, x):
        x = self.b(self.pool(self.a(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# VGG: conv-BN-ReLU stacks, max pools, adaptive pool, Flatten into three Linear layers

class VGG(nn.Module):
    def __init__(self, cfg=(16, 16, "M", 32, 32, "M", 48, "M"), classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(cin * 4, 64), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# AlexNet-style with LocalResponseNorm after the first two convs (the original paper's layout)

class AlexNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, 1, 2), nn.ReLU(inplace=True), nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(16, 32, 5, 1, 2), nn.ReLU(inplace=True), nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(32, 40, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(40, 40, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(40, 32, 3, 1, 1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(32 * 3 * 3, 64), nn.ReLU(inplace=True),
                                        nn.Dropout(), nn.Linear(64, 64), nn.ReLU(inplace=True),
                                        nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


# ShuffleNetV2: channel split with chunk, channel shuffle with view/transpose/view (torchvision's code)

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin), conv_bn(cin, half, 1, act=relu()))
        else:
            self.branch1 = nn.Sequential()
        bin_ = cin if stride > 1 else half
        self.branch2 = nn.Sequential(conv_bn(bin_, half, 1, act=relu()), conv_bn(half, half, 3, stride, groups=half),
                                     conv_bn(half, half, 1, act=relu()))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = conv_bn(3, 24, 3, 2, act=nn.ReLU(inplace=True))
        self.stage2 = nn.Sequential(ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1))
        self.stage3 = nn.Sequential(ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1))
        self.conv5 = conv_bn(96, 128, 1, act=nn.ReLU(inplace=True))
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.conv5(self.stage3(self.stage2(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


# RegNetY-style: grouped 3x3 (group width 8) with Squeeze-Excite, residual

class RegNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 8, se_ratio: float = 0.25):
        super().__init__()
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.a = conv_bn(cin, cout, 1, act=relu())
        self.b = conv_bn(cout, cout, 3, stride, groups=cout // group_width, act=relu())
        self.se = SqueezeExcite(cout, max(1, int(round(cin * se_ratio))), nn.ReLU, nn.Sigmoid)
        self.c = conv_bn(cout, cout, 1)
        self.proj = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return F.relu(shortcut + self.c(self.se(self.b(self.a(x)))))


class RegNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=nn.ReLU(inplace=True))
        self.trunk = nn.Sequential(RegNetBlock(16, 32, 2), RegNetBlock(32, 64, 2), RegNetBlock(64, 64, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.trunk(self.stem(x)))


# YOLO-style: Conv-BN-SiLU, C3 and C2f (CSP) blocks, SPPF, nearest upsampling, three detection heads

class YConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class YBottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2, self.add = YConv(c, c, 3), YConv(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """YOLOv5's CSP block: two parallel 1x1 convs, bottlenecks on one, concat, 1x1."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        c = cout // 2
        self.cv1, self.cv2, self.cv3 = YConv(cin, c), YConv(cin, c), YConv(2 * c, cout)
        self.m = nn.Sequential(*(YBottleneck(c, shortcut) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C2f(nn.Module):
    """YOLOv8's CSP block: one 1x1 conv split in two halves with torch.split, bottlenecks
    chained on the second half, every intermediate concatenated, 1x1."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = cout // 2
        self.cv1, self.cv2 = YConv(cin, 2 * self.c), YConv((2 + n) * self.c, cout)
        self.m = nn.ModuleList(YBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__()
        c = cin // 2
        self.cv1, self.cv2 = YConv(cin, c), YConv(c * 4, cout)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class YOLO(nn.Module):
    def __init__(self, classes: int = 3, anchors: int = 3):
        super().__init__()
        self.b0, self.b1 = YConv(3, 8, 3, 2), YConv(8, 16, 3, 2)
        self.b2 = C3(16, 16, 1)  # P3 /4
        self.b3, self.b4 = YConv(16, 32, 3, 2), C2f(32, 32, 1, shortcut=True)  # P4 /8
        self.b5, self.b6 = YConv(32, 48, 3, 2), C2f(48, 48, 1, shortcut=True)
        self.sppf = SPPF(48, 48)  # P5 /16
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h1 = C2f(80, 32)  # up(P5) + P4
        self.h2 = C2f(48, 16)  # up + P3 -> out P3
        self.d1, self.h3 = YConv(16, 16, 3, 2), C2f(48, 32)  # down + h1 -> out P4
        self.d2, self.h4 = YConv(32, 32, 3, 2), C2f(80, 48)  # down + P5 -> out P5
        no = anchors * (5 + classes)
        self.detect = nn.ModuleList([nn.Conv2d(16, no, 1), nn.Conv2d(32, no, 1), nn.Conv2d(48, no, 1)])

    def forward(self, x):
        p3 = self.b2(self.b1(self.b0(x)))
        p4 = self.b4(self.b3(p3))
        p5 = self.sppf(self.b6(self.b5(p4)))
        h1 = self.h1(torch.cat((self.up(p5), p4), 1))
        o3 = self.h2(torch.cat((self.up(h1), p3), 1))
        o4 = self.h3(torch.cat((self.d1(o3), h1), 1))
        o5 = self.h4(torch.cat((self.d2(o4), p5), 1))
        return tuple(d(o) for d, o in zip(self.detect, (o3, o4, o5)))


# MTCNN: facenet_pytorch/models/mtcnn.py's P-, R- and O-Net, written out (same module names,
# so the wheel's state dicts load as they are)

class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, kernel_size=3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, kernel_size=3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, kernel_size=3), nn.PReLU(32)
        self.conv4_1, self.softmax4_1 = nn.Conv2d(32, 2, kernel_size=1), nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, kernel_size=3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, kernel_size=3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, kernel_size=2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.softmax5_1 = nn.Linear(128, 2), nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, kernel_size=3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, kernel_size=3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, kernel_size=3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, kernel_size=2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


# -- the corpus -------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    name: str
    family: str
    make: Callable[[], nn.Module]
    input_hw: Tuple[int, int]
    opset: int
    fold_bn: bool  # False: BatchNormalization nodes stay in the file
    constant_nodes: bool  # True: weights in Constant nodes, no initializers
    outputs: Tuple[str, ...] = ("logits",)
    seed: int = 0
    weights: Optional[str] = None  # MTCNN: which .pt of the facenet-pytorch wheel
    note: str = ""


SPECS: List[Spec] = [
    Spec("resnet", "ResNet", ResNet, (32, 32), 11, True, False, seed=1,
         note="basic blocks 16-16-24-32, 1x1 conv+BN projection shortcuts, GAP, Linear"),
    Spec("resnext", "ResNeXt", ResNeXt, (32, 32), 12, False, False, seed=2,
         note="bottlenecks with grouped 3x3, cardinality 8, 8, 4; projection shortcuts"),
    Spec("mobilenetv2", "MobileNetV2", MobileNetV2, (32, 32), 13, False, False, seed=3,
         note="inverted residuals, depthwise 3x3, ReLU6 (Clip), 1x1 to 128, Linear"),
    Spec("mobilenetv3", "MobileNetV3", MobileNetV3, (32, 32), 14, True, False, seed=4,
         note="bnecks with SE (ReLU, Hardsigmoid gate), HardSwish, Linear-HardSwish-Linear head"),
    Spec("efficientnet", "EfficientNet", EfficientNet, (32, 32), 15, True, False, seed=5,
         note="MBConv with SE, SiLU as x*sigmoid(x), depthwise 3x3/5x5, ReduceMean head"),
    Spec("densenet", "DenseNet", DenseNet, (32, 32), 16, True, True, seed=6,
         note="3 dense blocks (growth 8, bottleneck 1x1), BN-ReLU-conv pre-activation, transitions"),
    Spec("inception", "Inception", Inception, (32, 32), 17, True, False, seed=7,
         note="two Inception modules: 1x1, 1x1-3x3, 1x1-3x3-3x3, maxpool-1x1 branches concatenated"),
    Spec("vgg", "VGG", VGG, (32, 32), 18, False, False, seed=8,
         note="conv-BN-ReLU 16, 16, M, 32, 32, M, 48, M, adaptive avg pool 2x2, Flatten, 3 Linear"),
    Spec("alexnet", "AlexNet", AlexNet, (32, 32), 19, True, False, seed=9,
         note="5 convs, nn.LocalResponseNorm after the first two (torch writes it as a 5-D view, Pad and "
              "AveragePool, not an LRN node), Flatten, 3 Linear, no BN"),
    Spec("shufflenetv2", "ShuffleNetV2", ShuffleNetV2, (32, 32), 20, True, False, seed=10,
         note="units with chunk (Split) and view/transpose/view channel shuffle"),
    Spec("regnet", "RegNet", RegNet, (32, 32), 21, True, True, seed=11,
         note="RegNetY-style: grouped 3x3 (group width 8) + SE, projection shortcuts"),
    Spec("yolo", "YOLO", YOLO, (64, 64), 22, True, False, outputs=("p3", "p4", "p5"), seed=12,
         note="C3 and C2f (torch.split) CSP blocks, SPPF, nearest Upsample (Resize), 3 detection heads"),
    Spec("mtcnn_pnet", "MTCNN P-Net", PNet, (24, 24), 23, True, True, outputs=("boxes", "probs"),
         weights="pnet.pt", note="real pretrained weights (facenet-pytorch); PReLU, Softmax head"),
    Spec("mtcnn_rnet", "MTCNN R-Net", RNet, (24, 24), 24, True, False, outputs=("boxes", "probs"),
         weights="rnet.pt", note="real pretrained weights; permute before the Linear layers"),
    Spec("mtcnn_onet", "MTCNN O-Net", ONet, (48, 48), 26, True, False, outputs=("boxes", "landmarks", "probs"),
         weights="onet.pt", note="real pretrained weights; permute before the Linear layers"),
]
BY_NAME = {s.name: s for s in SPECS}


# -- weights ------------------------------------------------------------------------------

def randomise(model: nn.Module, seed: int, hw: Tuple[int, int]) -> None:
    """Seeded He-normal weights; BatchNorm with random affine parameters and running
    statistics measured on random inputs (cumulative average of a few training passes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn((16, 3) + hw, generator=g))
    model.eval()


def load_mtcnn(model: nn.Module, wheel: Path, weights: str) -> None:
    member = f"facenet_pytorch/data/{weights}"
    if wheel.is_dir():
        data = (wheel / member).read_bytes()
    else:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(member)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()


# -- export -------------------------------------------------------------------------------

def export(model: nn.Module, spec: Spec, x: torch.Tensor) -> onnx.ModelProto:
    opset = min(spec.opset, TORCHSCRIPT_MAX_OPSET)
    dynamic = {name: {0: "N"} for name in ("input",) + spec.outputs}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(model, (x,), path, opset_version=opset, input_names=["input"],
                          output_names=list(spec.outputs), dynamic_axes=dynamic,
                          do_constant_folding=spec.fold_bn, dynamo=False)
        m = onnx.load(path)
    if spec.opset > opset:
        m = version_converter.convert_version(m, spec.opset)
        # the converter keeps the IR version; an exporter at that opset writes the one it needs
        m.ir_version = max(m.ir_version, onnx.helper.find_min_ir_version_for(m.opset_import))
    m.producer_name, m.producer_version = "pytorch", torch.__version__
    m.doc_string = f"onnxprune corpus: {spec.family} ({spec.note})"
    if spec.constant_nodes:
        initializers_to_constants(m)
    return m


def initializers_to_constants(model: onnx.ModelProto) -> None:
    """Every initializer becomes a Constant node at the head of the graph (Paddle's layout)."""
    g = model.graph
    names = {t.name for t in g.initializer}
    consts = [onnx.helper.make_node("Constant", [], [t.name], name=f"const_{i}", value=t)
              for i, t in enumerate(g.initializer)]
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    inputs = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(inputs)


def build(spec: Spec, wheel: Optional[Path]) -> Tuple[onnx.ModelProto, dict]:
    torch.manual_seed(spec.seed)
    model = spec.make()
    shape = (3,) + spec.input_hw
    if spec.weights:
        load_mtcnn(model, wheel, spec.weights)
    else:
        randomise(model, spec.seed, spec.input_hw)
    x = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(100 + spec.seed))
    m = export(model, spec, x)
    onnx.checker.check_model(m, full_check=True)
    ops = sorted({n.op_type for n in m.graph.node})
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    n_const = sum(n.op_type == "Constant" for n in m.graph.node)
    has_bn_module = any(isinstance(mod, nn.BatchNorm2d) for mod in model.modules())
    if not spec.fold_bn and not n_bn:
        raise RuntimeError(f"{spec.name}: unfolded export has no BatchNormalization node")
    for n in m.graph.node:
        if n.op_type == "BatchNormalization" and len([o for o in n.output if o]) != 1:
            raise RuntimeError(f"{spec.name}: BatchNormalization {n.name} exported in training mode")
    if spec.constant_nodes and len(m.graph.initializer):
        raise RuntimeError(f"{spec.name}: initializers left")
    # torch and onnxruntime agree, at batch 2 and batch 5
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    worst = 0.0
    for n in (2, 5):
        xb = torch.randn((n,) + shape, generator=torch.Generator().manual_seed(200 + n))
        with torch.no_grad():
            ref = model(xb)
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = sess.run(None, {"input": xb.numpy()})
        for r, o in zip(ref, got):
            r = r.numpy()
            worst = max(worst, float(np.abs(r - o).max() / max(np.abs(r).max(), 1e-12)))
    if worst > 1e-4:
        raise RuntimeError(f"{spec.name}: onnxruntime differs from torch by {worst:.2e} (relative max)")
    params = sum(p.numel() for p in model.parameters())
    info = dict(
        file=f"{spec.name}.onnx", family=spec.family, note=spec.note, opset=spec.opset,
        ir_version=m.ir_version, input=[1, 3, *spec.input_hw], outputs=list(spec.outputs),
        bn_in_torch=has_bn_module, bn_folded=spec.fold_bn, batchnorm_nodes=n_bn,
        constant_nodes=spec.constant_nodes, constant_node_count=n_const,
        weights="facenet-pytorch " + spec.weights if spec.weights else f"random, seed {spec.seed}",
        params=params, nodes=len(m.graph.node), ops=ops, torch_vs_ort_max_rel=worst,
    )
    return m, info


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated names; default all: " + ", ".join(BY_NAME))
    ap.add_argument("--mtcnn-wheel", default=os.environ.get("FACENET_WHEEL", ""),
                    help="facenet_pytorch wheel (.whl) or the folder it was unpacked in")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown models {unknown}")
    wheel = Path(args.mtcnn_wheel) if args.mtcnn_wheel else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest: Dict[str, dict] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    torch.set_num_threads(1)
    for name in names:
        spec = BY_NAME[name]
        if spec.weights and wheel is None:
            print(f"{name}: skipped (no --mtcnn-wheel)", file=sys.stderr)
            continue
        m, info = build(spec, wheel)
        path = out / info["file"]
        onnx.save(m, str(path))
        info["bytes"] = path.stat().st_size
        manifest[name] = info
        print(f"{name}: opset {spec.opset}, {info['nodes']} nodes, {info['params']} params, "
              f"{info['bytes'] / 1024:.0f} KB, BN nodes {info['batchnorm_nodes']}, Constant nodes "
              f"{info['constant_node_count']}, torch vs ort {info['torch_vs_ort_max_rel']:.1e}", file=sys.stderr)
    ordered = {s.name: manifest[s.name] for s in SPECS if s.name in manifest}
    manifest_path.write_text(json.dumps(ordered, indent=1) + "\n")
    total = sum(v["bytes"] for v in ordered.values())
    print(f"{len(ordered)} models, {total / 1024:.0f} KB in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
