"""The weight store: large weights outside the protobufs, shared not copied, saved by streaming."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
import tiny
from onnxprune import save, weights
from onnxprune.errors import InternalError, UsageError
from onnxprune.load import load_model
from onnxprune.runtime import make_session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "mnist_cnn.onnx")
CALIB = os.path.join(ROOT, "models", "mnist_cnn_calib")


@pytest.fixture
def small_stubs(monkeypatch):
    monkeypatch.setattr(weights, "STUB_BYTES", 1024)  # stub nearly every weight of the small models


def _x(n=4):
    return np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)


def test_stubs_share_arrays_and_keep_the_protobuf_small(small_stubs):
    with weights.activate(weights.WeightStore()) as store:
        model = load_model(MODEL).model
        assert weights.has_stubs(model) and model.ByteSize() < 20_000
        stub = next(t for t in model.graph.initializer if weights.is_stub(t))
        a, b = weights.array(stub), weights.array(stub)
        assert np.shares_memory(a, b) and not a.flags.writeable  # shared, and nobody may change it
        copy = weights.skeleton(model)
        assert weights.keys(copy) == weights.keys(model)
        assert store.nbytes == sum(weights.nbytes_of(t) for t in model.graph.initializer if weights.is_stub(t))
        full = weights.materialize(model)
    original = onnx.load(MODEL)
    for t, u in zip(full.graph.initializer, original.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(u))


def test_a_stub_outside_its_run_is_an_internal_error(small_stubs):
    with weights.activate(weights.WeightStore()):
        model = load_model(MODEL).model
    stub = next(t for t in model.graph.initializer if weights.is_stub(t))
    with pytest.raises(InternalError, match="run that has ended"):
        weights.array(stub)
    with weights.activate(weights.WeightStore()):
        with pytest.raises(InternalError):
            weights.array(stub)


@pytest.mark.parametrize("lean", [False, True])
def test_sessions_on_stubs_compute_what_the_model_does(small_stubs, lean):
    reference = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"]).run(None, {"input": _x()})[0]
    with weights.activate(weights.WeightStore()) as store:
        model = load_model(MODEL).model
        store.lean = lean
        for optimize in (False, True):
            out = make_session(model, ["CPUExecutionProvider"], optimize=optimize).run(None, {"input": _x()})[0]
            np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_streamed_single_file_is_byte_for_byte_the_serialised_model(small_stubs, tmp_path):
    with weights.activate(weights.WeightStore()):
        model = load_model(MODEL).model
        assert save._stream_size(model) == weights.materialize(model).ByteSize()
        save.save_atomic(model, str(tmp_path / "o.onnx"))
        expected = weights.materialize(model).SerializeToString()
    assert (tmp_path / "o.onnx").read_bytes() == expected
    assert os.listdir(tmp_path) == ["o.onnx"]


def test_external_data_round_trip_and_alignment(small_stubs, tmp_path):
    result = onnxprune.prune(MODEL, CALIB, onnxprune.PruneOptions(flops=0.4, latency=False, max_images=32))
    written = result.save(str(tmp_path / "o.onnx"), external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["o.onnx", "o.onnx.data"]
    assert written == sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
    header = onnx.load(str(tmp_path / "o.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in header.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % save.ALIGN == 0 for o in offsets)
    loaded = onnx.load(str(tmp_path / "o.onnx"))
    onnx.checker.check_model(loaded, full_check=True)
    for t, u in zip(loaded.graph.initializer, result.model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(u))
    sess = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"])
    expected = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"input": _x()})[0], expected.run(None, {"input": _x()})[0])


def test_a_single_file_over_an_external_data_out_removes_its_old_data_file(small_stubs, tmp_path):
    result = onnxprune.prune(MODEL, CALIB, onnxprune.PruneOptions(flops=0.4, latency=False, max_images=32))
    result.save(str(tmp_path / "o.onnx"), external_data=True)
    (tmp_path / "unrelated.onnx.data").write_bytes(b"keep me")
    result.save(str(tmp_path / "o.onnx"), external_data=False)
    assert sorted(os.listdir(tmp_path)) == ["o.onnx", "unrelated.onnx.data"]  # the stale o.onnx.data is gone
    onnx.checker.check_model(onnx.load(str(tmp_path / "o.onnx")), full_check=True)
    # a data file the replaced model did not use is left alone
    (tmp_path / "o.onnx.data").write_bytes(b"not ours")
    result.save(str(tmp_path / "o.onnx"), external_data=False)
    assert (tmp_path / "o.onnx.data").read_bytes() == b"not ours"


def test_a_model_too_big_for_one_protobuf_goes_to_external_data(monkeypatch, tmp_path):
    result = onnxprune.prune(MODEL, CALIB, onnxprune.PruneOptions(flops=0.4, latency=False, max_images=32))
    monkeypatch.setattr(save, "TWO_GB", 100_000)  # pretend the limit is 100 kB
    monkeypatch.setattr(onnxprune.api, "TWO_GB", 100_000)
    result.save(str(tmp_path / "o.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["o.onnx", "o.onnx.data"]
    with pytest.raises(UsageError, match="use PruneResult.save"):
        result.model


def test_prune_in_lean_mode(monkeypatch, tmp_path):
    """The mode of models over LEAN_BYTES (zero-copy sessions, the prepared model as the
    reference, weights released as they are replaced), on a small model."""
    monkeypatch.setattr(weights, "LEAN_BYTES", 0)
    monkeypatch.setattr(weights, "STUB_BYTES", 256)
    model = tiny.plain_cnn()  # with BatchNorms to fold
    x = np.random.default_rng(0).normal(size=(40, 3, 8, 8)).astype(np.float32)
    result = onnxprune.prune(model, x, onnxprune.PruneOptions(flops=0.4, round_to=1))
    report = result.report
    assert any("one copy of the weights kept" in n for n in report.notes)
    assert 0.4 <= report.flops_reduction <= 0.41 and report.fidelity_relative_error < 0.5
    assert len(report.latency) == 2 and all(l["after_ms"] > 0 for l in report.latency)
    onnx.checker.check_model(result.model, full_check=True)
    result.save(str(tmp_path / "o.onnx"))
    assert onnx.load(str(tmp_path / "o.onnx")) == result.model


def test_the_callers_model_is_not_changed():
    model = onnx.load(MODEL)
    before = model.SerializeToString()
    onnxprune.prune(model, CALIB, onnxprune.PruneOptions(flops=0.4, latency=False, max_images=16))
    assert model.SerializeToString() == before
