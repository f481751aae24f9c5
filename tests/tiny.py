"""Tiny ONNX graphs built with onnx.helper, one block at a time, for the unit tests."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    """Appends nodes and random initializers; ``model()`` returns a checked ModelProto."""

    def __init__(self, channels: int = 3, size: int = 8, opset: int = 13, seed: int = 0, batch="N"):
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.opset = opset
        self.input = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, size, size])
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def init(self, value: np.ndarray, prefix: str = "w") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def ints(self, values, prefix: str = "i", dtype=np.int64) -> str:
        """An integer initializer (shapes, split sizes, slice bounds)."""
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> str:
        outs = [self._name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self._name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1, bias: bool = True) -> str:
        w = self.init(self.rng.normal(0, 1.0 / np.sqrt(cin * k * k / group), (cout, cin // group, k, k)))
        inputs = [x, w] + ([self.init(self.rng.normal(0, 0.1, cout), "b")] if bias else [])
        return self.node("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride], group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        return self.node("BatchNormalization", [x, self.init(r.uniform(0.5, 1.5, c)), self.init(r.normal(0, 0.1, c)),
                                                self.init(r.normal(0, 0.1, c)), self.init(r.uniform(0.5, 1.5, c))])

    def shuffle(self, x: str, c: int, groups: int, size: int, batch: int = 0, flat: bool = False) -> str:
        """ShuffleNet's channel shuffle: Reshape (N, g, C/g, H, W) (or (N, g, C/g, H*W) when
        ``flat``), Transpose perm (0, 2, 1, ...), Reshape back; ``batch`` is the first entry of
        both targets (0: copy N, -1: infer it)."""
        spatial = [size * size] if flat else [size, size]
        x = self.node("Reshape", [x, self.ints([batch, groups, c // groups] + spatial, "shape")])
        x = self.node("Transpose", [x], perm=[0, 2, 1] + list(range(3, 3 + len(spatial))))
        return self.node("Reshape", [x, self.ints([batch, c, size, size], "shape")])

    def split(self, x: str, sizes: Sequence[int], axis: int = 1, equal: bool = False) -> List[str]:
        """Split with the sizes as the opset wants them: attribute (< 13), input (>= 13), or
        num_outputs (>= 18) where ``equal`` asks for chunks rather than explicit sizes."""
        if equal:
            if self.opset >= 18:
                return self.node("Split", [x], n_out=len(sizes), axis=axis, num_outputs=len(sizes))
            return self.node("Split", [x], n_out=len(sizes), axis=axis)
        if self.opset < 13:
            return self.node("Split", [x], n_out=len(sizes), axis=axis, split=list(sizes))
        return self.node("Split", [x, self.ints(sizes, "split")], n_out=len(sizes), axis=axis)

    def slice(self, x: str, starts, ends, axes=None, steps=None, dtype=np.int64) -> str:
        inputs = [x, self.ints(starts, "starts", dtype), self.ints(ends, "ends", dtype)]
        if axes is not None:
            inputs.append(self.ints(axes, "axes", dtype))
        if steps is not None:
            inputs.append(self.ints(steps, "steps", dtype))
        return self.node("Slice", inputs)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def gemm(self, x: str, fin: int, fout: int) -> str:
        return self.node("Gemm", [x, self.init(self.rng.normal(0, 1.0 / np.sqrt(fin), (fout, fin))),
                                  self.init(self.rng.normal(0, 0.1, fout), "b")], transB=1)

    def model(self, output: str, out_shape: Optional[Sequence] = None) -> onnx.ModelProto:
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)
        graph = helper.make_graph(self.nodes, "tiny", [self.input], [out], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model, full_check=True)
        return model


def plain_cnn(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    """conv-bn-relu x2, maxpool, flatten, gemm-relu-gemm."""
    b = Builder(seed=seed, opset=opset)
    x = b.relu(b.bn(b.conv("input", 3, 8), 8))
    x = b.relu(b.bn(b.conv(x, 8, 16), 16))
    x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Flatten", [x], axis=1)
    x = b.relu(b.gemm(x, 16 * 4 * 4, 32))
    return b.model(b.gemm(x, 32, 10), ["N", 10])


def residual_cnn(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    """stem, two residual blocks (one with a 1x1 projection), a depthwise conv, GAP, Gemm."""
    b = Builder(seed=seed, opset=opset)
    x = b.relu(b.conv("input", 3, 8))
    y = b.relu(b.conv(x, 8, 8))
    x = b.relu(b.node("Add", [b.conv(y, 8, 8), x]))
    y = b.relu(b.conv(x, 8, 16, stride=2))
    x = b.relu(b.node("Add", [b.conv(y, 16, 16), b.conv(x, 8, 16, k=1, stride=2)]))
    x = b.relu(b.conv(x, 16, 16, group=16))
    x = b.relu(b.conv(x, 16, 24, k=1))
    x = b.node("GlobalAveragePool", [x])
    x = b.node("Flatten", [x], axis=1)
    return b.model(b.gemm(x, 24, 10), ["N", 10])


def concat_cnn(seed: int = 0) -> onnx.ModelProto:
    """Two branches concatenated on channels (Inception/DenseNet style), then a residual
    Add with a per-channel constant, Reshape-flatten into MatMul."""
    b = Builder(seed=seed)
    x = b.relu(b.conv("input", 3, 8))
    left = b.relu(b.conv(x, 8, 6, k=1))
    right = b.relu(b.conv(x, 8, 10, k=3))
    cat = b.node("Concat", [left, x, right], axis=1)  # 6 + 8 + 10 = 24
    y = b.conv(cat, 24, 8, k=1)
    y = b.node("Add", [y, b.init(b.rng.normal(0, 0.1, (1, 8, 1, 1)), "c")])
    x = b.relu(b.node("Mul", [b.node("Add", [y, x]), b.init(b.rng.uniform(0.5, 1.5, (8, 1, 1)), "s")]))
    x = b.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Reshape", [x, b.init(np.array([-1, 8 * 4 * 4]), "shape")])
    b.inits[-1] = numpy_helper.from_array(np.array([-1, 8 * 4 * 4], dtype=np.int64), b.inits[-1].name)
    x = b.node("MatMul", [x, b.init(b.rng.normal(0, 0.1, (128, 10)))])
    return b.model(x, ["N", 10])


def constant_node_cnn(seed: int = 0) -> onnx.ModelProto:
    """Weights held in Constant nodes, as Paddle exports them, with an Identity and a PRelu."""
    model = plain_cnn(seed)
    graph = model.graph
    consts = []
    for init in graph.initializer:
        consts.append(helper.make_node("Constant", [], [init.name], name=f"const_{init.name}", value=init))
    del graph.initializer[:]
    nodes = consts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def grouped_cnn(seed: int = 0) -> onnx.ModelProto:
    """ResNeXt/AlexNet-style grouped convs: 2 and 4 groups, one feeding a residual Add."""
    b = Builder(seed=seed)
    x = b.relu(b.conv("input", 3, 8))
    y = b.relu(b.conv(x, 8, 8, group=2))
    x = b.relu(b.node("Add", [b.conv(y, 8, 8, group=4), x]))
    x = b.relu(b.conv(x, 8, 12, group=2))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.model(b.gemm(x, 12, 5), ["N", 5])


INT64_MAX = int(np.iinfo(np.int64).max)


def _shufflenet_v2_unit(b: Builder, x: str, c: int, size: int, halves, **shuffle) -> str:
    """A ShuffleNet v2 unit at stride 1: the first half passes, the second goes through
    1x1 - depthwise 3x3 - 1x1, then Concat and a channel shuffle of two parts."""
    left, right = halves(x)
    h = c // 2
    y = b.relu(b.bn(b.conv(right, h, 6, k=1), 6))
    y = b.bn(b.conv(y, 6, 6, group=6), 6)
    y = b.relu(b.bn(b.conv(y, 6, h, k=1), h))
    return b.shuffle(b.node("Concat", [left, y], axis=1), c, 2, size, **shuffle)


def shufflenet_v2(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    """Stem, two stride-1 ShuffleNet v2 units (halves by Split, then by two Slices), a
    stride-2 unit (both branches convolve, Concat, shuffle), 1x1 conv, GAP, Gemm."""
    b = Builder(seed=seed, opset=opset)
    x = b.relu(b.conv("input", 3, 8))
    x = _shufflenet_v2_unit(b, x, 8, 8, lambda t: b.split(t, [4, 4], equal=True), batch=0)
    x = _shufflenet_v2_unit(b, x, 8, 8, lambda t: (b.slice(t, [0], [4], [1]), b.slice(t, [-4], [INT64_MAX], [1])),
                            batch=-1, flat=True)
    left = b.relu(b.conv(b.conv(x, 8, 8, group=8, stride=2), 8, 8, k=1))
    right = b.relu(b.conv(x, 8, 6, k=1))
    right = b.relu(b.conv(b.conv(right, 6, 6, group=6, stride=2), 6, 8, k=1))
    x = b.shuffle(b.node("Concat", [left, right], axis=1), 16, 2, 4)
    x = b.relu(b.conv(x, 16, 12, k=1))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.model(b.gemm(x, 12, 5), ["N", 5])


def shufflenet_v1(seed: int = 0) -> onnx.ModelProto:
    """ShuffleNet v1 units: grouped 1x1 conv, shuffle of its groups, depthwise 3x3, grouped
    1x1 conv, residual Add; the second unit shuffles four groups."""
    b = Builder(seed=seed)
    x = b.relu(b.conv("input", 3, 16))
    for g in (2, 4):
        y = b.relu(b.bn(b.conv(x, 16, 16, k=1, group=g), 16))
        y = b.shuffle(y, 16, g, 8)
        y = b.bn(b.conv(y, 16, 16, group=16), 16)
        y = b.bn(b.conv(y, 16, 16, k=1, group=g), 16)
        x = b.relu(b.node("Add", [y, x]))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.model(b.gemm(x, 16, 5), ["N", 5])


def yolo_c2f(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    """YOLOv8-style C2f (conv, Split in two, a residual bottleneck on the second half, Concat
    of all three), a stride-2 branch upsampled by Resize and concatenated back (the neck),
    a spatial Slice with steps 2 (YOLOv5's Focus) and a Split along the height."""
    b = Builder(seed=seed, opset=opset)
    x = b.relu(b.conv("input", 3, 8))
    y = b.relu(b.conv(x, 8, 8, k=1))
    y0, y1 = b.split(y, [3, 5], equal=False) if opset < 18 else b.split(y, [4, 4], equal=True)
    h = 5 if opset < 18 else 4
    m = b.node("Add", [b.relu(b.conv(b.relu(b.conv(y1, h, h)), h, h)), y1])
    z = b.relu(b.conv(b.node("Concat", [y0, y1, m], axis=1), 8 + h, 8, k=1))
    p = b.relu(b.conv(z, 8, 6, stride=2))
    if opset >= 13:
        up = b.node("Resize", [p, "", b.init(np.array([1, 1, 2, 2]), "scales")], mode="nearest")
    else:
        up = b.node("Resize", [p, b.init(np.zeros(0), "roi"), b.init(np.array([1, 1, 2, 2]), "scales")], mode="nearest")
    x = b.relu(b.conv(b.node("Concat", [up, z], axis=1), 14, 10, k=1))
    x = b.slice(x, [0, 0], [INT64_MAX, INT64_MAX], [2, 3], [2, 2])  # 4x4
    top, bottom = b.split(x, [2, 2], axis=2)
    x = b.node("Concat", [bottom, top], axis=2)
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    return b.model(b.gemm(x, 10, 5), ["N", 5])


def slices_cnn(seed: int = 0) -> onnx.ModelProto:
    """Channel Slices of one conv's 12 channels with bounds from the start, from the end,
    open-ended and int32, concatenated (channels 0 and 1 are read by nobody) into a conv."""
    b = Builder(seed=seed)
    x = b.relu(b.conv("input", 3, 12))
    a = b.slice(x, [2], [7], [1])  # 2..6
    c = b.slice(x, [-5], [-1], [-3], dtype=np.int32)  # 7..10 (axis -3 of 4 is the channel axis)
    d = b.slice(x, [0, -3, 0, 0], [INT64_MAX, 99, INT64_MAX, INT64_MAX])  # 9..11, no axes given
    y = b.relu(b.conv(b.node("Concat", [a, c, d], axis=1), 12, 6))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    return b.model(b.gemm(x, 6, 5), ["N", 5])
def save_with_external_data(model: onnx.ModelProto, path, location: Optional[str] = None) -> None:
    """Save ``model`` with every initializer in one external data file beside it (named
    ``location``, default the model's file name + '.data')."""
    import os

    location = location or os.path.basename(str(path)) + ".data"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
