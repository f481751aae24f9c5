"""Measured onnxruntime speed of pruned models against --round-to, to choose its default.

    python bench/speed.py [--models ...] [--ratio 0.5] [--round-to 1,4,8,16] [--latency-aware]
                          [--latency-target R] [--plan GROUP=N,...] [--repeat 1] [--name speed]
                          [--device cpu|cuda]

For every model and rounding: the pruned model's FLOPs reduction, the reduction of the
convolution MACs onnxruntime's CPU kernels run (onnxprune.kernels: channel counts padded to
their blocks; "-" on CUDA), accuracy on the full test split and latency before/after at each of --batches (median over fresh interleaved
sessions, as the report measures it; with --repeat N, the median of N such measurements).
--latency-aware adds, for every rounding, the run whose allocation prices each step by
the latency it saves. --latency-target R prunes with --latency R instead of --flops (the
share of measured latency at batch 32 to remove; 0.375 asks for 1.6x). --plan replaces the
allocation by a plan written by hand, to time channel counts the allocation did not choose:
each GROUP=N keeps N channels (the best-ranked) of every group whose name, as the report
prints it, contains GROUP; every other group stays whole, and the FLOPs removed are what the
plan gives, not the target. --device cuda prunes (calibration included) and times on the CUDA
provider; the default is the CPU provider whatever the machine has. Writes
bench/results/DATE-NAME.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os

import numpy as np
import onnxruntime as ort

from kernel_shapes import model_kernels
from run_bench import HERE, MODELS, accuracy, machine_text

import onnxprune  # noqa: E402  (run_bench put the repository on sys.path)
from onnxprune.runtime import choose_providers  # noqa: E402


def _median_latency(model_path, result, calib, repeat, batches, providers):
    """Per batch size, the median over ``repeat`` measurements like the report's."""
    import onnx
    from onnxprune import latency
    from onnxprune.data import input_spec, load_calibration

    original = onnx.load(model_path)
    opts = onnxprune.PruneOptions(flops=0.5)
    cal = load_calibration(calib, input_spec(original, opts), opts)
    sample = next(cal.batches(cal.fit[:1]))[0]
    runs = [latency.measure(original, result.model, cal.spec.name, sample, batches, providers)
            for _ in range(max(1, repeat))]
    out = []
    for i, batch in enumerate(batches):
        before = float(np.median([r[i].before_ms for r in runs]))
        after = float(np.median([r[i].after_ms for r in runs]))
        out.append(dict(batch=batch, before_ms=before, after_ms=after))
    return out


@functools.lru_cache(maxsize=None)
def _original_kernels(model_path, providers):
    return model_kernels(model_path, providers)


def _kernels_reduction(model_path, pruned, providers) -> str:
    """The share of the original's convolution MACs that onnxruntime's CPU kernels no longer run."""
    was = _original_kernels(model_path, tuple(providers))  # the same for every row of a model
    return "-" if was is None else f"{1 - model_kernels(pruned, providers).executed / was.executed:.1%}"


def _parse_plan(text):
    plan = {}
    for item in text.split(","):
        group, _, count = item.rpartition("=")
        plan[group.strip()] = int(count)
    return plan


@contextlib.contextmanager
def _forced_plan(plan):
    """onnxprune's allocation replaced by ``plan`` (see --plan) for the conversions made inside."""
    from onnxprune import allocate as alloc_mod
    from onnxprune import api

    def forced(analysis, ranked, flops, min_keep, round_to, mode="uniform", loss=None, **kw):
        ranked, essential = alloc_mod.essentials_first(analysis, ranked)
        planner = alloc_mod._Planner(analysis, ranked, min_keep, round_to, essential, None, kw.get("narrow_unit", 0))
        kept = dict(planner.size)
        matched = set()
        for g in analysis.groups:
            for part, count in plan.items():
                if g.index in kept and part in g.name:
                    kept[g.index] = count
                    matched.add(part)
        missing = set(plan) - matched
        if missing:
            raise SystemExit(f"--plan: no prunable group's name contains {sorted(missing)}")
        before = planner.model.macs(np.ones(analysis.num_players, dtype=bool))
        return alloc_mod.Allocation(planner.mask(kept), kept, before, planner.macs(kept), int(before * (1 - flops)))

    saved = api.allocate
    api.allocate = forced
    try:
        yield
    finally:
        api.allocate = saved


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--round-to", default="1,4,8,16")
    p.add_argument("--latency-aware", action="store_true")
    p.add_argument("--latency-target", type=float, default=None, help="prune with --latency R instead of --flops")
    p.add_argument("--plan", default=None, help="GROUP=N,...: channels kept per group, instead of the allocation")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--batches", default="1,32", help="batch sizes timed")
    p.add_argument("--name", default="speed")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    providers, provider_text = choose_providers(args.device)
    lines = ["| model | round-to | target | FLOPs removed | conv MACs run removed | accuracy (base) | " +
             " | ".join(f"batch {b} ms before -> after | speedup" for b in batches) + " |",
             "| --- | --- | --- | --- | --- | --- | " + " | ".join("--- | ---" for _ in batches) + " |"]
    for name in args.models.split(","):
        model_path, calib, (x, y) = MODELS[name]()
        base = accuracy(model_path, x, y)
        for rt in (None if v == "auto" else int(v) for v in args.round_to.split(",")):
            for aware in ((False, True) if args.latency_aware else (False,)):
                target = (dict(latency_target=args.latency_target) if args.latency_target
                          else dict(flops=args.ratio, latency_aware=aware))
                with _forced_plan(_parse_plan(args.plan)) if args.plan else contextlib.nullcontext():
                    r = onnxprune.prune(model_path, calib, onnxprune.PruneOptions(round_to=rt, latency=False,
                                                                                 device=args.device, **target))
                acc = accuracy(r.model, x, y)
                run = _kernels_reduction(model_path, r.model, providers)
                timed = _median_latency(model_path, r, calib, args.repeat, batches, providers)
                priced = (f"--latency {args.latency_target}" if args.latency_target else
                          f"--flops {args.ratio}" + (", steps priced by latency" if aware else ""))
                if args.plan:
                    priced = f"plan by hand: {args.plan}"
                rounding = "none (the plan's counts)" if args.plan else rt or "default: " + r.report.rounding
                row = (f"| {name} | {rounding} | {priced} | "
                       f"{r.report.flops_reduction:.1%} | {run} | {acc:.2%} ({base:.2%}) | " +
                       " | ".join(f"{t['before_ms']:.3f} -> {t['after_ms']:.3f} | {t['before_ms'] / t['after_ms']:.2f}x"
                                  for t in timed) + " |")
                print(row, flush=True)
                lines.append(row)
    stamp = datetime.date.today().isoformat()
    machine = machine_text(args.device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{stamp}-{args.name}.md")
    with open(path, "w") as f:
        f.write(f"# Speed against --round-to, {stamp}\n\nMachine: {machine}; onnxruntime {ort.__version__}, "
                f"{provider_text}. Command: `python bench/speed.py --models {args.models} --ratio {args.ratio} "
                f"--round-to {args.round_to}{' --latency-aware' if args.latency_aware else ''}"
                f"{f' --latency-target {args.latency_target}' if args.latency_target else ''}"
                f"{f' --plan {args.plan}' if args.plan else ''} --repeat {args.repeat} "
                f"--batches {args.batches}{' --device cuda' if args.device == 'cuda' else ''}`"
                "\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
