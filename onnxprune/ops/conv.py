"""Conv and ConvTranspose: the producers and consumers of channels."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from .base import (ChannelState, CountContext, Resized, RewriteContext, Rule, add_to_bias_input, attr, bias_input,
                   const, opt_input, prod)


def is_depthwise(group: int, cin: int, cout: int) -> bool:
    return group > 1 and group == cin == cout


def grouping(group: int, weight_shape) -> str:
    """"dense", "depthwise" or "grouped" for a Conv of ``group`` groups whose weight has
    ``weight_shape`` (out, in / group, ...); "grouped" where the shape is unknown."""
    if group == 1:
        return "dense"
    if weight_shape is not None and is_depthwise(group, weight_shape[1] * group, weight_shape[0]):
        return "depthwise"
    return "grouped"


class ConvRule(Rule):
    """Dense convs make a new channel space and consume their input's.

    A depthwise conv (group == in == out channels) passes channels through:
    filter i reads only channel i, so both go together. Other grouped convs tie
    channel i of every group into one player, so that every group keeps the same
    channels and the conv stays one of equal groups.
    """

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        x, y = node.inputs[0], node.outputs[0]
        w = const(node.inputs[1])
        b = opt_input(node, 2)
        if w is None or (b is not None and const(b) is None):
            st.refuse(node, "Conv weights are not constant", "Conv with non-constant weights")
            return
        group = int(attr(node, "group", 1))
        cout, cin = w.shape[0], w.shape[1] * group
        if group == 1:
            st.channels(x)
            st.set_channels(y, st.fresh(cout, node))
        elif is_depthwise(group, cin, cout):
            st.set_channels(y, st.channels(x))
        else:
            # grouped: every group must keep the same channels, so channel i of each group is
            # one player, on the input (tied across groups) and on the filters (made tied)
            x_atoms = st.channels(x)
            if x_atoms is None or len(x_atoms) != cin or cout % group:
                st.refuse(node, f"grouped Conv with {group} groups and unknown input channels",
                          f"grouped Conv with {group} groups")
                return
            st.tie_parts(x_atoms, group)
            st.set_channels(y, np.tile(st.fresh(cout // group, node), group))

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        w = const(node.inputs[1])
        keep_in, keep_out = ctx.keep(node.inputs[0]), ctx.keep(node.outputs[0])
        group = int(attr(node, "group", 1))
        depthwise = is_depthwise(group, w.shape[1] * group, w.shape[0])
        new_w = w
        if keep_out is not None:
            new_w = new_w[keep_out]
            b = opt_input(node, 2)
            if b is not None:
                ctx.set_constant(node, 2, const(b)[keep_out])
        if group == 1 and keep_in is not None:
            new_w = new_w[:, keep_in]
        elif group > 1 and keep_in is not None and not depthwise:
            new_w = new_w[:, keep_in.reshape(group, -1)[0]]  # the same input channels in every group
        if depthwise and keep_out is not None:
            ctx.set_attr(node, "group", int(keep_out.sum()))
        if new_w is not w:
            ctx.set_constant(node, 1, new_w)

    def filters(self, node: gs.Node):
        w = const(node.inputs[1])
        return None if w is None else w.reshape(w.shape[0], -1)

    def input_filters(self, node: gs.Node):
        w = const(node.inputs[1])
        group = int(attr(node, "group", 1))
        if w is None or is_depthwise(group, w.shape[1] * group, w.shape[0]):
            return None  # a depthwise conv passes its channels through: it reads no group as a layer
        if group == 1:
            return np.moveaxis(w, 1, 0).reshape(w.shape[1], w.shape[0], -1)
        # a grouped conv as the dense layer it equals, zero between the groups: so the channels
        # it reads are scored by what they feed (they had no payoff and were cut as if free)
        cin_g, cout_g = w.shape[1], w.shape[0] // group
        dense = np.zeros((cin_g * group, w.shape[0], int(np.prod(w.shape[2:], dtype=np.int64))), dtype=w.dtype)
        for g in range(group):
            block = w[g * cout_g:(g + 1) * cout_g]
            dense[g * cin_g:(g + 1) * cin_g, g * cout_g:(g + 1) * cout_g] = np.moveaxis(block, 1, 0).reshape(
                cin_g, cout_g, -1)
        return dense

    def set_input_filters(self, node: gs.Node, filters: np.ndarray) -> None:
        if int(attr(node, "group", 1)) != 1:  # grouped convs are scored, never refitted
            raise NotImplementedError("set_input_filters of a grouped Conv")
        w = const(node.inputs[1])
        new = np.moveaxis(filters.reshape((w.shape[1], w.shape[0]) + w.shape[2:]), 0, 1)
        _set_weight(node, 1, np.ascontiguousarray(new, dtype=w.dtype))

    def add_bias(self, node: gs.Node, delta: np.ndarray, graph: gs.Graph) -> None:
        add_to_bias_input(node, 2, delta, const(node.inputs[1]).dtype, graph)

    def bias(self, node: gs.Node) -> Optional[np.ndarray]:
        return bias_input(node, 2, const(node.inputs[1]).shape[0])

    def output_pixels(self, node: gs.Node, shape) -> int:
        out = shape(node.outputs[0])
        return prod(out[2:]) if out is not None and None not in out[2:] else 1

    def resized(self, node: gs.Node, cin: Optional[int], cout: Optional[int]) -> Optional[Resized]:
        return _resized(node, cin, cout, transposed=False)

    def macs(self, node: gs.Node, ctx: CountContext) -> int:
        w = const(node.inputs[1])
        out_shape = ctx.shape(node.outputs[0])
        if w is None or out_shape is None or any(d is None for d in out_shape[2:]):
            return 0
        group = int(attr(node, "group", 1))
        cout = ctx.count(node.outputs[0])
        kernel = prod(w.shape[2:])
        if is_depthwise(group, w.shape[1] * group, w.shape[0]):
            per_filter_inputs = 1
        else:
            per_filter_inputs = ctx.count(node.inputs[0]) // group
        return cout * per_filter_inputs * kernel * prod(out_shape[2:])


class ConvTransposeRule(Rule):
    """ConvTranspose keeps its weight as (in, out / group, k...)."""

    def propagate(self, node: gs.Node, st: ChannelState) -> None:
        x, y = node.inputs[0], node.outputs[0]
        w = const(node.inputs[1])
        b = opt_input(node, 2)
        group = int(attr(node, "group", 1))
        if w is None or (b is not None and const(b) is None):
            st.refuse(node, "ConvTranspose weights are not constant", "ConvTranspose with non-constant weights")
        elif group == 1:
            st.channels(x)
            st.set_channels(y, st.fresh(w.shape[1], node))
        elif is_depthwise(group, w.shape[0], w.shape[1] * group):
            st.set_channels(y, st.channels(x))
        else:
            st.refuse(node, f"grouped ConvTranspose with {group} groups")

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        w = const(node.inputs[1])
        keep_in, keep_out = ctx.keep(node.inputs[0]), ctx.keep(node.outputs[0])
        group = int(attr(node, "group", 1))
        depthwise = is_depthwise(group, w.shape[0], w.shape[1] * group)
        new_w = w
        if keep_out is not None:
            b = opt_input(node, 2)
            if b is not None:
                ctx.set_constant(node, 2, const(b)[keep_out])
            if depthwise:
                new_w = new_w[keep_out]
                ctx.set_attr(node, "group", int(keep_out.sum()))
            else:
                new_w = new_w[:, keep_out]
        if keep_in is not None and not depthwise:
            new_w = new_w[keep_in]
        if new_w is not w:
            ctx.set_constant(node, 1, new_w)

    def filters(self, node: gs.Node):
        w = const(node.inputs[1])
        return None if w is None else np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)

    def input_filters(self, node: gs.Node):
        w = const(node.inputs[1])
        if w is None or int(attr(node, "group", 1)) != 1:
            return None
        return w.reshape(w.shape[0], w.shape[1], -1)

    def set_input_filters(self, node: gs.Node, filters: np.ndarray) -> None:
        w = const(node.inputs[1])
        _set_weight(node, 1, np.ascontiguousarray(filters.reshape(w.shape), dtype=w.dtype))

    def add_bias(self, node: gs.Node, delta: np.ndarray, graph: gs.Graph) -> None:
        add_to_bias_input(node, 2, delta, const(node.inputs[1]).dtype, graph)

    def bias(self, node: gs.Node) -> Optional[np.ndarray]:
        w = const(node.inputs[1])
        return bias_input(node, 2, w.shape[1] * int(attr(node, "group", 1)))

    def output_pixels(self, node: gs.Node, shape) -> int:
        x = shape(node.inputs[0])
        return prod(x[2:]) if x is not None and None not in x[2:] else 1

    def tap_share(self, node: gs.Node) -> float:
        # each input pixel scatters all its taps over a window of outputs spaced by the strides:
        # an output pixel receives 1 / prod(strides) of them on average (one phase of the kernel)
        return 1.0 / prod(attr(node, "strides", [1] * (len(const(node.inputs[1]).shape) - 2)))

    def resized(self, node: gs.Node, cin: Optional[int], cout: Optional[int]) -> Optional[Resized]:
        return _resized(node, cin, cout, transposed=True)

    def macs(self, node: gs.Node, ctx: CountContext) -> int:
        w = const(node.inputs[1])
        in_shape = ctx.shape(node.inputs[0])
        if w is None or in_shape is None or any(d is None for d in in_shape[2:]):
            return 0
        group = int(attr(node, "group", 1))
        kernel = prod(w.shape[2:])
        if is_depthwise(group, w.shape[0], w.shape[1] * group):
            return ctx.count(node.outputs[0]) * kernel * prod(in_shape[2:])
        return ctx.count(node.inputs[0]) * (ctx.count(node.outputs[0]) // group) * kernel * prod(in_shape[2:])


def _set_weight(node: gs.Node, index: int, values: np.ndarray) -> None:
    tensor = node.inputs[index]
    if len(tensor.outputs) > 1:
        node.inputs[index] = gs.Constant(f"{tensor.name}_{node.name}", values)
    else:
        tensor.values = values


def _resized(node: gs.Node, cin: Optional[int], cout: Optional[int], transposed: bool) -> Optional[Resized]:
    """A Conv (weight (out, in/g, ...)) or ConvTranspose (weight (in, out/g, ...)) at other widths."""
    w = const(node.inputs[1])
    if w is None:
        return None
    group = int(attr(node, "group", 1))
    full_in, full_out = (w.shape[0], w.shape[1] * group) if transposed else (w.shape[1] * group, w.shape[0])
    if is_depthwise(group, full_in, full_out):  # one width: channel i in, channel i out
        c = cout if cout is not None else (cin if cin is not None else full_out)
        return Resized(c, c, (c, 1) + tuple(w.shape[2:]), {"group": c})
    cin = full_in if cin is None else cin
    cout = full_out if cout is None else cout
    if cin % group or cout % group:
        return None
    lead = (cin, cout // group) if transposed else (cout, cin // group)
    return Resized(cin, cout, lead + tuple(w.shape[2:]), {})
