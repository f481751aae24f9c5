"""Bad input: one line on stderr, a distinct exit code, nothing written, input untouched."""

import glob
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxprune
from onnxprune.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "mnist_cnn.onnx")
CALIB = os.path.join(ROOT, "models", "mnist_cnn_calib")
EVAL = os.path.join(ROOT, "models", "mnist_cnn_test.npz")


@pytest.fixture
def work(tmp_path):
    shutil.copy(MODEL, tmp_path / "in.onnx")
    (tmp_path / "out").mkdir()
    return tmp_path


def _expect_error(work, capsys, args, code, words):
    before = {p: open(p, "rb").read() for p in glob.glob(str(work / "*")) if os.path.isfile(p)}
    assert run(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "an error message is printed"
    assert err[-1].startswith("onnxprune: internal error: " if code == 70 else "onnxprune: error: ")
    assert sum("error" in line for line in err) == 1
    assert not any("Traceback" in line for line in err)
    for word in words:
        assert word in err[-1]
    assert os.listdir(work / "out") == []  # no output, no temporary file
    for p, data in before.items():
        assert open(p, "rb").read() == data


def _prune_args(work, model=None, calib=CALIB, out=None, flops="0.4"):
    return [str(model or work / "in.onnx"), str(out or work / "out" / "o.onnx"), "--calib", str(calib),
            "--flops", flops]


def test_missing_model(work, capsys):
    _expect_error(work, capsys, _prune_args(work, model=work / "nope.onnx"), 3, ["does not exist"])


def test_not_onnx(work, capsys):
    (work / "bad.onnx").write_text("this is not a model\n" * 10)
    _expect_error(work, capsys, _prune_args(work, model=work / "bad.onnx"), 3, ["not an ONNX model"])


def test_truncated_model(work, capsys):
    data = open(MODEL, "rb").read()
    (work / "cut.onnx").write_bytes(data[: len(data) // 3])
    _expect_error(work, capsys, _prune_args(work, model=work / "cut.onnx"), 3, ["ONNX"])


def test_model_without_conv(work, capsys):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 28, 28])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, work / "noconv.onnx")
    _expect_error(work, capsys, _prune_args(work, model=work / "noconv.onnx"), 3, ["no Conv"])


def test_empty_calibration_folder(work, capsys):
    (work / "empty").mkdir()
    _expect_error(work, capsys, _prune_args(work, calib=work / "empty"), 3, ["no images"])


def test_calibration_folder_without_images(work, capsys):
    (work / "texts").mkdir()
    (work / "texts" / "a.txt").write_text("hello")
    _expect_error(work, capsys, _prune_args(work, calib=work / "texts"), 3, ["no images"])


def test_undecodable_image(work, capsys):
    (work / "imgs").mkdir()
    shutil.copy(os.path.join(CALIB, sorted(os.listdir(CALIB))[0]), work / "imgs" / "a.png")
    (work / "imgs" / "b.png").write_bytes(b"\x89PNG not really")
    _expect_error(work, capsys, _prune_args(work, calib=work / "imgs"), 3, ["cannot decode image", "b.png"])


@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (8, 32, 32), (8, 3, 28, 28), (28, 28)])
def test_tensors_of_wrong_shape(work, capsys, shape):
    """The message gives the shape of the array as the user saved it, not a reshaped one."""
    np.save(work / "x.npy", np.zeros(shape, np.float32))
    _expect_error(work, capsys, _prune_args(work, calib=work / "x.npy"), 3,
                  [f"has shape {shape}; the model expects (N, 1, 28, 28)"])


def test_grey_images_without_their_channel_axis_are_taken(tmp_path):
    """(N, 28, 28) for an (N, 1, 28, 28) input: grey image arrays often come without the channel
    axis; calibration and --eval take them as the same images with it."""
    from onnxprune.api import load_labelled
    data = np.load(EVAL)
    x, y = data["x"][:200], data["y"][:200]
    np.savez(tmp_path / "eval3.npz", x=x[:, 0], y=y)
    opts = onnxprune.PruneOptions(flops=0.3, latency=False)
    with_axis = onnxprune.prune(MODEL, x[:64], opts, evaluate=(x, y))
    without = onnxprune.prune(MODEL, x[:64, 0], opts, evaluate=load_labelled(str(tmp_path / "eval3.npz")))
    assert without.report.calibration_images == with_axis.report.calibration_images == 64
    assert without.report.accuracy_before == with_axis.report.accuracy_before
    assert without.report.accuracy_after == with_axis.report.accuracy_after
    assert without.report.flops_reduction == with_axis.report.flops_reduction


