"""The op registry: one rule per op type, the only place that knows ops.

Widening the analysis to a new op means adding a rule here. Ops that are
not registered get the base :class:`Rule`, which blocks every channel that
reaches them and marks what they make as unprunable.
"""

from __future__ import annotations

from typing import Dict

from .base import ChannelState, CountContext, RewriteContext, Rule
from .conv import ConvRule, ConvTransposeRule
from .elementwise import ELEMENTWISE_OPS, ElementwiseRule
from .layout import ConcatRule, FlattenRule, ReshapeRule, SqueezeRule
from .linear import GemmRule, MatMulRule
from .passthrough import (POOL_OPS, UNARY_OPS, AxisRule, ChannelParamRule, PadRule, PassThroughRule,
                          ReduceRule, ResizeRule)
from .shuffle import TransposeRule
from .slicing import SliceRule, SplitRule

REGISTRY: Dict[str, Rule] = {}
for _op in UNARY_OPS + POOL_OPS:
    REGISTRY[_op] = PassThroughRule()
for _op in ELEMENTWISE_OPS:
    REGISTRY[_op] = ElementwiseRule()
for _op in ("BatchNormalization", "InstanceNormalization", "PRelu"):
    REGISTRY[_op] = ChannelParamRule()
for _op in ("Softmax", "LogSoftmax", "Hardmax", "LRN"):
    REGISTRY[_op] = AxisRule()
for _op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
            "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare", "ReduceLogSum"):
    REGISTRY[_op] = ReduceRule()
REGISTRY.update({
    "Conv": ConvRule(),
    "ConvTranspose": ConvTransposeRule(),
    "Gemm": GemmRule(),
    "MatMul": MatMulRule(),
    "Concat": ConcatRule(),
    "Flatten": FlattenRule(),
    "Reshape": ReshapeRule(),
    "Squeeze": SqueezeRule(),
    "Unsqueeze": SqueezeRule(),
    "Pad": PadRule(),
    "Resize": ResizeRule(),
    "Upsample": ResizeRule(),
    "Transpose": TransposeRule(),
    "Split": SplitRule(),
    "Slice": SliceRule(),
})

_DEFAULT = Rule()

# Ops whose multiply-accumulates make up "FLOPs" in this project's convention.
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def rule_for(op: str, domain: str = "") -> Rule:
    if domain not in ("", "ai.onnx"):
        return _DEFAULT  # custom-domain ops are opaque, whatever their name
    return REGISTRY.get(op, _DEFAULT)


__all__ = ["REGISTRY", "MAC_OPS", "rule_for", "Rule", "ChannelState", "CountContext", "RewriteContext"]
