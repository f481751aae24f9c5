"""--payoff output: gates that reproduce the model exactly, sampled Shapley values that see dead
channels, curves the allocation can use, and the budget as a bound."""

import json
import os

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.cli import run
from onnxprune.data import input_spec, load_calibration
from onnxprune.output_payoff import _gated_model, output_games
from onnxprune.runtime import choose_providers
from surgery import analysis_of, kill_players, outputs
from tiny import residual_cnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "models", "mnist_cnn")


def _calibration(model, n=16):
    x = np.random.default_rng(0).normal(size=(n, 3, 8, 8)).astype(np.float32)
    opts = onnxprune.PruneOptions(flops=0.3)
    return load_calibration(x, input_spec(model, opts), opts)


def test_open_gates_reproduce_the_model_exactly():
    prepared, analysis = analysis_of(residual_cnn())
    gated, gates = _gated_model(prepared, analysis)
    assert gates
    onnx.checker.check_model(gated, full_check=True)
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    import onnxruntime as ort
    sess = ort.InferenceSession(gated.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"input": x}
    for gate, offset, atoms, rank, _ in gates:
        shape = (3, len(atoms)) + (1,) * (rank - 2)
        feed[gate], feed[offset] = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    # equal up to float rounding: the Mul and Add change which kernels onnxruntime fuses
    np.testing.assert_allclose(sess.run(None, feed)[0], outputs(prepared, x)[0], rtol=1e-5, atol=1e-6)


def test_dead_channels_get_no_value_and_rank_below_useful_ones():
    model = residual_cnn()
    _, analysis = analysis_of(model)
    group = max(analysis.prunable_groups(), key=lambda g: g.size)
    dead = [0, 3]
    killed = kill_players(model, {group.index: dead})
    prepared, analysis = analysis_of(killed)
    cal = _calibration(killed)
    providers, _ = choose_providers("cpu")
    found = output_games(prepared, analysis, cal, providers, centred=True, budget=4000)
    game = found.games[group.index]
    local = {int(p): i for i, p in enumerate(game.players)}
    dead_players = [game.players[i] for i in dead]
    assert np.abs(game.shapley[[local[int(p)] for p in dead_players]]).max() < 1e-6
    # ranked below every channel worth something (on a random net some channels have negative worth)
    position = {int(game.players[j]): r for r, j in enumerate(game.order)}
    worth = [local[int(p)] for p in game.players if game.shapley[local[int(p)]] > 1e-6]
    assert worth and max(position[int(game.players[i])] for i in worth) < min(position[int(p)] for p in dead_players)
    for g in found.games.values():
        assert g.loss[-1] == 0 and np.all(np.diff(g.loss) <= 1e-12)
    assert found.evaluations <= 4000


