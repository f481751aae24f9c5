"""Where a model's time goes in onnxruntime, node by node, against a pruned version of it.

    python bench/node_profile.py MODEL.onnx PRUNED.onnx [--batch 128] [--runs 30] [--name node-profile]

onnxruntime's profiler times every node of the graph it optimised (on x86 its NCHWc
convolutions, named after the tensors they write, and the layout conversions it inserts,
ReorderInput/ReorderOutput). This runs both models on the CPU provider (thread spinning off,
as onnxprune times them) with profiling on, after 5 unprofiled warm-up runs, and writes the
mean time per run by op type and by node: which cuts bought time and what the pruned model
added. The profiler's own cost makes the totals a little larger than a plain timing.
Writes bench/results/DATE-NAME.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort

from run_bench import HERE, machine_text


def node_times(path: str, batch: int, runs: int):
    """(microseconds per run by op type, by node name) of ``path`` at ``batch`` random inputs."""
    folder = tempfile.mkdtemp(prefix="node-profile-")
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(folder, "profile")
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) else 1 for d in first.shape[1:]]
    feed = {first.name: np.random.default_rng(0).random(shape, dtype=np.float32)}
    for _ in range(5):
        session.run(None, feed)
    os.remove(session.end_profiling())
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    trace = session.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    os.rmdir(folder)
    by_op, by_node = collections.defaultdict(float), collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / runs
            by_node[e["name"][: -len("_kernel_time")]] += e["dur"] / runs
    return by_op, by_node


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("pruned")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--name", default="node-profile")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    ops0, nodes0 = node_times(args.model, args.batch, args.runs)
    ops1, nodes1 = node_times(args.pruned, args.batch, args.runs)
    lines = [f"# Node times in onnxruntime, {datetime.date.today()}", "",
             f"Machine: {machine_text()}; onnxruntime {ort.__version__}, CPU provider. Command: "
             f"`python bench/node_profile.py {args.model} {args.pruned} --batch {args.batch} --runs {args.runs}`", "",
             f"Mean microseconds per run at batch {args.batch} over {args.runs} profiled runs.", "",
             "| op type | original | pruned |", "| --- | --- | --- |"]
    for op in sorted(set(ops0) | set(ops1), key=lambda k: -max(ops0.get(k, 0), ops1.get(k, 0))):
        lines.append(f"| {op} | {ops0.get(op, 0):.0f} | {ops1.get(op, 0):.0f} |")
    lines.append(f"| total | {sum(ops0.values()):.0f} | {sum(ops1.values()):.0f} |")
    lines += ["", "| node (onnxruntime's name) | original | pruned |", "| --- | --- | --- |"]
    for node in sorted(set(nodes0) | set(nodes1), key=lambda k: -max(nodes0.get(k, 0), nodes1.get(k, 0))):
        lines.append(f"| `{node}` | {nodes0.get(node, 0):.0f} | {nodes1.get(node, 0):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{datetime.date.today()}-{args.name}.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
