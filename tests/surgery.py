"""Test helpers that drive the pipeline's stages directly: analyse a model, kill
chosen channels, prune exactly those, compare outputs."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxprune.analyse import Analysis, analyse
from onnxprune.load import default_opset
from onnxprune.prepare import data_inputs, prepare
from onnxprune.rewrite import rewrite
from onnxprune.shapes import static_shapes


def input_shape(model: onnx.ModelProto) -> Tuple[int, ...]:
    dims = data_inputs(model.graph)[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)


def analysis_of(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, Analysis]:
    prepared, _ = prepare(model)
    name = data_inputs(prepared.graph)[0].name
    shape = (1,) + input_shape(prepared)[1:]
    shapes = static_shapes(prepared, {name: shape})
    return prepared, analyse(gs.import_onnx(prepared), shapes, default_opset(prepared))


def outputs(model: onnx.ModelProto, x: np.ndarray) -> List[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def sample(model: onnx.ModelProto, n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n,) + input_shape(model)[1:]).astype(np.float32)


def prune_players(model: onnx.ModelProto, drop: Dict[int, List[int]]) -> onnx.ModelProto:
    """Remove the given players (group index -> positions within the group)."""
    prepared, analysis = analysis_of(model)
    keep = np.ones(analysis.num_players, dtype=bool)
    for g, positions in drop.items():
        players = np.flatnonzero(analysis.player_group == g)
        keep[players[positions]] = False
    return rewrite(analysis, keep, prepared)[0]


def _atoms_of(analysis: Analysis, drop: Dict[int, List[int]]) -> np.ndarray:
    """Boolean mask of the atoms of the given players (group index -> positions in the group)."""
    dead = np.zeros(len(analysis.atom_player), dtype=bool)
    for g, positions in drop.items():
        players = np.flatnonzero(analysis.player_group == g)[positions]
        dead |= np.isin(analysis.atom_player, players)
    return dead


def kill_players(model: onnx.ModelProto, drop: Dict[int, List[int]]) -> onnx.ModelProto:
    """A copy of ``model`` in which the given players compute constant zero.

    Zeroes every filter and bias (Conv, Gemm, depthwise Conv) and every
    per-channel shift (BatchNormalization's beta and mean, Add constants) that
    produces one of the players' channels, so removing them is exact.
    """
    prepared, analysis = analysis_of(model)
    dead_atoms = _atoms_of(analysis, drop)
    graph = analysis.graph
    for node in graph.nodes:
        out = node.outputs[0] if node.outputs else None
        atoms = analysis.cmap.get(out.name) if out is not None else None
        if atoms is None:
            continue
        dead = dead_atoms[atoms]
        if not dead.any():
            continue
        if node.op in ("Conv", "Gemm", "ConvTranspose", "MatMul"):
            w = node.inputs[1].values.copy()
            if node.op == "ConvTranspose":
                w[:, dead] = 0 if node.attrs.get("group", 1) == 1 else w[:, dead]
                if node.attrs.get("group", 1) != 1:
                    w[dead] = 0
            elif node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
                w[:, dead] = 0
            else:
                w[dead] = 0
            node.inputs[1].values = w
            if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                b = node.inputs[2].values.copy()
                b[..., dead] = 0
                node.inputs[2].values = b
        elif node.op == "BatchNormalization":
            for i in (2, 3):
                v = node.inputs[i].values.copy()
                v[dead] = 0
                node.inputs[i].values = v
        elif node.op in ("Add", "Sub"):
            for t in node.inputs:
                if isinstance(t, gs.Constant) and t.values.ndim >= 3 and t.values.shape[-3] == len(dead):
                    v = t.values.copy()
                    v[..., dead, :, :] = 0
                    t.values = v
    killed = gs.export_onnx(graph, do_type_check=False)
    killed.ir_version = prepared.ir_version
    del killed.opset_import[:]
    killed.opset_import.extend(prepared.opset_import)
    return killed


def rel_error(a: List[np.ndarray], b: List[np.ndarray]) -> float:
    num = sum(float(((x.astype(np.float64) - y) ** 2).sum()) for x, y in zip(a, b))
    den = sum(float((x.astype(np.float64) ** 2).sum()) for x in a)
    return float(np.sqrt(num / max(den, 1e-30)))


def unuse_players(model: onnx.ModelProto, drop: Dict[int, List[int]]) -> onnx.ModelProto:
    """A copy of ``model`` in which no layer reads the given players: every consumer's
    weights on their channels are zero. Whatever the activations, removing the players
    then cannot change the outputs."""
    from onnxprune.ops import rule_for

    prepared, analysis = analysis_of(model)
    dead_atoms = _atoms_of(analysis, drop)
    graph = analysis.graph
    for node in list(graph.nodes):
        rule = rule_for(node.op, node.domain or "")
        atoms = analysis.cmap.get(node.inputs[0].name) if node.inputs else None
        group = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
        if atoms is not None and group > 1 and node.inputs[1].values.shape[1] > 1:
            # a grouped conv: dead channel i of every group is input index i of every filter
            dead = dead_atoms[atoms].reshape(group, -1)[0]
            if dead.any():
                w = node.inputs[1].values.copy()
                w[:, dead] = 0
                node.inputs[1].values = w
            continue
        if atoms is None or rule.input_filters(node) is None:
            continue
        dead = dead_atoms[atoms]
        if dead.any():
            f = np.array(rule.input_filters(node))
            f[dead] = 0
            rule.set_input_filters(node, f)
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = prepared.ir_version
    del out.opset_import[:]
    out.opset_import.extend(prepared.opset_import)
    return out


def spare_one_per_layer(analysis: Analysis, drop: Dict[int, List[int]]) -> Dict[int, List[int]]:
    """Remove from ``drop`` enough players that every producing layer and every region (a
    Split output, a channel Slice) keeps a channel, as the allocation guarantees (a layer of
    zero filters or a tensor of zero channels is not a valid network)."""
    out = {}
    for g, positions in drop.items():
        players = np.flatnonzero(analysis.player_group == g)
        dropped = set(players[positions].tolist())
        spaces_left = set(analysis.atom_space[np.isin(analysis.atom_player, [p for p in players if p not in dropped])].tolist())
        keep_back = set()
        for i in positions:
            atoms = np.flatnonzero(analysis.atom_player == players[i])
            new = set(analysis.atom_space[atoms].tolist()) - spaces_left
            if new:
                keep_back.add(i)
                spaces_left |= new
        out[g] = [i for i in positions if i not in keep_back]
    # and every region (a Split output, a channel Slice) keeps a channel
    where = {}
    for g, positions in out.items():
        players = np.flatnonzero(analysis.player_group == g)
        where.update({int(players[i]): (g, i) for i in positions})
    for region in analysis.regions:
        players = np.unique(analysis.atom_player[region]).tolist()
        if all(p in where for p in players):
            g, i = where.pop(players[0])
            out[g].remove(i)
    return out
