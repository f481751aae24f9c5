"""Interruptions and determinism: nothing half-written, the same run gives the same bytes."""

import os
import signal
import subprocess
import sys

import numpy as np

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


def test_sigterm_during_calibration_leaves_nothing(tmp_path):
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
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    err = "".join(seen) + err
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert os.listdir(out_dir) == []


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
