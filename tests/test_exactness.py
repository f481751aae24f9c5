"""Pruning never changes what a network computes: only channels go."""

import numpy as np
import onnx
import pytest

import tiny
from surgery import analysis_of, kill_players, outputs, prune_players, rel_error, sample, spare_one_per_layer

MODELS = {"plain": tiny.plain_cnn, "residual": tiny.residual_cnn, "concat": tiny.concat_cnn,
          "paddle_constants": tiny.constant_node_cnn, "grouped": tiny.grouped_cnn,
          "plain_opset11": lambda: tiny.plain_cnn(opset=11), "residual_opset11": lambda: tiny.residual_cnn(opset=11),
          "residual_opset21": lambda: tiny.residual_cnn(opset=21),
          "shufflenet_v2": tiny.shufflenet_v2, "shufflenet_v2_opset11": lambda: tiny.shufflenet_v2(opset=11),
          "shufflenet_v1": tiny.shufflenet_v1,
          "yolo_c2f": tiny.yolo_c2f, "yolo_c2f_opset11": lambda: tiny.yolo_c2f(opset=11),
          "yolo_c2f_opset18": lambda: tiny.yolo_c2f(opset=18), "slices": tiny.slices_cnn}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruning_nothing_keeps_outputs(name):
    model = MODELS[name]()
    pruned = prune_players(model, {})
    onnx.checker.check_model(pruned, full_check=True)
    x = sample(model)
    assert rel_error(outputs(model, x), outputs(pruned, x)) < 1e-6


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dead_channels_are_removed_exactly(name):
    model = MODELS[name]()
    _, analysis = analysis_of(model)
    groups = analysis.prunable_groups()
    assert groups, "every test model has prunable groups"
    rng = np.random.default_rng(1)
    # each prunable group on its own, then all at once
    plans = [{g.index: sorted(rng.choice(g.size, max(1, g.size // 3), replace=False).tolist())} for g in groups]
    plans.append({k: v for p in plans for k, v in p.items()})
    plans = [spare_one_per_layer(analysis, p) for p in plans]  # no Split or Slice left empty
    x = sample(model)
    for drop in plans:
        killed = kill_players(model, drop)
        pruned = prune_players(killed, drop)
        onnx.checker.check_model(pruned, full_check=True)
        assert rel_error(outputs(killed, x), outputs(pruned, x)) < 1e-4, drop
        assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]


@pytest.mark.parametrize("dims", [["N", 10], ["batch", "classes"], [None, None]], ids=["N", "named", "unknown"])
def test_declared_output_dims_survive_a_fixed_input_batch(dims):
    """Shape inference can resolve an output dim the model leaves symbolic or unknown (here
    behind a fixed input batch); the pruned model still declares the original's outputs."""
    import onnxprune

    model = tiny.plain_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    for dim, value in zip(model.graph.output[0].type.tensor_type.shape.dim, dims):
        dim.Clear()
        if isinstance(value, int):
            dim.dim_value = value
        elif value is not None:
            dim.dim_param = value
    x = np.random.default_rng(0).random((8, 3, 8, 8), dtype=np.float32)
    pruned = onnxprune.prune(model, x, onnxprune.PruneOptions(flops=0.3, latency=False)).model
    assert pruned.graph.output[0] == model.graph.output[0]
    assert rel_error(outputs(model, x[:4]), outputs(pruned, x[:4])) < 1.0