@pytest.mark.parametrize("declared,channels_last,given,taken", [
    ((None, 1, 28, 28), False, (5, 28, 28), (5, 1, 28, 28)),
    ((None, 28, 28, 1), True, (5, 28, 28), (5, 28, 28, 1)),
    ((None, 1, 28, 28), False, (1, 28, 28), (1, 1, 28, 28)),  # one sample without its batch axis
    ((None, 3, 28, 28), False, (3, 28, 28), (1, 3, 28, 28)),
])
def test_arrays_are_taken_as_batches_of_the_input(declared, channels_last, given, taken):
    from onnxprune.data import InputSpec, as_samples
    spec = InputSpec("input", declared, channels_last, np.dtype(np.float32))
    assert as_samples(np.zeros(given, np.float32), spec, "x").shape == taken
    with pytest.raises(onnxprune.InputError, match=r"has shape \(5, 28, 29\)"):
        as_samples(np.zeros((5, 28, 29), np.float32), spec, "x")


def test_eval_inputs_of_wrong_shape_are_refused_with_their_shape(work, capsys):
    data = np.load(EVAL)
    np.savez(work / "eval.npz", x=np.zeros((20, 3, 28, 28), np.float32), y=data["y"][:20])
    _expect_error(work, capsys, _prune_args(work) + ["--eval", str(work / "eval.npz"), "--no-latency"], 3,
                  ["'x' of the labelled data has shape (20, 3, 28, 28); the model expects (N, 1, 28, 28)"])


def test_integer_tensors(work, capsys):
    np.save(work / "x.npy", np.zeros((8, 1, 28, 28), np.uint8))
    _expect_error(work, capsys, _prune_args(work, calib=work / "x.npy"), 3, ["dtype uint8"])


@pytest.mark.parametrize("flops", ["0", "1", "1.5", "-0.2"])
def test_ratio_outside_unit_interval(work, capsys, flops):
    _expect_error(work, capsys, _prune_args(work, flops=flops), 2, ["--flops must be in (0, 1)"])


def test_output_equals_input(work, capsys):
    _expect_error(work, capsys, _prune_args(work, out=work / "in.onnx"), 2, ["output is the input model"])


@pytest.mark.parametrize("link", [os.symlink, os.link])
def test_output_is_a_link_to_input(work, capsys, link):
    link(work / "in.onnx", work / "out" / "link.onnx")
    before = os.listdir(work / "out")
    assert run(_prune_args(work, out=work / "out" / "link.onnx")) == 2
    assert "output is the input model" in capsys.readouterr().err
    assert os.listdir(work / "out") == before and open(work / "in.onnx", "rb").read() == open(MODEL, "rb").read()


def test_output_folder_missing(work, capsys):
    _expect_error(work, capsys, _prune_args(work, out=work / "out" / "no" / "o.onnx"), 2, ["does not exist"])


def test_output_folder_is_a_file(work, capsys):
    (work / "out" / "f").write_text("")
    os.remove(work / "out" / "f")
    (work / "afile").write_text("")
    _expect_error(work, capsys, _prune_args(work, out=work / "afile" / "o.onnx"), 2, ["does not exist"])


def test_missing_calib_option(work, capsys):
    _expect_error(work, capsys, [str(work / "in.onnx"), str(work / "out" / "o.onnx"), "--flops", "0.4"], 2,
                  ["--calib"])


def test_unreachable_target(work, capsys):
    _expect_error(work, capsys, _prune_args(work, flops="0.99"), 4, ["cannot be reached", "at most"])


def test_missing_output_argument(work, capsys):
    _expect_error(work, capsys, [str(work / "in.onnx"), "--calib", CALIB, "--flops", "0.4"], 2, ["OUT"])


def test_dynamic_spatial_axes_need_input_size(work, capsys):
    import tiny
    b = tiny.Builder(channels=1)
    b.input = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, "H", "W"])
    x = b.relu(b.conv("input", 1, 8))
    model = b.model(b.node("GlobalAveragePool", [b.conv(x, 8, 4)]))
    onnx.save(model, work / "dyn.onnx")
    _expect_error(work, capsys, _prune_args(work, model=work / "dyn.onnx"), 2, ["--input-size"])


