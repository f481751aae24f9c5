"""Correct the per-channel statistics drift of layers whose BatchNormalization was folded.

The adaptive-BN idea for a model without BN nodes left: after pruning and refitting,
each conv that had a BatchNormalization folded into it should still give its kept
channels the mean and spread they had in the original (which its BN was trained to
produce). Per kept channel c, with the original's mean and standard deviation
mu_o, sigma_o and the pruned model's mu_p, sigma_p on the calibration images,

    y' = (y - mu_p) * s + mu_o,   s = sigma_o / sigma_p clipped to [1/2, 2],

folded into the conv's weights and bias. The original's statistics are measured
once; the pruned model's are measured again after each round, because correcting a
layer changes what the layers after it see.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np
import onnx

from . import weights
from .data import CalibrationSet
from .calibrate import collect_stats
from .load import free_name, names_in

SCALE_LIMIT = 2.0


def _moments(model: onnx.ModelProto, names: List[str], cal: CalibrationSet, indices, providers, ours: bool):
    """Per-channel mean and standard deviation of each named tensor over images and pixels."""
    stats = collect_stats(model, {n: 1 for n in names}, cal, indices, providers, label="measuring BN drift",
                          ours=ours)
    out = {}
    for name in names:
        var = stats[name].covariance()
        out[name] = (stats[name].mean, np.sqrt(np.maximum(np.diag(var) if var.ndim == 2 else var, 0.0)))
    return out


def correct_drift(original: onnx.ModelProto, pruned: onnx.ModelProto, folded_outputs: Sequence[str],
                  keep: Callable[[str], Optional[np.ndarray]], cal: CalibrationSet, indices: Sequence[int],
                  providers, rounds: int = 2) -> List[str]:
    """Correct, in place in ``pruned``, every Conv whose output is one of ``folded_outputs``;
    returns the names of the layers corrected."""
    folded = set(folded_outputs)
    convs = {n.output[0]: n for n in pruned.graph.node if n.op_type == "Conv" and n.output[0] in folded}
    names = sorted(convs)
    if not names:
        return []
    inits = {t.name: t for t in pruned.graph.initializer}
    target = _moments(original, names, cal, indices, providers, ours=False)
    corrected = set()
    taken = names_in(pruned)  # for the biases added below; free_name adds each one it gives out
    for _ in range(rounds):
        now = _moments(pruned, names, cal, indices, providers, ours=True)
        for name in names:
            node = convs[name]
            mask = keep(name)
            mu_o, sd_o = target[name]
            if mask is not None:
                mu_o, sd_o = mu_o[mask], sd_o[mask]
            mu_p, sd_p = now[name]
            if len(mu_p) != len(mu_o) or node.input[1] not in inits:
                continue
            s = np.clip(np.where(sd_p > 0, sd_o / np.maximum(sd_p, 1e-30), 1.0), 1 / SCALE_LIMIT, SCALE_LIMIT)
            stored = weights.array(inits[node.input[1]])
            w = stored.astype(np.float64)
            b = (weights.array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2]
                 else np.zeros(w.shape[0]))
            # in the layer's own type: a float16 model keeps float16 weights
            new_w = (w * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(stored.dtype)
            new_b = (s * (b - mu_p) + mu_o).astype(stored.dtype)
            corrected.add(name)
            weights.assign(inits[node.input[1]], new_w)
            if len(node.input) > 2 and node.input[2]:
                weights.assign(inits[node.input[2]], new_b)
            else:
                bias = weights.make_tensor(new_b, free_name(name + "_drift_bias", taken))
                pruned.graph.initializer.append(bias)
                inits[bias.name] = pruned.graph.initializer[-1]
                node.input.append(bias.name)
    return [convs[n].name for n in names if n in corrected]
