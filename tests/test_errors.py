"""Bad input: one line on stderr, a distinct exit code, nothing written, input untouched."""

import glob
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "mnist_cnn.onnx")
CALIB = os.path.join(ROOT, "models", "mnist_cnn_calib")


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
    assert err[-1].startswith("onnxprune: error: ")
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


def test_tensors_of_wrong_shape(work, capsys):
    np.save(work / "x.npy", np.zeros((8, 3, 32, 32), np.float32))
    _expect_error(work, capsys, _prune_args(work, calib=work / "x.npy"), 3, ["shape", "(N, 1, 28, 28)"])


def test_integer_tensors(work, capsys):
    np.save(work / "x.npy", np.zeros((8, 1, 28, 28), np.uint8))
    _expect_error(work, capsys, _prune_args(work, calib=work / "x.npy"), 3, ["dtype uint8"])


@pytest.mark.parametrize("flops", ["0", "1", "1.5", "-0.2"])
def test_ratio_outside_unit_interval(work, capsys, flops):
    _expect_error(work, capsys, _prune_args(work, flops=flops), 2, ["--flops must be in (0, 1)"])


def test_output_equals_input(work, capsys):
    _expect_error(work, capsys, _prune_args(work, out=work / "in.onnx"), 2, ["output is the input model"])


def test_output_is_a_link_to_input(work, capsys):
    os.symlink(work / "in.onnx", work / "out" / "link.onnx")
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