def test_dynamic_spatial_axes_take_the_size_of_a_calibration_array(work, capsys):
    import tiny
    b = tiny.Builder(channels=1)
    b.input = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, "H", "W"])
    x = b.relu(b.conv("input", 1, 8))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.relu(b.conv(x, 8, 8))])], axis=1)
    onnx.save(b.model(b.gemm(x, 8, 4), ["N", 4]), work / "dyn.onnx")
    np.save(work / "x.npy", np.random.default_rng(0).random((32, 1, 12, 20), dtype=np.float32))
    args = _prune_args(work, model=work / "dyn.onnx", calib=work / "x.npy", flops="0.3") + ["--no-latency"]
    assert run(args) == 0, capsys.readouterr().err
    pruned = onnx.load(work / "out" / "o.onnx")
    dims = [d.dim_param or d.dim_value for d in pruned.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 1, "H", "W"]  # still dynamic: the array only sized the calibration
    assert run([str(work / "dyn.onnx"), "--analyze", "--calib", str(work / "x.npy")]) == 0  # sized there too
    assert "prunable channel group" in capsys.readouterr().out


def test_opset_older_than_supported(work, capsys):
    import tiny
    model = tiny.plain_cnn(opset=9)
    onnx.save(model, work / "old.onnx")
    _expect_error(work, capsys, _prune_args(work, model=work / "old.onnx"), 3, ["opset 9", "oldest supported (11)"])


def test_nothing_prunable_names_the_blocking_op(work, capsys):
    import tiny
    b = tiny.Builder(channels=1, size=28)
    x = b.relu(b.conv("input", 1, 8))
    model = b.model(b.conv(b.node("Softmax", [x], axis=1), 8, 4))
    onnx.save(model, work / "blocked.onnx")
    _expect_error(work, capsys, _prune_args(work, model=work / "blocked.onnx"), 4,
                  ["no channel group of this model can be pruned", "Softmax", "--analyze"])


# -- the rest of the README's error table ------------------------------------------------------

def _tiny_grey(b=None):
    import tiny
    return b or tiny.Builder(channels=1, size=28)


def test_valid_protobuf_that_is_not_a_model(work, capsys):
    tensor = onnx.numpy_helper.from_array(np.zeros(100, np.float32), "t")
    (work / "tensor.onnx").write_bytes(tensor.SerializeToString())
    _expect_error(work, capsys, _prune_args(work, model=work / "tensor.onnx"), 3, ["not an ONNX model"])


def test_empty_graph(work, capsys):
    model = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, work / "empty.onnx")
    _expect_error(work, capsys, _prune_args(work, model=work / "empty.onnx"), 3, ["no nodes"])


def test_model_failing_the_checker_says_why_in_one_line(work, capsys):
    b = _tiny_grey()
    model = b.model(b.conv(b.relu(b.conv("input", 1, 8)), 8, 4))
    model.graph.node[1].input[0] = "nowhere"
    onnx.save(model, work / "bad.onnx")
    _expect_error(work, capsys, _prune_args(work, model=work / "bad.onnx"), 3,
                  ["fails the ONNX checker", "'nowhere'", "is not output of any previous nodes"])


def test_custom_op_that_onnxruntime_cannot_load(work, capsys):
    b = _tiny_grey()
    x = b.conv(b.relu(b.conv("input", 1, 8)), 8, 8)
    b.nodes.append(helper.make_node("Foo", [x], ["foo"], domain="com.example", name="foo"))
    graph = helper.make_graph(b.nodes, "g", [b.input], [helper.make_tensor_value_info("foo", TensorProto.FLOAT,
                                                                                      ["N", 8, 28, 28])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save(model, work / "custom.onnx")
    _expect_error(work, capsys, _prune_args(work, model=work / "custom.onnx"), 3,
                  ["onnxruntime cannot load the model", "com.example:Foo", "custom op"])


def test_ir_version_onnxruntime_does_not_support(work, capsys):
    import onnxruntime as ort

    b = _tiny_grey()
    model = b.model(b.conv(b.relu(b.conv("input", 1, 8)), 8, 4))
    model.ir_version = onnx.IR_VERSION  # the newest the checker knows
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        pytest.skip(f"this onnxruntime runs IR version {onnx.IR_VERSION}")
    except Exception:
        pass
    onnx.save(model, work / "future.onnx")
    _expect_error(work, capsys, _prune_args(work, model=work / "future.onnx"), 3,
                  ["onnxruntime cannot load the model", "IR version"])


def test_several_inputs_are_refused(work, capsys):
    b = _tiny_grey()
    y = b.conv(b.node("Add", [b.relu(b.conv("input", 1, 8)), "extra"]), 8, 4)
    extra = helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", 8, 28, 28])
    graph = helper.make_graph(b.nodes, "g", [b.input, extra],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 4, 28, 28])], b.inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), work / "two.onnx")
    _expect_error(work, capsys, _prune_args(work, model=work / "two.onnx"), 3,
                  ["2 inputs (input, extra)", "single-input"])


