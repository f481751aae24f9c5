"""Random CNNs composed from the blocks real networks use, for property tests."""

from __future__ import annotations

import numpy as np

from tiny import INT64_MAX, Builder

# the blocks of the first fuzz runs (pinned examples draw from these, so they stay reproducible)
BLOCKS = ("conv", "conv_bn", "residual", "depthwise", "concat", "squeeze_excite", "pool", "grouped")
# with channel shuffles, Split and Slice (ShuffleNet v1/v2, YOLO)
ALL_BLOCKS = BLOCKS + ("shuffle", "split", "slice", "shufflenet_v2")


def _act(b: Builder, x: str, rng, opset: int) -> str:
    choices = ["Relu", "Sigmoid", "LeakyRelu", "Clip", "Tanh"] + (["HardSwish"] if opset >= 14 else [])
    op = choices[int(rng.integers(len(choices)))]
    if op == "Clip":
        return b.node("Clip", [x, b.init(np.array(0.0), "lo"), b.init(np.array(6.0), "hi")])
    return b.node(op, [x])


def _divisor(rng, c: int):
    """A number of parts g >= 2 with at least 2 channels each, or None."""
    options = [g for g in range(2, c // 2 + 1) if c % g == 0]
    return int(rng.choice(options)) if options else None


def _bound(rng, i: int, c: int, end: bool) -> int:
    """Position i of c channels as a Slice bound, written from the start, from the end, or
    open-ended (past the last channel) where it is the end."""
    form = rng.random()
    if end and i == c and form < 0.5:
        return INT64_MAX if form < 0.25 else c + int(rng.integers(1, 4))
    return i - c if form < 0.5 and i < c else i


def _halves(b: Builder, x: str, c: int, rng):
    """Two parts of the channels, by Split or by two Slices, and their sizes."""
    cut = c // 2 if rng.random() < 0.6 else int(rng.integers(1, c))
    if rng.random() < 0.5:
        equal = cut * 2 == c and rng.random() < 0.5
        return b.split(x, [cut, c - cut], equal=equal), (cut, c - cut)
    first = b.slice(x, [_bound(rng, 0, c, False)], [_bound(rng, cut, c, True)], [1])
    second = b.slice(x, [_bound(rng, cut, c, False)], [_bound(rng, c, c, True)], [1 if rng.random() < 0.5 else -3])
    return (first, second), (cut, c - cut)


def random_net(seed: int, opset: int, depth: int, blocks=ALL_BLOCKS):
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
        elif kind == "shuffle" and _divisor(rng, c):
            g = _divisor(rng, c)
            if rng.random() < 0.5:  # ShuffleNet v1: the shuffle mixes a grouped conv's groups
                x = _act(b, b.conv(x, c, c, k=1, group=g), rng, opset)
            x = b.shuffle(x, c, g, size, batch=int(rng.choice([0, -1])), flat=bool(rng.random() < 0.3))
        elif kind == "split" and c >= 2:
            if rng.random() < 0.2 and size % 2 == 0:  # along the height: channels pass through
                top, bottom = b.split(x, [size // 2, size // 2], axis=2)
                x = b.node("Concat", [bottom, top], axis=2)
                continue
            parts, sizes = _halves(b, x, c, rng)
            outs, c_out = [], 0
            for part, n in zip(parts, sizes):
                r = rng.random()
                if r < 0.4:
                    w = int(rng.integers(1, 8))
                    outs.append(_act(b, b.conv(part, n, w, k=int(rng.choice([1, 3]))), rng, opset))
                    c_out += w
                elif r < 0.85 or not outs and part is parts[-1]:
                    outs.append(part)
                    c_out += n
                # else: this part is read by nobody
            order = rng.permutation(len(outs))
            x, c = b.node("Concat", [outs[i] for i in order], axis=1), c_out
        elif kind == "slice" and c >= 2:
            if rng.random() < 0.3 and size >= 4:  # spatial, with steps (YOLOv5's Focus)
                first = int(rng.integers(0, 2))
                x = b.slice(x, [first] * 2, [INT64_MAX] * 2, [2, 3], [2, 2])
                size = (size - first + 1) // 2
            else:
                s0 = int(rng.integers(0, c - 1))
                e0 = int(rng.integers(s0 + 1, c + 1))
                x = b.slice(x, [_bound(rng, s0, c, False)], [_bound(rng, e0, c, True)], [1])
                c = e0 - s0
        elif kind == "shufflenet_v2" and c >= 4 and c % 2 == 0:
            (left, right), (_, n) = _halves(b, x, c, rng)
            w = int(rng.integers(2, 10))
            y = _act(b, b.conv(right, n, w, k=1), rng, opset)
            y = b.conv(y, w, w, group=w)
            y = _act(b, b.conv(y, w, n, k=1), rng, opset)
            x = b.shuffle(b.node("Concat", [left, y], axis=1), c, 2, size, batch=int(rng.choice([0, -1])))
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
