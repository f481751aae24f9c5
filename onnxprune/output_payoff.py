"""SNPFI's output payoff: what removing channels does to the model's own output, by sampling.

The local payoff (:mod:`onnxprune.snpfi`) looks one layer ahead. The output
payoff measures the whole network: v(S) is the mean log-probability the model
gives its own original top-1 class when only the channels in S are kept (for a
model whose one output is not class scores, or that has several outputs: minus
the squared distance to the original outputs, each relative to its energy,
averaged over the outputs). It has no closed form, so:

- The prepared model gets a gate after every layer that produces prunable
  channels, ``y = x * gate + offset``, with the gate and offset fed per sample;
  a removed channel takes its calibration mean (``offset``, with recovery) or
  zero (without), as the pipeline will. One onnxruntime run then evaluates
  many coalitions at once: the evaluation images are repeated once per
  coalition along the batch axis.
- Shapley values are estimated per group by permutation sampling (each
  permutation paired with its reverse, which halves the variance for the
  near-additive games pruning gives), the other groups' channels all kept.
- The utilisation curve of each group (the payoff kept by its k best channels)
  is measured along the estimated order at up to CURVE_POINTS widths and
  interpolated; all groups share the same unit (log-probability), so the
  allocation compares them directly.

``--budget`` bounds the number of coalitions evaluated, each over the same
evaluation images; the report gives the coalitions used and the seconds spent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from .analyse import Analysis
from .data import CalibrationSet, pad_batch
from .errors import InputError, UsageError
from .runtime import keeps_shapes, make_session
from .shapes import static_shapes
from .snpfi import GroupGame
from .verify import compared_tensors, one_class_score, per_image

EVAL_IMAGES = 32  # images every coalition is evaluated on
ROWS_PER_RUN = 512  # images x coalitions per onnxruntime run
CURVE_POINTS = 24
DEFAULT_BUDGET = 2000


@dataclass
class OutputGames:
    games: Dict[int, GroupGame]
    evaluations: int
    seconds: float
    classifier: bool
    budget: int


def _gated_model(model: onnx.ModelProto, analysis: Analysis, types: Optional[Dict[str, int]] = None):
    """The model with a per-sample gate and offset after every producer of prunable channels.
    Returns it and, per gate, (gate input name, offset input name, atoms, rank of the tensor).
    Gates and offsets are fed in float32 and cast to a tensor of another type (``types``: each
    tensor's element type, where known), so a float16 model is gated in float16."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producers = {n.name: n for n in g.node}
    prunable_group = np.zeros(analysis.num_players, dtype=bool)
    for grp in analysis.prunable_groups():
        prunable_group[analysis.player_group == grp.index] = True
    gates = []
    added: Dict[str, List[onnx.NodeProto]] = {}
    for i, space in enumerate(analysis.spaces):
        node = producers.get(space.node)
        atoms = np.flatnonzero(analysis.atom_space == i)
        if node is None or not len(atoms) or not prunable_group[analysis.atom_player[atoms]].any():
            continue
        name = node.output[0]
        shape = analysis.shapes.get(name)
        if shape is None or len(shape) < 2 or shape[1] != len(atoms):
            continue
        ungated = name + "__ungated"
        node.output[0] = ungated
        gate, offset = f"__gate_{i}", f"__offset_{i}"
        dims = ["n", len(atoms)] + [1] * (len(shape) - 2)
        g.input.extend([helper.make_tensor_value_info(gate, TensorProto.FLOAT, dims),
                        helper.make_tensor_value_info(offset, TensorProto.FLOAT, dims)])
        cast = []
        elem = (types or {}).get(name, TensorProto.FLOAT)
        if elem != TensorProto.FLOAT:
            cast = [helper.make_node("Cast", [gate], [gate + "__typed"], to=elem, name=f"__gate_cast_{i}"),
                    helper.make_node("Cast", [offset], [offset + "__typed"], to=elem, name=f"__offset_cast_{i}")]
            gate_in, offset_in = gate + "__typed", offset + "__typed"
        else:
            gate_in, offset_in = gate, offset
        added[node.name] = cast + [
            helper.make_node("Mul", [ungated, gate_in], [name + "__scaled"], name=f"__gate_mul_{i}"),
            helper.make_node("Add", [name + "__scaled", offset_in], [name], name=f"__gate_add_{i}")]
        gates.append((gate, offset, atoms, len(shape), ungated))
    nodes = []
    for n in g.node:
        nodes.append(n)
        nodes.extend(added.get(n.name, []))
    del g.node[:]
    g.node.extend(nodes)
    return out, gates


def output_games(model: onnx.ModelProto, analysis: Analysis, cal: CalibrationSet, providers, centred: bool,
                 budget: Optional[int], seed: int = 0, progress=None,
                 types: Optional[Dict[str, int]] = None) -> OutputGames:
    """``types``: each tensor's element type (static_shapes), where the caller has them."""
    start = time.perf_counter()
    if types is None:
        types = {}
        static_shapes(model, {cal.spec.name: (1,) + tuple(cal.sample_shape)}, types)
    gated, gates = _gated_model(model, analysis, types)
    scores = compared_tensors(gated)  # every output's scores, before a final Softmax
    present = {o.name for o in gated.graph.output}
    # untyped: a float16 model's tensors come out as float16
    gated.graph.output.extend([helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(scores) if t not in present])
    for _, _, _, _, ungated in gates:
        gated.graph.output.extend([helper.make_empty_tensor_value_info(ungated)])
    sess = make_session(gated, providers, ours=True)
    steady = keeps_shapes(sess)
    input_name = cal.spec.name
    indices = cal.fit[:EVAL_IMAGES] if len(cal.fit) else cal.holdout[:EVAL_IMAGES]
    x = np.concatenate(list(cal.batches(indices)))[: len(indices)]
    m = len(x)
    fixed = cal.spec.fixed_batch

    # the original outputs and the producers' channel means, with every gate open
    feed = {input_name: x}
    for gate, offset, atoms, rank, _ in gates:
        shape = (m, len(atoms)) + (1,) * (rank - 2)
        feed[gate], feed[offset] = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    outs = sess.run(scores + [u for *_, u in gates], feed)
    means = [o.mean(axis=(0,) + tuple(range(2, o.ndim))) if centred else np.zeros(o.shape[1])
             for o in outs[len(scores):]]
    per_sample = per_image(outs[:len(scores)], m, all_if_none=False)
    if not per_sample:
        raise InputError("--payoff output: no output of the model has one row per image")
    scores = [scores[i] for i in per_sample]
    references = [outs[i].astype(np.float64) for i in per_sample]
    # log-probabilities only for a model whose one output is class scores
    classifier = one_class_score(references)
    if cal.labels is not None and not classifier:
        raise UsageError("--labels needs a model with one output of class scores")
    if classifier:
        references[0] = references[0].reshape(m, -1)
        # the class whose log-probability is the payoff: the label where given, else the model's own
        top1 = references[0].argmax(axis=1) if cal.labels is None else cal.labels[indices][:m]
        if top1.max() >= references[0].shape[1] or top1.min() < 0:
            raise InputError(f"--labels: class ids reach {int(top1.max())}; the model has "
                             f"{references[0].shape[1]} classes")
    energies = [float((r ** 2).sum()) or 1.0 for r in references]
    evaluations = 0

    def payoff(masks: np.ndarray) -> np.ndarray:
        """masks: (K, players) in {0, 1}; mean payoff of each coalition over the images."""
        nonlocal evaluations
        out = np.zeros(len(masks))
        per_run = max(1, ROWS_PER_RUN // m) if not fixed else 1
        for s in range(0, len(masks), per_run):
            chunk = masks[s:s + per_run]
            k = len(chunk)  # the coalitions asked for
            if steady:  # runs of per_run on the CUDA provider (runtime.keeps_shapes); the padding's results are dropped
                chunk = pad_batch(chunk, per_run)
            n = len(chunk)
            f = {input_name: np.tile(x, (n,) + (1,) * (x.ndim - 1))}
            for (gate, offset, atoms, rank, _), mu in zip(gates, means):
                keep = chunk[:, analysis.atom_player[atoms]].astype(np.float32)  # (n, C)
                gv = np.repeat(keep, m, axis=0).reshape((n * m, len(atoms)) + (1,) * (rank - 2))
                f[gate] = gv
                f[offset] = ((1.0 - gv) * mu.reshape((1, -1) + (1,) * (rank - 2))).astype(np.float32)
            ys = [y.astype(np.float64).reshape((n, m) + r.shape[1:])
                  for y, r in zip(sess.run(scores, f), references)]
            for j in range(k):
                if classifier:
                    z = ys[0][j].reshape(m, -1)
                    z = z - z.max(axis=1, keepdims=True)
                    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
                    out[s + j] = float(logp[np.arange(m), top1].mean())
                else:
                    out[s + j] = -sum(float(((y[j] - r) ** 2).sum()) / e
                                      for y, r, e in zip(ys, references, energies)) / len(references)
        evaluations += len(masks)
        return out

    groups = {grp.index: np.flatnonzero(analysis.player_group == grp.index) for grp in analysis.prunable_groups()}
    total_players = sum(len(p) for p in groups.values()) or 1
    curve_cost = sum(len(np.unique(np.linspace(0, len(p), min(len(p), CURVE_POINTS - 1) + 1).round()))
                     for p in groups.values())
    least = curve_cost + sum(2 * (len(p) + 1) for p in groups.values())
    if budget is None:
        budget = max(DEFAULT_BUDGET, least)
    if budget < least:
        raise UsageError(f"--budget {budget} is too small for this model: one pair of permutations per "
                         f"group and the utilisation curves need {least} coalitions")
    rng = np.random.default_rng(seed)
    full_mask = np.ones(analysis.num_players, dtype=np.float32)
    games: Dict[int, GroupGame] = {}
    update = progress(len(groups)) if progress else (lambda n: None)
    for g, players in groups.items():
        n = len(players)
        share = (budget - curve_cost) * n / total_players
        pairs = max(1, int(share // (2 * (n + 1))))
        phi = np.zeros(n)
        for _ in range(pairs):
            perm = rng.permutation(n)
            for order in (perm, perm[::-1]):
                # coalitions along the permutation: row j has the first j players of `order` removed
                masks = np.repeat(full_mask[None], n + 1, axis=0)
                masks[:, players[order]] = 1.0 - np.tri(n + 1, n, -1, dtype=np.float32)
                v = payoff(masks)
                # removing order[j-1] from the coalition costs v[j-1] - v[j]: its marginal value
                phi[order] += v[:-1] - v[1:]
        phi /= 2 * pairs
        order = np.lexsort((np.arange(n), -phi))
        # payoff lost when only the k best stay, measured at a grid of k and interpolated
        ks = np.unique(np.linspace(0, n, min(n, CURVE_POINTS - 1) + 1).round().astype(int))
        masks = np.repeat(full_mask[None], len(ks), axis=0)
        for row, k in enumerate(ks):
            masks[row, players[order[k:]]] = 0.0
        v = payoff(masks)
        lost = np.maximum(v[-1] - v, 0.0)  # v[-1]: everything kept
        loss = np.interp(np.arange(n + 1), ks, lost)
        loss = np.maximum.accumulate(loss[::-1])[::-1]  # keeping more never loses more
        loss[n] = 0.0
        games[g] = GroupGame(players, np.zeros((0, 0)), phi, order, loss)
        update(1)
    return OutputGames(games, evaluations, time.perf_counter() - start, classifier, budget)
