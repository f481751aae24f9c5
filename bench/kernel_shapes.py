"""The convolutions onnxruntime's CPU provider actually runs, against the ones a model holds.

    python bench/kernel_shapes.py MODEL.onnx [PRUNED.onnx ...] [--name kernel-shapes]

onnxruntime rewrites a model's convolutions for its NCHWc layout (x86, graph optimisation
level "all", as onnxprune times models) and in doing so can pad their channel counts: the
layout stores channels in blocks of the vector width (16 floats with AVX-512). This script
reads onnxruntime's optimised graph of each model (onnxprune.kernels, which the report's
"CPU kernels" line comes from) and prints, per convolution, the weight shape the model holds and the
one onnxruntime runs, and in total the multiply-accumulates counted (onnxprune's count, of
the model's own shapes) and executed (the same spatial sizes, the executed channel counts).
For a pruned model it also gives both reductions against the first model: how much of the
counted FLOPs reduction the kernels can turn into speed at most. Writes
bench/results/DATE-NAME.md.
"""

from __future__ import annotations

import argparse
import datetime
import os

import onnx
import onnxruntime as ort

from run_bench import HERE, machine_text

from onnxprune.kernels import conv_kernels  # noqa: E402  (run_bench put the repository on sys.path)


def model_kernels(model, providers=("CPUExecutionProvider",)):
    """onnxprune.kernels.conv_kernels of a model (or a model file) at batch 1 of its first
    input's own shape; None off the CPU provider."""
    model = onnx.load(model) if isinstance(model, str) else model
    x = model.graph.input[0]
    shape = (1,) + tuple(d.dim_value for d in x.type.tensor_type.shape.dim[1:])
    return conv_kernels(model, {x.name: shape}, list(providers))


def kernel_table(path: str):
    """Rows (node name, held dims, run dims, counted MACs, executed MACs) per Conv of ``path``, at batch 1."""
    return [(c.name, c.held, c.run, c.counted, c.executed) for c in model_kernels(path).convs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--name", default="kernel-shapes")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    lines, totals = [], []
    for path in args.models:
        rows = kernel_table(path)
        counted, executed = sum(r[3] for r in rows), sum(r[4] for r in rows)
        totals.append((path, counted, executed))
        lines += [f"### {os.path.basename(path)}", "",
                  f"Conv MACs per sample: counted {counted / 1e6:.2f} M, executed {executed / 1e6:.2f} M "
                  f"({executed / counted:.2f}x)", "",
                  "| conv | weights held | weights run | counted MMACs | executed MMACs |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {n} | {'x'.join(map(str, w))} | {'x'.join(map(str, wr)) if wr else '?'} | {c / 1e6:.3f} | "
                  f"{e / 1e6:.3f} |" for n, w, wr, c, e in rows]
        lines.append("")
    base = totals[0]
    summary = ["| model | Conv MACs counted | executed | counted reduction | executed reduction |",
               "| --- | --- | --- | --- | --- |"]
    for path, c, e in totals:
        summary.append(f"| {os.path.basename(path)} | {c / 1e6:.2f} M | {e / 1e6:.2f} M | {1 - c / base[1]:.1%} | "
                       f"{1 - e / base[2]:.1%} |")
    text = "\n".join(summary + [""] + lines)
    print(text)
    stamp = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, f"{stamp}-{args.name}.md")
    with open(out, "w") as f:
        f.write(f"# The convolutions onnxruntime runs, {stamp}\n\nMachine: {machine_text()}; onnxruntime "
                f"{ort.__version__}, CPU provider. Command: `python bench/kernel_shapes.py "
                f"{' '.join(args.models)}`\n\n{text}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