def test_nan_in_the_activations(work, capsys):
    b = _tiny_grey()
    model = b.model(b.conv(b.node("Log", [b.conv("input", 1, 8)]), 8, 4))  # log of negative values
    onnx.save(model, work / "nan.onnx")
    _expect_error(work, capsys, _prune_args(work, model=work / "nan.onnx"), 3, ["NaN or infinite values"])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into any folder")
def test_output_folder_not_writable(work, capsys):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _expect_error(work, capsys, _prune_args(work, out=locked / "o.onnx"), 2, ["not writable"])
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_internal_failure_writes_nothing(work, capsys, monkeypatch):
    """A check on our own output fails: exit 70, the message, nothing written."""
    import onnxprune.verify

    def broken(*args, **kwargs):
        raise RuntimeError("simulated: onnxruntime rejects the pruned model")

    monkeypatch.setattr(onnxprune.verify, "make_session", broken)
    _expect_error(work, capsys, _prune_args(work), 70, ["onnxruntime cannot load the pruned model", "nothing written"])


def test_a_graph_we_built_that_onnxruntime_cannot_run_is_an_internal_error(work, capsys, monkeypatch):
    """The refit's segments are cut from the pruned model: a fault there is not the user's model."""
    import onnxprune.segments

    cut = onnxprune.segments.Segmenter.segment

    def broken(self, *args, **kwargs):
        seg = cut(self, *args, **kwargs)
        seg.graph.node[0].input[0] = "nowhere"  # reads a tensor nothing makes
        return seg

    monkeypatch.setattr(onnxprune.segments.Segmenter, "segment", broken)
    _expect_error(work, capsys, _prune_args(work), 70, ["onnxruntime cannot load a model onnxprune made",
                                                         "nothing written"])