def test_coalitions_padded_to_one_shape_give_the_same_games(monkeypatch):
    """On the CUDA provider every run of coalitions takes ROWS_PER_RUN rows, the last chunk
    padded (runtime.keeps_shapes; forced here on the CPU): the games are those of unpadded runs,
    and the session meets one shape of feeds after its first run with every gate open."""
    import onnxruntime as ort

    from onnxprune import output_payoff

    model = residual_cnn()
    prepared, analysis = analysis_of(model)
    cal = _calibration(model)
    providers, _ = choose_providers("cpu")
    seen = []
    run = ort.InferenceSession.run

    def recording_run(sess, names, feeds, *args, **kwargs):
        seen.append(tuple(sorted((k, np.shape(v)) for k, v in feeds.items())))
        return run(sess, names, feeds, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", recording_run)
    found = []
    for steady in (False, True):
        monkeypatch.setattr(output_payoff, "keeps_shapes", lambda sess, steady=steady: steady)
        seen.clear()
        found.append(output_games(prepared, analysis, cal, providers, centred=True, budget=1000))
        shapes = set(seen[1:])
        assert len(shapes) == 1 if steady else len(shapes) > 1, shapes
    plain, padded = found
    assert plain.evaluations == padded.evaluations
    for g, game in plain.games.items():
        np.testing.assert_allclose(padded.games[g].shapley, game.shapley, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(padded.games[g].loss, game.loss, rtol=1e-6, atol=1e-9)
        assert np.array_equal(padded.games[g].order, game.order)


def test_budget_too_small_is_a_usage_error():
    model = residual_cnn()
    prepared, analysis = analysis_of(model)
    providers, _ = choose_providers("cpu")
    with pytest.raises(onnxprune.UsageError, match="--budget 10 is too small"):
        output_games(prepared, analysis, _calibration(model), providers, centred=True, budget=10)


def test_cli_output_payoff_prunes_a_real_model_within_its_budget(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = run([BASE + ".onnx", str(out), "--calib", BASE + "_calib", "--flops", "0.4", "--payoff", "output",
                "--budget", "900", "--max-images", "64", "--no-latency", "--report", str(report)])
    assert code == 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    data = json.loads(report.read_text())
    assert data["payoff"] == "output" and 0 < data["payoff_cost"]["evaluations"] <= 900
    assert 0.4 <= data["flops_reduction"] <= 0.41


def test_labels_need_class_subfolders(tmp_path, capsys):
    code = run([BASE + ".onnx", str(tmp_path / "o.onnx"), "--calib", BASE + "_calib", "--flops", "0.4",
                "--payoff", "output", "--labels"])
    assert code == 3
    assert "--labels" in capsys.readouterr().err and not (tmp_path / "o.onnx").exists()


def _two_headed():
    """A stem, then two heads each with its own conv: class scores and a 4-value box."""
    from onnx import TensorProto, helper
    from tiny import Builder
    b = Builder(seed=3)
    x = b.relu(b.conv("input", 3, 8))
    heads = []
    for width, out in ((8, 5), (8, 4)):
        y = b.relu(b.conv(x, 8, width))
        y = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
        heads.append(b.gemm(y, width, out))
    model = b.model(heads[0], ["N", 5])
    model.graph.output.append(helper.make_tensor_value_info(heads[1], TensorProto.FLOAT, ["N", 4]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_every_output_is_scored_and_a_first_output_is_not_taken_for_class_scores():
    model = _two_headed()
    prepared, analysis = analysis_of(model)
    games = output_games(prepared, analysis, _calibration(model), choose_providers("cpu")[0], centred=True,
                         budget=None, seed=0)
    assert not games.classifier  # two outputs: compared by distance, not by top-1
    # removing a whole group costs something for every group, the second head's conv included
    # (only the first output was scored before, and that group's curve was flat at zero)
    assert len(games.games) == 3
    assert all(game.loss[0] > 0 for game in games.games.values()), [g.loss[0] for g in games.games.values()]


def test_an_argmax_label_and_a_constant_output_beside_the_scores_keep_the_classifier_payoff():
    from onnx import TensorProto, helper
    from tiny import Builder
    b = Builder(seed=5)
    x = b.relu(b.conv("input", 3, 8))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.relu(b.conv(x, 8, 8))])], axis=1)
    logits = b.gemm(x, 8, 5)
    label = b.node("ArgMax", [logits], axis=1, keepdims=0)
    anchors = b.node("Identity", [b.init(np.ones((100, 4)), "anchors")])
    model = b.model(logits, ["N", 5])
    model.graph.output.extend([helper.make_tensor_value_info(label, TensorProto.INT64, ["N"]),
                               helper.make_tensor_value_info(anchors, TensorProto.FLOAT, [100, 4])])
    onnx.checker.check_model(model, full_check=True)
    prepared, analysis = analysis_of(model)
    games = output_games(prepared, analysis, _calibration(model), choose_providers("cpu")[0], centred=True,
                         budget=None, seed=0)
    assert games.classifier  # scored on the logits alone: the label is an integer, the anchors constant
    result = onnxprune.prune(model, np.random.default_rng(0).normal(size=(40, 3, 8, 8)).astype(np.float32),
                             onnxprune.PruneOptions(flops=0.3, latency=False, round_to=1))
    assert result.report.fidelity_top1_agreement is not None
