"""What a new input shape costs an onnxruntime session on the CUDA provider, by cuDNN search mode.

    python bench/shape_costs.py MODEL.onnx      # a 224x224 RGB network with a dynamic batch axis, input "x"

For each mode, a fresh session runs batches of 32, 32, 19, 19, 5, 5, 32, 1, 1 images, and each
run's time is printed (two rounds): a run at the shape of the run before shows a run's own
cost, a run at a new shape adds the kernel choice. Results: bench/results/2026-11-22-scale-cost-cuda.md.
"""

import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

MODES = {
    "HEURISTIC": {"cudnn_conv_algo_search": "HEURISTIC"},  # onnxprune's working sessions
    "HEURISTIC, no max workspace": {"cudnn_conv_algo_search": "HEURISTIC", "cudnn_conv_use_max_workspace": "0"},
    "DEFAULT": {"cudnn_conv_algo_search": "DEFAULT"},
    "EXHAUSTIVE": {},  # onnxruntime's default: latency measurement, deployments
}
SEQUENCE = (32, 32, 19, 19, 5, 5, 32, 1, 1)


def main() -> None:
    model = onnx.load(sys.argv[1]).SerializeToString()
    x = np.random.default_rng(0).random((max(SEQUENCE), 3, 224, 224), dtype=np.float32)
    for _ in range(2):
        for label, options in MODES.items():
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            start = time.perf_counter()
            sess = ort.InferenceSession(model, opts, providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"])
            made = time.perf_counter() - start
            if sess.get_providers()[0] != "CUDAExecutionProvider":
                sys.exit("shape_costs.py: onnxruntime's CUDA provider did not start; these timings need it")
            times = []
            for n in SEQUENCE:
                start = time.perf_counter()
                sess.run(None, {"x": x[:n]})
                times.append(time.perf_counter() - start)
            runs = " ".join(f"{n}:{1e3 * t:.0f}" for n, t in zip(SEQUENCE, times))
            print(f"{label:28s} created in {made:.2f} s; runs (images:ms) {runs}", flush=True)


if __name__ == "__main__":
    main()