def test_unexpected_bug_is_one_line_without_verbose_and_a_traceback_with_it(work, capsys, monkeypatch):
    import onnxprune.api

    def bug(*args, **kwargs):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(onnxprune.api, "allocate", bug)
    assert run(_prune_args(work)) == 70
    err = capsys.readouterr().err
    assert "onnxprune: internal error: ZeroDivisionError: simulated bug (run with --verbose" in err
    assert "Traceback" not in err and os.listdir(work / "out") == []
    assert run(_prune_args(work) + ["--verbose"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and os.listdir(work / "out") == []


# -- external data -------------------------------------------------------------------------------

def _with_external_data(model, folder, location):
    """Save ``model`` with every initializer in external data, then point them at ``location``."""
    onnx.save(model, folder / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    header = onnx.load(str(folder / "ext.onnx"), load_external_data=False)
    for t in header.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (folder / "ext.onnx").write_bytes(header.SerializeToString())
    return folder / "ext.onnx"


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_the_folder_is_refused_before_it_is_read(tmp_path, kind):
    """The target is a named pipe: opening it to read would block, so a run that returns at
    once (here within 60 s) has not read it."""
    import subprocess
    import sys

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    secret = tmp_path / "secret"
    os.mkfifo(secret)
    location = {"absolute": str(secret), "dotdot": "../secret", "symlink": "link"}[kind]
    if kind == "symlink":
        os.symlink(secret, model_dir / "link")
    path = _with_external_data(onnx.load(MODEL), model_dir, location)
    before = path.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = subprocess.run([sys.executable, "-m", "onnxprune", str(path), str(out_dir / "o.onnx"), "--calib", CALIB,
                             "--flops", "0.4"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    word = "leaves the model's folder" if kind == "symlink" else "is outside the model's folder"
    assert result.stderr.strip() == f"onnxprune: error: external data location {location!r} of tensor " \
                                    f"{onnx.load(MODEL).graph.initializer[0].name!r} {word}"
    assert path.read_bytes() == before and os.listdir(out_dir) == []


def test_external_data_missing_or_short(work, capsys):
    model_dir = work / "model"
    model_dir.mkdir()
    path = _with_external_data(onnx.load(MODEL), model_dir, "ext.onnx.data")
    data = (model_dir / "ext.onnx.data").read_bytes()
    (model_dir / "ext.onnx.data").write_bytes(data[: len(data) // 2])
    _expect_error(work, capsys, _prune_args(work, model=path), 3, ["external data of tensor", "beyond the end"])
    os.remove(model_dir / "ext.onnx.data")
    _expect_error(work, capsys, _prune_args(work, model=path), 3, ["external data file 'ext.onnx.data'", "is missing"])


def test_output_data_file_must_not_be_the_inputs(tmp_path, capsys):
    """A model with external data is written as OUT + OUT.data: never over the input's data."""
    path = _with_external_data(onnx.load(MODEL), tmp_path, "o.onnx.data")
    os.rename(tmp_path / "ext.onnx.data", tmp_path / "o.onnx.data")
    files = {p: p.read_bytes() for p in tmp_path.iterdir()}
    assert run([str(path), str(tmp_path / "o.onnx"), "--calib", CALIB, "--flops", "0.4", "--criterion", "l1",
                "--no-recover", "--no-latency", "--max-images", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("onnxprune: error: ") and "is a file of the input model" in err[-1]
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_cuda_asked_for_without_a_gpu(work, capsys):
    from onnxprune.runtime import _cuda_usable

    if _cuda_usable():
        pytest.skip("a CUDA GPU is usable here")
    _expect_error(work, capsys, _prune_args(work) + ["--device", "cuda"], 2, ["--device cuda", "no usable CUDA GPU"])


def test_a_gpu_whose_cuda_provider_does_not_start(work, capsys, monkeypatch):
    """A GPU and its driver without the CUDA libraries onnxruntime-gpu needs: --device cuda is
    refused before any work, and the default runs on the CPU and says why."""
    from onnxprune import runtime

    monkeypatch.setattr(runtime, "_cuda_usable", lambda: True)
    monkeypatch.setattr(runtime, "_CUDA_STARTS", False)
    _expect_error(work, capsys, _prune_args(work) + ["--device", "cuda"], 2,
                  ["--device cuda", "CUDA provider did not start", "--device cpu"])
    result = onnxprune.prune(str(work / "in.onnx"), CALIB, onnxprune.PruneOptions(flops=0.4, latency=False,
                                                                                  max_images=16))
    assert result.report.provider.startswith("CPU (") and "CUDA provider did not start" in result.report.provider


@pytest.mark.parametrize("stage", ["load", "run"])
def test_a_failure_on_the_gpu_points_to_the_cpu(work, capsys, monkeypatch, stage):
    """With onnxruntime's own fallback off, the CUDA provider's failures are ours to say, and
    the CPU provider is the way round them."""
    import onnxruntime as ort

    from onnxprune import runtime

    monkeypatch.setattr(runtime, "_cuda_usable", lambda: True)
    monkeypatch.setattr(runtime, "_CUDA_STARTS", True)
    real_init = ort.InferenceSession.__init__

    def on_cpu_instead(self, *args, **kwargs):  # no GPU here: build on the CPU, fail like the GPU would
        if stage == "load":
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDNN failure 4: CUDNN_STATUS_INTERNAL_ERROR")
        kwargs["providers"] = ["CPUExecutionProvider"]
        real_init(self, *args, **kwargs)

    def fails(self, *args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDA error cudaErrorLaunchFailure:unspecified launch failure")

    monkeypatch.setattr(ort.InferenceSession, "__init__", on_cpu_instead)
    monkeypatch.setattr(ort.InferenceSession, "get_providers", lambda self: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort.InferenceSession, "run", fails)
    words = ["cannot load the model", "CUDNN_STATUS_INTERNAL_ERROR"] if stage == "load" else [
        "failed to run the model", "cudaErrorLaunchFailure"]
    _expect_error(work, capsys, _prune_args(work), 3, words + ["(on the CUDA provider: --device cpu may"])


def test_the_cuda_probe_is_silent_where_cuda_does_not_start(capfd, monkeypatch):
    # onnxruntime logs its failure to load the CUDA provider on stderr; the probe keeps it quiet
    from onnxprune import runtime

    monkeypatch.setattr(runtime, "_CUDA_STARTS", None)
    if runtime._cuda_starts():
        pytest.skip("onnxruntime's CUDA provider starts here")
    assert capfd.readouterr() == ("", "")  # nor its fallback's block of text on stdout


@pytest.mark.parametrize("message, gpu, advice", [
    ("Failed to allocate memory for requested buffer of size 1073741824", False, "lower --batch-size"),
    # the CUDA provider's arena reports a failed cudaMalloc in the same words: the session says
    # where it ran, and on a GPU the CPU's memory is the other way out
    ("Failed to allocate memory for requested buffer of size 1073741824", True,
     "lower --batch-size or use --device cpu"),
    ("CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc((void**)&p, size);", False,
     "lower --batch-size or use --device cpu"),
    ("CUDA error cudaErrorMemoryAllocation:out of memory", False, "lower --batch-size or use --device cpu"),
])
def test_a_batch_that_does_not_fit_says_what_to_do(work, capsys, monkeypatch, message, gpu, advice):
    import onnxruntime as ort

    real = ort.InferenceSession.run

    def out_of_memory(self, *args, **kwargs):
        if len(self.get_outputs()) > 1:  # the calibration session, with intermediate tensors exposed
            raise RuntimeError(f"[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : {message}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", out_of_memory)
    if gpu:
        monkeypatch.setattr(ort.InferenceSession, "get_providers",
                            lambda self: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    _expect_error(work, capsys, _prune_args(work) + ["--batch-size", "64"], 3,
                  ["out of memory running a batch of 64", advice])
    if "--device cpu" not in advice:
        assert "--device cpu" not in capsys.readouterr().err


@pytest.mark.parametrize("gpu", [False, True])
def test_a_model_that_does_not_fit_in_memory_says_so(work, capsys, monkeypatch, gpu):
    import onnxruntime as ort

    from onnxprune import runtime

    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested "
                           "buffer of size 1073741824")

    monkeypatch.setattr(runtime, "_cuda_usable", lambda: gpu)
    monkeypatch.setattr(runtime, "_CUDA_STARTS", gpu)  # the probe's answer, so that it does not run
    monkeypatch.setattr(ort.InferenceSession, "__init__", no_memory)
    words = ["out of memory loading the model into onnxruntime"] + (["on the GPU: use --device cpu"] if gpu else [])
    _expect_error(work, capsys, _prune_args(work), 3, words)


def test_output_that_is_a_folder(work, capsys):
    (work / "out" / "d.onnx").mkdir()
    before = os.listdir(work / "out")
    assert run(_prune_args(work, out=work / "out" / "d.onnx")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("onnxprune: error: ") and "is a folder; give a file name" in err[-1]
    assert os.listdir(work / "out") == before and os.listdir(work / "out" / "d.onnx") == []


# -- the options of the later methods ------------------------------------------------------------

@pytest.mark.parametrize("extra, words", [
    (["--latency", "0.4"], ["either --flops or --latency"]),
    (["--sweep", "0.3"], ["either --flops or --sweep"]),
    (["--criterion", "bn-scale", "--flops", "0.4"], None),  # replaced below: mnist_cnn has BN
    (["--payoff", "output", "--budget", "5"], ["--budget 5 is too small"]),
])
def test_method_option_usage_errors(work, capsys, extra, words):
    args = _prune_args(work) + extra
    if words is None:  # bn-scale on a model whose BN is folded away: the shipped ResNet's
        model = work / "resnet.onnx"
        shutil.copy(os.path.join(ROOT, "models", "fmnist_resnet.onnx"), model)
        args = _prune_args(work, model=model, calib=os.path.join(ROOT, "models", "fmnist_resnet_calib")) + [
            "--criterion", "bn-scale"]
        words = ["bn-scale needs BatchNormalization"]
    _expect_error(work, capsys, args, 2, words)


def test_labels_without_class_folders(work, capsys):
    _expect_error(work, capsys, _prune_args(work) + ["--payoff", "output", "--labels"], 3,
                  ["--labels", "one subfolder per class"])


# -- the report file, the sweep folder and checks found by a new user's review -------------------

@pytest.mark.parametrize("target", ["in", "out", "missing_folder", "folder"])
def test_report_path_is_checked_before_any_work(work, capsys, target):
    (work / "rdir").mkdir()
    path = {"in": work / "in.onnx", "out": work / "out" / "o.onnx",
            "missing_folder": work / "nowhere" / "r.json", "folder": work / "rdir"}[target]
    words = {"in": ["is a file this run reads or writes"], "out": ["is a file this run reads or writes"],
             "missing_folder": ["--report folder", "does not exist"], "folder": ["is a folder"]}[target]
    _expect_error(work, capsys, _prune_args(work) + ["--report", str(path)], 2, words)


def test_analyze_report_cannot_replace_the_model(work, capsys):
    _expect_error(work, capsys, [str(work / "in.onnx"), "--analyze", "--report", str(work / "in.onnx")], 2,
                  ["is a file this run reads or writes"])


@pytest.mark.parametrize("flag,value,words", [
    ("--latency-batch", "0", ["--latency-batch must be at least 1"]),
    ("--seed", "-1", ["--seed must be a non-negative integer"]),
    ("--scale", "0", ["--scale must be positive"]),
])
def test_numeric_options_out_of_range(work, capsys, flag, value, words):
    _expect_error(work, capsys, _prune_args(work) + [flag, value], 2, words)


def test_api_latency_switch_is_not_a_target():
    with pytest.raises(onnxprune.UsageError, match="latency_target=R"):
        onnxprune.PruneOptions(flops=None, latency=0.3).validate()


def test_sweep_with_latency_target_is_refused(work, capsys):
    args = [str(work / "in.onnx"), str(work / "out" / "sw"), "--calib", str(CALIB), "--sweep", "0.3", "--latency", "0.3"]
    _expect_error(work, capsys, args, 2, ["does not combine with --latency"])


def test_sweep_report_is_refused(work, capsys):
    args = [str(work / "in.onnx"), str(work / "out" / "sw"), "--calib", str(CALIB), "--sweep", "0.3",
            "--report", str(work / "r.json")]
    _expect_error(work, capsys, args, 2, ["--report does not apply to --sweep"])


@pytest.mark.parametrize("case,words", [
    ("uint8", ["'x' is uint8", "preprocessed float inputs"]),
    ("strings", ["'y' must hold integer class ids"]),
    ("too_many_classes", ["the labels go up to 99"]),
    ("nan", ["'x' contains NaN"]),
])
def test_bad_eval_data(work, capsys, case, words):
    x = np.load(EVAL)["x"][:20]
    y = np.load(EVAL)["y"][:20]
    if case == "uint8":
        x = (x * 255).astype(np.uint8)
    elif case == "strings":
        y = np.array([str(v) for v in y])
    elif case == "nan":
        x = x.copy()
        x[5] = np.nan
    else:
        y = y.copy()
        y[3] = 99
    np.savez(work / "eval.npz", x=x, y=y)
    _expect_error(work, capsys, _prune_args(work) + ["--eval", str(work / "eval.npz"), "--no-latency"],
                  3, words)


def test_eval_takes_one_hot_labels(tmp_path):
    from onnxprune.api import load_labelled
    x, y = np.load(EVAL)["x"][:10], np.load(EVAL)["y"][:10]
    np.savez(tmp_path / "e.npz", x=x, y=np.eye(10, dtype=np.float32)[y])
    np.testing.assert_array_equal(load_labelled(str(tmp_path / "e.npz"))[1], y)
    np.savez(tmp_path / "c.npz", x=x, y=y[:, None])  # a column of ids, not one-hot rows
    np.testing.assert_array_equal(load_labelled(str(tmp_path / "c.npz"))[1], y)


def test_hidden_files_in_the_calibration_folder_are_skipped(tmp_path):
    from onnxprune.data import _list_images
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "._a.png").write_bytes(b"junk")  # a macOS resource fork
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "b.png").write_bytes(b"")
    files, skipped = _list_images(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["a.png"] and skipped == 1


def test_ignore_of_a_name_not_in_the_model(work, capsys):
    _expect_error(work, capsys, _prune_args(work) + ["--ignore", "Conv_typo"], 2,
                  ["--ignore 'Conv_typo': no node, and no tensor carrying channels"])


@pytest.mark.parametrize("extra,words", [
    (["--labels"], ["--labels is read by --payoff output only"]),
    (["--method", "bottleneck", "--criterion", "l1"], ["do not apply to it"]),
])
def test_options_that_would_be_ignored_are_refused(work, capsys, extra, words):
    _expect_error(work, capsys, _prune_args(work) + extra, 2, words)


def test_input_size_against_a_fixed_size_model(work, capsys):
    _expect_error(work, capsys, _prune_args(work) + ["--input-size", "32,32"], 2,
                  ["has a fixed size 28x28", "dynamic"])


def test_report_cannot_replace_the_inputs_data_file_or_the_calibration(work, capsys):
    model = onnx.load(MODEL)
    onnx.save(model, str(work / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    for target in (work / "ext.onnx.data",):
        _expect_error(work, capsys, _prune_args(work, model=work / "ext.onnx") + ["--report", str(target)], 2,
                      ["is a file this run reads or writes"])
    np.save(work / "x.npy", np.zeros((4, 1, 28, 28), np.float32))
    _expect_error(work, capsys, _prune_args(work, calib=work / "x.npy") + ["--report", str(work / "x.npy")], 2,
                  ["is a file this run reads or writes"])


def test_ignore_of_a_weight_name_is_refused(work, capsys):
    weight = next(n.input[1] for n in onnx.load(MODEL).graph.node if n.op_type == "Conv")
    _expect_error(work, capsys, _prune_args(work) + ["--ignore", weight], 2, ["no node, and no tensor carrying channels"])


def test_a_calibration_array_cannot_resize_a_fixed_axis(work, capsys):
    import tiny
    b = tiny.Builder(channels=1)
    b.input = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, 12, "W"])
    x = b.relu(b.conv("input", 1, 8))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.relu(b.conv(x, 8, 8))])], axis=1)
    onnx.save(b.model(b.gemm(x, 8, 4), ["N", 4]), work / "half.onnx")
    np.save(work / "x.npy", np.zeros((8, 1, 20, 20), np.float32))
    _expect_error(work, capsys, _prune_args(work, model=work / "half.onnx", calib=work / "x.npy"), 2,
                  ["the calibration array gives height 20", "fixed height of 12"])


def _calib_array(work, name="c.npy"):
    x = np.load(EVAL)["x"][:40]
    path = work / name
    if name.endswith(".npz"):
        np.savez(path, x=x)
    else:
        np.save(path, x)
    return path


@pytest.mark.parametrize("which", ["calib_npy", "calib_npz", "eval"])
def test_output_that_is_another_input_is_refused(work, capsys, which):
    calib = _calib_array(work, "c.npz" if which == "calib_npz" else "c.npy")
    args = _prune_args(work, calib=calib, out=calib) + ["--no-latency"]
    if which == "eval":
        shutil.copy(EVAL, work / "e.npz")
        args = _prune_args(work, calib=calib, out=work / "e.npz") + ["--eval", str(work / "e.npz"), "--no-latency"]
    _expect_error(work, capsys, args, 2, ["is a file this run reads"])


@pytest.mark.parametrize("target", ["out", "report"])
def test_a_file_name_too_long_is_refused_before_any_work(work, capsys, target):
    long_name = str(work / "out" / ("a" * 300 + ".onnx"))
    args = _prune_args(work, out=long_name if target == "out" else None) + ["--no-latency"]
    if target == "report":
        args += ["--report", long_name]
    _expect_error(work, capsys, args, 2, ["file name is too long"])


def test_a_holdout_that_leaves_nothing_to_fit_is_refused(work, capsys):
    _expect_error(work, capsys, _prune_args(work) + ["--max-images", "10", "--holdout", "0.96"], 2,
                  ["--holdout 0.96 leaves none of the 10 calibration images"])


def test_an_object_array_npz_is_an_input_error(work, capsys):
    np.savez(work / "obj.npz", x=np.empty(3, dtype=object))
    _expect_error(work, capsys, _prune_args(work, calib=work / "obj.npz"), 3, ["cannot read calibration tensors"])


@pytest.mark.parametrize("flag,value", [("--gate-lr", "nan"), ("--gate-flops-weight", "nan"),
                                        ("--gate-binary-weight", "nan"), ("--scale", "nan"), ("--mean", "1e39")])
def test_option_values_that_are_not_numbers_a_run_can_use_are_refused(work, capsys, flag, value):
    extra = ["--method", "bottleneck"] if flag.startswith("--gate") else []
    _expect_error(work, capsys, _prune_args(work) + extra + [flag, value], 2, ["gate" if extra else flag])


def test_preprocessing_options_with_tensors_are_refused(work, capsys):
    args = _prune_args(work, calib=_calib_array(work)) + ["--mean", "0.5", "--bgr"]
    _expect_error(work, capsys, args, 2, ["--mean, --bgr preprocess images"])


def test_sweep_into_the_calibration_folder_is_refused(work, capsys):
    folder = work / "imgs"
    shutil.copytree(CALIB, folder)
    args = [str(work / "in.onnx"), str(folder / "sweep"), "--calib", str(folder), "--sweep", "0.3"]
    _expect_error(work, capsys, args, 2, ["inside the calibration folder"])
    assert sorted(os.listdir(folder)) == sorted(os.listdir(CALIB))


def test_a_sweep_that_reaches_no_target_fails(work, capsys):
    args = [str(work / "in.onnx"), str(work / "out" / "sw"), "--calib", str(CALIB), "--sweep", "0.995",
            "--no-latency", "--max-images", "32"]
    assert run(args) == 4
    err = capsys.readouterr().err
    assert "no --sweep target can be reached" in err and "Traceback" not in err
    written = err.split("wrote only ")[1]
    assert all(f in written for f in os.listdir(work / "out" / "sw"))  # the table, its JSON and any plot
    assert not [f for f in os.listdir(work / "out" / "sw") if f.endswith(".onnx")]


def test_the_most_that_can_be_removed_is_quoted_rounded_down(work, capsys):
    assert run(_prune_args(work, flops="0.995") + ["--no-latency", "--max-images", "32"]) == 4
    import re

    err = capsys.readouterr().err
    most = float(re.search(r"at most ([0-9.]+)% of FLOPs", err).group(1)) / 100
    assert run(_prune_args(work, flops=f"{most:.3f}") + ["--no-latency", "--max-images", "32"]) == 0
