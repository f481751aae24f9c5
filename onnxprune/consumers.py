"""The layers that sum over prunable channels, seen channel by channel.

A consumer is a Conv, ConvTranspose, Gemm or MatMul whose input carries
channels of a prunable group. For a fully connected layer behind a Flatten
each channel occupies ``repeat`` consecutive features (one per pixel); the
channel view groups them, so statistics and fits work on (C, C) matrices
with the pixels as samples, for convs and flattened heads alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import onnx_graphsurgeon as gs

from .analyse import Analysis
from .ops import Rule, rule_for


@dataclass
class Consumer:
    node: gs.Node
    tensor: str  # its input
    repeat: int  # consecutive positions per channel (pixels of a flattened map), else 1
    rule: Rule

    def channel_atoms(self, analysis: Analysis) -> np.ndarray:
        return analysis.cmap[self.tensor][:: self.repeat]

    def channel_filters(self) -> np.ndarray:
        """(C, out, taps): the weights each input channel meets."""
        return to_channel_view(np.asarray(self.rule.input_filters(self.node)), self.repeat)

    def set_channel_filters(self, filters: np.ndarray) -> None:
        self.rule.set_input_filters(self.node, from_channel_view(filters, self.repeat))

    def pixels(self, analysis: Analysis) -> int:
        return self.rule.output_pixels(self.node, lambda t: analysis.shapes.get(t.name))


def to_channel_view(filters: np.ndarray, repeat: int) -> np.ndarray:
    """(C * repeat, out, taps) input filters -> (C, out, repeat * taps)."""
    if repeat == 1:
        return filters
    c = filters.shape[0] // repeat
    f = filters.reshape(c, repeat, filters.shape[1], filters.shape[2]).transpose(0, 2, 1, 3)
    return f.reshape(c, filters.shape[1], -1)


def from_channel_view(filters: np.ndarray, repeat: int) -> np.ndarray:
    if repeat == 1:
        return filters
    c, out = filters.shape[0], filters.shape[1]
    return filters.reshape(c, out, repeat, -1).transpose(0, 2, 1, 3).reshape(c * repeat, out, -1)


def flatten_repeat(analysis: Analysis, tensor: str) -> int:
    """Positions per channel of a 2-D tensor that a Flatten made (1 otherwise)."""
    shape = analysis.shapes.get(tensor)
    atoms = analysis.cmap.get(tensor)
    return _repeat(atoms) if atoms is not None and shape is not None and len(shape) == 2 else 1


def _repeat(atoms: np.ndarray) -> int:
    """Length of the equal runs in a flatten map (1 when runs differ or there are none)."""
    if len(atoms) < 2:
        return 1
    starts = np.flatnonzero(np.concatenate([[True], atoms[1:] != atoms[:-1]]))
    runs = np.diff(np.concatenate([starts, [len(atoms)]]))
    return int(runs[0]) if (runs == runs[0]).all() else 1


def find_consumers(analysis: Analysis) -> List[Consumer]:
    out = []
    prunable = np.array([g.prunable for g in analysis.groups])
    for node in analysis.mac_nodes:
        name = node.inputs[0].name
        atoms = analysis.cmap.get(name)
        rule = rule_for(node.op, node.domain or "")
        if atoms is None or rule.input_filters(node) is None:
            continue
        if prunable[analysis.player_group[analysis.atom_player[atoms]]].any():
            out.append(Consumer(node, name, flatten_repeat(analysis, name), rule))
    return out
