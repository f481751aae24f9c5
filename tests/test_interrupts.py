"""Interruptions and determinism: nothing half-written, the same run gives the same bytes."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from onnxprune.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "fmnist_resnet.onnx")
CALIB = os.path.join(ROOT, "models", "fmnist_resnet_calib")


def _cli(*args):
    return [sys.executable, "-m", "onnxprune", *args]


def test_same_inputs_and_seed_give_identical_bytes(tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.onnx"
        result = subprocess.run(_cli(MODEL, str(out), "--calib", CALIB, "--flops", "0.5", "--max-images", "64",
                                     "--seed", "3"), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_calibration_leaves_nothing(tmp_path, sig, code, word):
    # enough images that calibration and refit take several seconds
    x = np.random.default_rng(0).random((3000, 1, 28, 28), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(_cli(MODEL, str(out_dir / "o.onnx"), "--calib", str(tmp_path / "x.npy"), "--flops", "0.5",
                                 "--max-images", "3000", "--batch-size", "8"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the progress labels say when calibration has begun
        seen.append(line)
        if line.startswith("calibrating"):
            break
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    err = "".join(seen) + err
    assert proc.returncode == code, err
    assert word in err and "Traceback" not in err
    assert os.listdir(out_dir) == []
    assert np.array_equal(np.load(tmp_path / "x.npy"), x)


# Runs the command line with a real signal sent to itself at the n-th call of os.fsync or
# os.replace on a file in the output's folder: the moments when the output files are being
# written or renamed into place. (Other calls, such as Python's own when it writes a
# module's bytecode cache, do not count.)
DRIVER = """
import os, signal, sys
import onnxprune.cli
what, nth, folder = sys.argv[1], int(sys.argv[2]), os.path.dirname(os.path.abspath(sys.argv[4]))
real = getattr(os, what)
calls = []
def hooked(*args):
    path = os.readlink(f"/proc/self/fd/{args[0]}") if what == "fsync" else os.fspath(args[1])
    if os.path.dirname(os.path.abspath(path)) == folder:
        calls.append(path)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)
setattr(os, what, hooked)
sys.exit(onnxprune.cli.run(sys.argv[3:]))
"""

FAST = ["--flops", "0.4", "--criterion", "l1", "--no-recover", "--no-latency", "--max-images", "16"]


def _model_with_external_data(folder):
    import onnx
    import tiny

    tiny.save_with_external_data(onnx.load(MODEL), folder / "ext.onnx")
    return folder / "ext.onnx"


@pytest.mark.parametrize("external, nth", [(False, 1), (True, 1), (True, 2)])
def test_sigterm_while_writing_leaves_no_partial_file(tmp_path, external, nth):
    """Killed while the model (or its data file, then its header) is being written: exit 143,
    no temporary file left, and the earlier OUT and OUT.data still whole."""
    src = _model_with_external_data(tmp_path) if external else MODEL
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "o.onnx").write_bytes(b"previous model")
    (out_dir / "o.onnx.data").write_bytes(b"previous data")
    result = subprocess.run([sys.executable, "-c", DRIVER, "fsync", str(nth), str(src), str(out_dir / "o.onnx"),
                             "--calib", CALIB, *FAST], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 143, result.stderr
    assert "terminated" in result.stderr and "Traceback" not in result.stderr
    assert sorted(os.listdir(out_dir)) == ["o.onnx", "o.onnx.data"]
    assert (out_dir / "o.onnx").read_bytes() == b"previous model"
    assert (out_dir / "o.onnx.data").read_bytes() == b"previous data"


def test_signal_during_the_renames_waits_until_the_pair_is_whole(tmp_path):
    """SIGTERM at the first rename of a model and its data: it is held until the second, so
    OUT and OUT.data are never from different runs; the run still reports the signal."""
    import onnx
    import onnxruntime as ort

    src = _model_with_external_data(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "o.onnx").write_bytes(b"previous model")
    result = subprocess.run([sys.executable, "-c", DRIVER, "replace", "1", str(src), str(out_dir / "o.onnx"),
                             "--calib", CALIB, *FAST], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 143, result.stderr
    assert sorted(os.listdir(out_dir)) == ["o.onnx", "o.onnx.data"], result.stderr
    onnx.checker.check_model(str(out_dir / "o.onnx"), full_check=True)
    sess = ort.InferenceSession(str(out_dir / "o.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((1, 1, 28, 28), np.float32)})[0].shape == (1, 10)


def test_external_data_output_is_deterministic_and_beside_the_model(tmp_path):
    src = _model_with_external_data(tmp_path)
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.onnx"
        assert run([str(src), str(out), "--calib", CALIB, "--seed", "3", "--flops", "0.5", "--max-images", "32",
                    "--no-latency"]) == 0
        outs.append((out.read_bytes(), (tmp_path / f"o{i}.onnx.data").read_bytes()))
    assert outs[0][1] == outs[1][1]
    # the headers differ only in the data file's name
    assert outs[0][0].replace(b"o0.onnx.data", b"o1.onnx.data") == outs[1][0]


def test_interrupt_while_writing_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "o.onnx").write_bytes(b"previous model")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    code = run([MODEL, str(out_dir / "o.onnx"), "--calib", CALIB, "--flops", "0.3", "--max-images", "32"])
    assert code == 130
    # the earlier file is replaced only whole: here not at all
    assert os.listdir(out_dir) == ["o.onnx"] and (out_dir / "o.onnx").read_bytes() == b"previous model"


def test_the_command_line_starts_before_the_heavy_imports():
    # numpy, onnx and onnxruntime load inside the command's error handling: a Ctrl-C while they
    # load (the first half second) ends in "onnxprune: interrupted" and exit 130, not a traceback
    code = "import sys, onnxprune.cli; print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
