"""Gemm and MatMul: fully connected layers on (N, features) tensors."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from .base import (ChannelState, CountContext, Resized, RewriteContext, Rule, add_to_bias_input, attr, bias_input,
                   const, fresh_name, opt_input, prod)
from .conv import _set_weight


class GemmRule(Rule):
    """Y = A B (+ C): rows or columns of B follow A's features and Y's outputs."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        a, y = node.inputs[0], node.outputs[0]
        b, c = const(node.inputs[1]), opt_input(node, 2)
        a_shape = st.shape(a)
        if (attr(node, "transA", 0) or b is None or b.ndim != 2 or a_shape is None or len(a_shape) != 2
                or (c is not None and const(c) is None)):
            st.refuse(node, "Gemm with transposed or non-constant operands")
            return
        st.channels(a)
        outputs = b.shape[0] if attr(node, "transB", 0) else b.shape[1]
        st.set_channels(y, st.fresh(outputs, node))

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        b = const(node.inputs[1])
        keep_in, keep_out = ctx.keep(node.inputs[0]), ctx.keep(node.outputs[0])
        trans_b = bool(attr(node, "transB", 0))
        new_b = b
        if keep_in is not None:
            new_b = new_b[:, keep_in] if trans_b else new_b[keep_in]
        if keep_out is not None:
            new_b = new_b[keep_out] if trans_b else new_b[:, keep_out]
            c = opt_input(node, 2)
            if c is not None and const(c).ndim >= 1 and const(c).shape[-1] == len(keep_out):
                ctx.set_constant(node, 2, const(c)[..., keep_out])
        if new_b is not b:
            ctx.set_constant(node, 1, new_b)

    def filters(self, node: gs.Node):
        b = const(node.inputs[1])
        return None if b is None else (b if attr(node, "transB", 0) else b.T)

    def input_filters(self, node: gs.Node):
        b = const(node.inputs[1])
        if b is None or b.ndim != 2:
            return None
        return (b.T if attr(node, "transB", 0) else b)[:, :, None]

    def set_input_filters(self, node: gs.Node, filters: np.ndarray) -> None:
        b = const(node.inputs[1])
        f = filters[:, :, 0]
        _set_weight(node, 1, np.ascontiguousarray(f.T if attr(node, "transB", 0) else f, dtype=b.dtype))

    def add_bias(self, node: gs.Node, delta: np.ndarray, graph: gs.Graph) -> None:
        beta = float(attr(node, "beta", 1.0))
        c = opt_input(node, 2)
        if c is not None and const(c) is not None and const(c).shape != (len(delta),) and const(c).size != len(delta):
            # a broadcast bias (scalar or (1, 1)): widen it so each output can move on its own
            c.values = np.broadcast_to(const(c), (len(delta),)).astype(const(c).dtype).copy()
        add_to_bias_input(node, 2, delta / beta if beta else delta, const(node.inputs[1]).dtype, graph)

    def bias(self, node: gs.Node) -> Optional[np.ndarray]:
        b = const(node.inputs[1])
        outputs = b.shape[0] if attr(node, "transB", 0) else b.shape[1]
        return bias_input(node, 2, outputs) * float(attr(node, "beta", 1.0))

    def resized(self, node: gs.Node, cin: Optional[int], cout: Optional[int]) -> Optional[Resized]:
        b = const(node.inputs[1])
        if b is None or b.ndim != 2 or attr(node, "transA", 0):
            return None
        trans_b = bool(attr(node, "transB", 0))
        full_in, full_out = (b.shape[1], b.shape[0]) if trans_b else b.shape
        cin = full_in if cin is None else cin
        cout = full_out if cout is None else cout
        return Resized(cin, cout, (cout, cin) if trans_b else (cin, cout), {})

    def macs(self, node: gs.Node, ctx: CountContext) -> int:
        return ctx.count(node.inputs[0]) * ctx.count(node.outputs[0])


class MatMulRule(Rule):
    """A (N, F) x B (F, K) with constant B is a fully connected layer."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        a, y = node.inputs[0], node.outputs[0]
        b = const(node.inputs[1])
        a_shape = st.shape(a)
        if b is None or b.ndim != 2 or a_shape is None or len(a_shape) != 2:
            super().propagate(node, st)
            return
        st.channels(a)
        st.set_channels(y, st.fresh(b.shape[1], node))

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        b = const(node.inputs[1])
        if b is None or b.ndim != 2:
            return
        keep_in, keep_out = ctx.keep(node.inputs[0]), ctx.keep(node.outputs[0])
        new_b = b
        if keep_in is not None:
            new_b = new_b[keep_in]
        if keep_out is not None:
            new_b = new_b[:, keep_out]
        if new_b is not b:
            ctx.set_constant(node, 1, new_b)

    def filters(self, node: gs.Node):
        b = const(node.inputs[1])
        return None if b is None or b.ndim != 2 else b.T

    def input_filters(self, node: gs.Node):
        b = const(node.inputs[1])
        return None if b is None or b.ndim != 2 else b[:, :, None]

    def set_input_filters(self, node: gs.Node, filters: np.ndarray) -> None:
        _set_weight(node, 1, np.ascontiguousarray(filters[:, :, 0], dtype=const(node.inputs[1]).dtype))

    def bias(self, node: gs.Node) -> Optional[np.ndarray]:
        return None

    def add_bias(self, node: gs.Node, delta: np.ndarray, graph: gs.Graph) -> None:
        """MatMul has no bias: follow it with an Add of a constant."""
        out = node.outputs[0]
        pre = gs.Variable(fresh_name(graph, f"{out.name}_before_bias"), dtype=out.dtype)
        bias = gs.Constant(fresh_name(graph, f"{node.name}_bias"), delta.astype(const(node.inputs[1]).dtype))
        node.outputs[0] = pre
        graph.nodes.append(gs.Node("Add", name=f"{node.name}_bias_add", inputs=[pre, bias], outputs=[out]))

    def resized(self, node: gs.Node, cin: Optional[int], cout: Optional[int]) -> Optional[Resized]:
        b = const(node.inputs[1])
        if b is None or b.ndim != 2:
            return None
        cin = b.shape[0] if cin is None else cin
        cout = b.shape[1] if cout is None else cout
        return Resized(cin, cout, (cin, cout), {})

    def macs(self, node: gs.Node, ctx: CountContext) -> int:
        a_shape, y_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
        if a_shape is None or y_shape is None or any(d is None for d in a_shape[1:] + y_shape[1:]):
            return 0
        if len(a_shape) == 2 and len(y_shape) == 2:
            return ctx.count(node.inputs[0]) * ctx.count(node.outputs[0])
        # batched MatMul: every output element is one dot product over the inner axis
        return prod(y_shape[1:]) * int(a_shape[-1])
