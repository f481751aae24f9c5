"""Random CNNs composed from the blocks real networks use, for property tests."""

from __future__ import annotations

import numpy as np

from tiny import Builder

BLOCKS = ("conv", "conv_bn", "residual", "depthwise", "concat", "squeeze_excite", "pool", "grouped")


def _act(b: Builder, x: str, rng, opset: int) -> str:
    choices = ["Relu", "Sigmoid", "LeakyRelu", "Clip", "Tanh"] + (["HardSwish"] if opset >= 14 else [])
    op = choices[int(rng.integers(len(choices)))]
    if op == "Clip":
        return b.node("Clip", [x, b.init(np.array(0.0), "lo"), b.init(np.array(6.0), "hi")])
    return b.node(op, [x])


def random_net(seed: int, opset: int, depth: int, blocks=BLOCKS):
    """A random network and its input shape. Widths, strides, kernels and block kinds vary."""
    rng = np.random.default_rng(seed)
    size = int(rng.choice([8, 12, 16]))
    c = int(rng.choice([1, 3]))
    b = Builder(channels=c, size=size, opset=opset, seed=seed)
    x = "input"
    for _ in range(depth):
        kind = blocks[int(rng.integers(len(blocks)))]
        width = int(rng.integers(2, 12))
        stride = 2 if size >= 8 and rng.random() < 0.3 else 1
        if kind in ("conv", "conv_bn"):
            k = int(rng.choice([1, 3]))
            x = b.conv(x, c, width, k=k, stride=stride, bias=bool(rng.random() < 0.7))
            if kind == "conv_bn":
                x = b.bn(x, width)
            x, c = _act(b, x, rng, opset), width
            size = (size + stride - 1) // stride if k in (1, 3) else size
        elif kind == "residual":
            y = _act(b, b.conv(x, c, c), rng, opset)
            y = b.conv(y, c, c)
            x = _act(b, b.node("Add", [y, x]), rng, opset)
        elif kind == "grouped" and c % 2 == 0:
            out = 2 * max(1, width // 2)
            x, c = _act(b, b.conv(x, c, out, group=2), rng, opset), out
        elif kind == "depthwise":
            x = _act(b, b.conv(x, c, c, group=c), rng, opset)
        elif kind == "concat":
            left = _act(b, b.conv(x, c, width, k=1), rng, opset)
            right = _act(b, b.conv(x, c, width + 1, k=3), rng, opset)
            parts = [left, right] + ([x] if rng.random() < 0.5 else [])
            x = b.node("Concat", parts, axis=1)
            c = width + width + 1 + (c if len(parts) == 3 else 0)
        elif kind == "squeeze_excite":
            squeeze = max(1, c // 2)
            g = b.node("GlobalAveragePool", [x])
            g = b.relu(b.conv(g, c, squeeze, k=1))
            g = b.node("Sigmoid", [b.conv(g, squeeze, c, k=1)])
            x = b.node("Mul", [x, g])
        elif kind == "pool" and size >= 4:
            op = "MaxPool" if rng.random() < 0.5 else "AveragePool"
            x = b.node(op, [x], kernel_shape=[2, 2], strides=[2, 2])
            size //= 2
    if rng.random() < 0.5:
        x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
        feats = c
    else:
        x = b.node("Flatten", [x], axis=1)
        feats = c * size * size
    hidden = int(rng.integers(4, 16))
    x = b.relu(b.gemm(x, feats, hidden))
    return b.model(b.gemm(x, hidden, 5), ["N", 5])
