"""The Python API: ``prune(model, calib, options)``. The CLI is a thin layer over it."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from . import weights
from .allocate import Allocation, allocate
from .analyse import Analysis, analyse
from .calibrate import ChannelStats, collect_stats
from .data import CalibrationSet, as_samples, input_spec, load_calibration
from .errors import InputError, TargetError, UsageError
from .flops import count_macs, count_params
from .kernels import conv_kernels
from . import latency
from .load import default_opset, load_model
from .options import PruneOptions
from .prepare import prepare
from .progress import Progress, silent
from .report import BlockedRow, GroupRow, Report
from .rewrite import rewrite
from .save import TWO_GB, save_atomic
from .runtime import blas_single_thread, choose_providers, kernel_channel_block
from .consumers import find_consumers, flatten_repeat
from .recover import recover, refit_sequential
from .score import NEEDS_STATS, score_players
from .snpfi import loss_curve, group_games, refit_games
from .bottleneck import GateSettings, learn_gates
from .drift import correct_drift
from .output_payoff import output_games
from .shapes import static_shapes
from .verify import accuracy, check_graph, fidelity

ModelSource = Union[str, os.PathLike, onnx.ModelProto]
CalibSource = Union[str, os.PathLike, np.ndarray]
Labelled = Tuple[np.ndarray, np.ndarray]


class PruneResult:
    """The pruned model and what was done.

    Its large weights stay in the run's weight store: :meth:`save` streams them to disk
    (with external data where the input had it or the model is over 2 GB), and ``model``
    is a self-contained ModelProto, built on first use (a copy of every weight; not
    possible for a model over 2 GB, which must be saved instead).
    """

    def __init__(self, model: onnx.ModelProto, report: Report, store: Optional[weights.WeightStore] = None,
                 external_data: bool = False, input_files: Tuple[str, ...] = ()):
        self.report = report
        self.external_data = external_data
        self.input_files = input_files
        self._header = model
        self._store = store
        self._model: Optional[onnx.ModelProto] = None

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            if self._store is None:
                self._model = self._header
            else:
                if self._header.ByteSize() + weights.stored_bytes(self._header) > TWO_GB:
                    raise UsageError("the pruned model is over 2 GB and cannot be one ModelProto: "
                                     "use PruneResult.save(path), which writes its weights to external data")
                with weights.activate(self._store):
                    self._model = weights.materialize(self._header)
        return self._model

    def save(self, path: str, external_data: Optional[bool] = None) -> int:
        """Write the model atomically to ``path`` (and ``path``.data when its weights go to
        external data: by default where the input had external data or the model is over
        2 GB). Never over the input's files. Returns the bytes written."""
        external = self.external_data if external_data is None else external_data
        if self._store is None:
            return save_atomic(self._header, path, external, protect=self.input_files)
        with weights.activate(self._store):
            return save_atomic(self._header, path, external, protect=self.input_files)


def load_labelled(path: str) -> Labelled:
    """A labelled test set for --eval: an .npz with arrays ``x`` (preprocessed float inputs) and ``y``
    (class ids, or one-hot rows)."""
    try:
        data = np.load(path, allow_pickle=False)
        x, y = data["x"], data["y"]
    except Exception as e:
        raise InputError(f"cannot read labelled data {path!r}: expected an .npz with arrays 'x' and 'y'") from e
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"labelled data {path!r}: 'x' and 'y' must have the same, non-zero length")
    if not np.issubdtype(x.dtype, np.floating):
        # as for calibration arrays: raw 8-bit pixels would be fed unscaled
        raise InputError(f"labelled data {path!r}: 'x' is {x.dtype}; give preprocessed float inputs, "
                         "as the model takes them")
    if not np.isfinite(x).all():  # a NaN row scores class 0 and could count as right
        raise InputError(f"labelled data {path!r}: 'x' contains NaN or infinite values")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]  # a column of class ids
    elif y.ndim == 2 and np.issubdtype(y.dtype, np.number):
        y = y.argmax(axis=1)  # one-hot (or per-class scores) rows
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or
                           (np.issubdtype(y.dtype, np.floating) and np.array_equal(y, np.round(y)))):
        raise InputError(f"labelled data {path!r}: 'y' must hold integer class ids (or one-hot rows), "
                         f"got {y.dtype} of shape {y.shape}")
    if y.min() < 0:
        raise InputError(f"labelled data {path!r}: 'y' holds negative class ids")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


# notes about the refit, dropped where the refit is not written
REFIT_NOTES = ("ill-conditioned refit, ",
               "no refit for these layers (grouped convs, a weight the op rules cannot read, or a MatMul whose "
               "input is not (rows, features)), left as sliced: ",
               "refit not solved (ill-conditioned, or a layer shape the fit does not handle), left as sliced: ")


def prune(model: ModelSource, calib: CalibSource, options: Optional[PruneOptions] = None, *,
          evaluate: Optional[Labelled] = None, progress: Progress = silent, log=lambda line: None) -> PruneResult:
    """Prune ``model`` so that it loses ``options.flops`` of its FLOPs.

    ``calib`` is a folder of images, a .npy/.npz path, or an array of
    preprocessed inputs. ``evaluate`` is an optional (x, y) labelled set on
    which accuracy before and after is measured. ``log`` receives one-line
    status messages. The input model is never modified.
    """
    opts = (options or PruneOptions()).validate()
    results = []
    _convert(model, calib, opts, [opts.flops], evaluate, progress, log, lambda target, result: results.append(result),
             errors_to_caller=False)
    return results[0]


def prune_each(model: ModelSource, calib: CalibSource, targets: Sequence[float], on_result,
               options: Optional[PruneOptions] = None, *, evaluate: Optional[Labelled] = None,
               progress: Progress = silent, log=lambda line: None, before_each=lambda target: None) -> None:
    """Prune ``model`` at each FLOPs target in turn (a sweep), loading, analysing, calibrating
    and scoring it once: none of that depends on the target. ``on_result(target, result)``
    gets each target's PruneResult as it is made, or the TargetError that says the target
    cannot be met. A result's weights are released when the next target's conversion starts:
    save it in the call. Bad input raises as :func:`prune` does.

    Each result is the model :func:`prune` makes at that target, bit for bit; its report's
    times are its own, and the shared stages' are in the first target's. ``before_each(target)``
    is called as each target's own work starts."""
    opts = options or PruneOptions()
    if opts.latency_target is not None:
        raise UsageError("a sweep takes FLOPs targets; it does not combine with a latency target")
    if not len(targets):
        raise UsageError("a sweep needs at least one FLOPs target")
    for target in targets:  # every target checked before any work
        opts.replace(flops=target).validate()
    opts = opts.replace(flops=targets[0])
    _convert(model, calib, opts, list(targets), evaluate, progress, log, on_result, errors_to_caller=True,
             before_each=before_each)


def _convert(model, calib, opts: PruneOptions, targets, evaluate, progress, log, on_result, errors_to_caller: bool,
             before_each=lambda target: None):
    store = weights.WeightStore()
    with blas_single_thread(), weights.activate(store):
        try:
            run = _begin(model, calib, opts, evaluate, progress, log, store)
        except TargetError as e:  # no group can be pruned: no target can be met
            if not errors_to_caller:
                raise
            for target in targets:
                on_result(target, e)
            return
        for i, target in enumerate(targets):
            last = i == len(targets) - 1
            # the previous target's weights go; the reference's stay while targets remain
            store.retain([run.original, run.prepared])
            before_each(target)
            try:
                at = opts.replace(flops=target)
                result = _at_target(run, at, progress, first=i == 0)
                if result.report.refit_rejected:
                    result = _slicing_instead(run, result, at, progress)
            except TargetError as e:
                if not errors_to_caller:
                    raise
                on_result(target, e)
                continue
            # the original's weights go with the last target; the result keeps its own
            store.retain([result._header] + ([] if last else [run.original, run.prepared]))
            on_result(target, result)


def _slicing_instead(run: "_Run", rejected: PruneResult, opts: PruneOptions, progress) -> PruneResult:
    """The refit did worse on the held-out images than its channels merely sliced. Channels
    chosen as --no-recover chooses them (for slicing) may do better still: that conversion is
    run too (from the same calibration) and returned where its held-out error is lower and it
    prunes at least as far toward the target. Not with --latency: that run would steer again on
    fresh timings, and errors of differently fast models do not compare."""
    if opts.latency_target is not None:
        return rejected
    plain = _at_target(run, opts.replace(recover=False), progress, first=False)
    mine, theirs = rejected.report, plain.report
    as_far = theirs.flops_reduction >= min(mine.flops_reduction, opts.flops)
    if theirs.fidelity_relative_error >= mine.fidelity_relative_error or not as_far:
        mine.notes.append(f"channels chosen as --no-recover chooses them did no better on the held-out images "
                          f"({theirs.fidelity_relative_error:.4f}, -{theirs.flops_reduction:.1%} FLOPs)")
        return rejected
    theirs.recovery = theirs.refit_rejected = True
    theirs.fidelity_rejected_refit = mine.fidelity_rejected_refit
    theirs.accuracy_rejected_refit = mine.accuracy_rejected_refit
    theirs.notes = [n for n in mine.notes if n.startswith("the refit made")] + [
        f"channels chosen as --no-recover chooses them did better still on the held-out images "
        f"({theirs.fidelity_relative_error:.4f}): that model is written, channels and all"] + [
        n for n in theirs.notes if n != SHARED_NOTE]
    # the conversion made both models: its time is both's
    theirs.seconds = {k: mine.seconds.get(k, 0.0) + theirs.seconds.get(k, 0.0)
                      for k in dict.fromkeys(list(mine.seconds) + list(theirs.seconds))}
    theirs.wall_seconds = (mine.wall_seconds or 0.0) + (theirs.wall_seconds or 0.0)
    return plain


SHARED_NOTE = "loading, analysis, calibration and scoring were shared with the first target and are not in this time"


@dataclasses.dataclass
class _Run:
    """What a conversion computes before the target enters, shared by the targets of a sweep."""
    loaded: object
    original: onnx.ModelProto
    prepared: onnx.ModelProto
    reference: onnx.ModelProto  # fidelity, accuracy and latency are measured against it
    prep_log: object
    cal: CalibrationSet
    providers: List[str]
    provider_text: str
    roundings: List[Tuple[int, int]]
    input_shapes: dict
    shapes: dict
    types: dict  # each tensor's element type, from the same inference as ``shapes``
    params_before: int
    macs_before: int
    evaluate: Optional[Labelled]  # the labelled set, and the original's accuracy on it
    accuracy_before: Optional[float]
    stats: Optional[ChannelStats]
    store: weights.WeightStore
    seconds: dict
    wall_seconds: float
    analysis: Optional[Analysis]  # the first target's; rewriting edits it, so the others analyse afresh
    scored: dict = dataclasses.field(default_factory=dict)  # scoring options -> _Scored
    kernels_before: object = None  # the prepared model's convolutions as onnxruntime runs them, once read

    def take_analysis(self, opts: PruneOptions) -> Analysis:
        analysis, self.analysis = self.analysis, None
        return analysis if analysis is not None else _analysis_of(self.prepared, self.shapes, opts)


class _Scored(NamedTuple):
    ranked: dict
    loss: dict
    importance: dict
    sampled: object  # the output payoff's games (None for other payoffs)
    timed: object  # the per-layer latency model (None unless --latency or --latency-aware)


def _begin(model, calib, opts: PruneOptions, evaluate, progress, log, store: weights.WeightStore) -> _Run:
    """Load, prepare and analyse the model, measure the original's accuracy, and calibrate."""
    seconds = {}
    t = start = time.perf_counter()
    loaded = load_model(model)
    original = loaded.model
    spec = input_spec(original, opts, calib)
    if opts.payoff == "output" and spec.fixed_batch:
        raise UsageError("--payoff output runs many coalitions in one batch: it needs a model whose batch "
                         "axis is dynamic")
    cal = load_calibration(calib, spec, opts)
    providers, provider_text = choose_providers(opts.device)
    log(f"onnxruntime provider: {provider_text}")
    roundings = _roundings(opts, providers)
    input_shapes = {spec.name: (1,) + cal.sample_shape}
    params_before = count_params(original)
    # A large model keeps one copy of its weights: the prepared model (which computes the
    # same) replaces the original as the reference, and a weight a BatchNorm fold changes
    # is released as soon as its folded copy exists.
    prepared, prep_log = prepare(original, release=store.lean)
    reference = original
    if store.lean:
        store.retain([prepared])
        reference = prepared
    # the original's accuracy first: labels the model cannot score fail before any work
    accuracy_before = None
    if evaluate is not None:
        evaluate = (as_samples(evaluate[0], spec, "'x' of the labelled data"), evaluate[1])
        t_eval = time.perf_counter()
        accuracy_before = accuracy(reference, *evaluate, providers)
        seconds["evaluate"] = time.perf_counter() - t_eval
        t += seconds["evaluate"]  # timed as its own stage, not as loading
    # counted on the prepared model, the same network with its shape arithmetic folded: shape
    # inference can lose the shapes behind a run-time Slice or Reshape of the original, and
    # layers of unknown shape count no MACs
    types: dict = {}
    shapes = static_shapes(prepared, input_shapes, types)
    macs_before = count_macs(prepared, input_shapes, shapes)
    if opts.criterion == "bn-scale" and opts.method == "snpfi" and not prep_log.bn_scale:
        raise UsageError("--criterion bn-scale needs BatchNormalization after the convolutions; "
                         "this model has none (or they were folded before export)")
    analysis = _analysis_of(prepared, shapes, opts)
    seconds["load_prepare_analyse"] = time.perf_counter() - t
    if not analysis.prunable_groups():
        # quote the blocked group that holds the most FLOPs, not the image input's channels
        share = analysis.group_macs()
        blocked = [g for g in analysis.groups if g.reasons and not all("(input)" in r for r in g.reasons)]
        blocked.sort(key=lambda g: -share.get(g.index, 0))
        reason = next((r for r in blocked[0].reasons if "(input)" not in r), blocked[0].reasons[0]) if blocked else "none found"
        raise TargetError(f"no channel group of this model can be pruned; the largest is blocked by {reason} "
                          "(onnxprune IN --analyze lists them all)")

    stats = None
    if opts.criterion in NEEDS_STATS or opts.recover or opts.method == "bottleneck":
        t = time.perf_counter()
        wanted = {c.tensor: c.repeat for c in find_consumers(analysis)}
        stats = collect_stats(prepared, wanted, cal, cal.fit, providers, progress,
                              absolute=opts.criterion == "activation")
        seconds["calibrate"] = time.perf_counter() - t
    return _Run(loaded, original, prepared, reference, prep_log, cal, providers, provider_text, roundings,
                input_shapes, shapes, types, params_before, macs_before, evaluate, accuracy_before, stats, store, seconds,
                time.perf_counter() - start, analysis)


def _score(run: _Run, analysis: Analysis, opts: PruneOptions, progress, narrow: int, seconds: dict) -> _Scored:
    """Rank each group's channels (and time the layers where the allocation needs it): the
    same for every FLOPs target."""
    sampled = timed = None
    if opts.criterion == "snpfi" and opts.payoff == "output":
        with progress("sampling the output payoff", len(analysis.prunable_groups())) as update:
            sampled = output_games(run.prepared, analysis, run.cal, run.providers, centred=opts.recover,
                                   budget=opts.budget, seed=opts.seed, progress=lambda n: update, types=run.types)
        ranked, loss, importance = _from_games(sampled.games)
    else:
        with progress("scoring channels", 1) as update:
            ranked, loss, importance = _rank(analysis, opts, run.stats, run.prep_log.bn_scale)
            update(1)
    if opts.latency_target is not None or opts.latency_aware:
        t_lat = time.perf_counter()
        timed = _latency_model(analysis, run.prepared, run.cal, opts, run.providers, progress, narrow)
        seconds["latency_model"] = time.perf_counter() - t_lat
    return _Scored(ranked, loss, importance, sampled, timed)


def _at_target(run: _Run, opts: PruneOptions, progress, first: bool) -> PruneResult:
    """Allocate, rewrite, refit and verify at ``opts.flops`` (or ``opts.latency_target``).
    ``first``: the run's first target, whose time includes the shared stages'."""
    seconds = dict(run.seconds) if first else {}
    start = time.perf_counter()
    original, prepared, reference, prep_log = run.original, run.prepared, run.reference, run.prep_log
    cal, providers, shapes, roundings, stats = run.cal, run.providers, run.shapes, run.roundings, run.stats
    spec, store = cal.spec, run.store
    opts = opts.replace(round_to=roundings[0][0])
    narrow = roundings[0][1]  # the rounding's unit in groups under two blocks (0: none)
    analysis = run.take_analysis(opts)
    t = time.perf_counter()
    gated = sampled = cost_model = None
    steered = []  # --latency: [asked share of the model, measured reduction] per allocation timed
    if opts.method == "bottleneck":
        with progress("learning gates", 1) as update:
            ranked, loss, importance, gated = _gate(analysis, opts, stats)
            update(1)
        alloc, opts, narrow = _allocate_rounded(roundings, opts, opts.flops, lambda r, u, last: allocate(
            analysis, ranked, opts.flops, opts.min_keep, r, "threshold", loss, gates=gated.logits,
            narrow_unit=u))
    else:
        key = repr(opts.replace(flops=None))
        if key not in run.scored:
            run.scored[key] = _score(run, analysis, opts, progress, narrow, seconds)
        ranked, loss, importance, sampled, timed = run.scored[key]
        rank_model, share = None, opts.flops
        if opts.latency_target is not None:
            cost_model, share = timed, opts.latency_target
        elif opts.latency_aware:
            rank_model = timed

        def allocate_at(share, opts=opts):
            return _allocate_rounded(roundings, opts, share, lambda r, u, last: allocate(
                analysis, ranked, share, opts.min_keep, r, opts.allocation, loss, cost_model=cost_model,
                rank_model=rank_model, narrow_unit=u, exhaustive=last))

        if opts.latency_target is not None:
            t_steer = time.perf_counter()
            with progress("measuring latency of candidate allocations", 1) as update:
                batch = cal.spec.fixed_batch or opts.latency_batch

                def measured_reduction(keep):
                    lat = latency.measure(prepared, _trial_model(prepared, shapes, opts, keep), spec.name,
                                          cal.first_sample(), [batch], providers)[0]
                    return 1.0 - lat.after_ms / lat.before_ms

                (alloc, opts, narrow), steered = steer_to_measured_latency(
                    allocate_at, opts.latency_target, measured_reduction)
                update(1)
            seconds["latency_steer"] = time.perf_counter() - t_steer
        else:
            alloc, opts, narrow = allocate_at(share)
    seconds["score_allocate"] = time.perf_counter() - t
    recovery = None
    if opts.recover:
        t = time.perf_counter()
        # layers the sequential refit below cannot fit (ConvTranspose) get the channel-level fit
        recovery = recover(analysis, alloc.keep_player, stats, only_ops=("ConvTranspose",))
        seconds["recover"] = time.perf_counter() - t

    report = _describe(analysis, alloc, opts)
    report.round_to = opts.round_to
    report.rounding = _rounding_text(opts.round_to, narrow)
    if (opts.round_to, narrow) != roundings[0]:
        blocks = _rounding_text(*roundings[0]).replace("channels in ", "")
        report.rounding = (report.rounding or "channels not rounded") + (
            f"; the kernels' blocks, {blocks}, could not meet the target within a point")
    _add_curves(report, analysis, alloc, loss, importance)
    if sampled is not None:
        report.payoff_cost = dict(evaluations=sampled.evaluations, budget=sampled.budget, seconds=sampled.seconds,
                                  classifier=sampled.classifier)
    if cost_model is not None:
        report.latency_model = cost_model.describe(alloc)
        report.latency_model["steps"] = steered
        best = max(m for _, m in steered)
        if best < opts.latency_target - STEER_TOLERANCE:
            report.notes.append(f"latency target -{opts.latency_target:.1%} not reached: the fastest allocation "
                                f"tried removes {best:.1%} of the measured latency")
    if gated is not None:
        report.gates = dict(steps=opts.gate_steps, soft_flops_ratio=gated.soft_flops_ratio,
                            fidelity_loss=gated.fidelity_loss, binary_share=gated.binary_share,
                            history=[list(h) for h in gated.history])
    if recovery is not None:
        report.refitted_layers = len(recovery.refitted)
        if recovery.mean_only:
            report.notes.append(REFIT_NOTES[0] + "bias correction only: " + ", ".join(recovery.mean_only))
    t = time.perf_counter()
    keep_fn = analysis.keep_fn(alloc.keep_player)
    repeat_fn = lambda name: flatten_repeat(analysis, name)  # noqa: E731
    pruned, changed = rewrite(analysis, alloc.keep_player, prepared)
    seconds["rewrite"] = time.perf_counter() - t
    if opts.recover:
        t = time.perf_counter()
        seq = refit_sequential(prepared, pruned, keep_fn, repeat_fn, changed, cal, cal.fit, providers, progress,
                               seed=opts.seed, shapes=shapes)
        seconds["refit"] = time.perf_counter() - t
        report.refitted_layers += len(seq.patch) + len(seq.channel)
        if seq.failed:
            report.notes.append(REFIT_NOTES[2] + ", ".join(seq.failed))
        if seq.unsupported:
            report.notes.append(REFIT_NOTES[1] + ", ".join(seq.unsupported))
    def drift_corrected(model: onnx.ModelProto) -> List[str]:
        return correct_drift(prepared, model, list(prep_log.bn_scale), keep_fn, cal, cal.fit, providers)

    if opts.bn_correct and prep_log.bn_scale:
        t = time.perf_counter()
        with progress("correcting BN drift", 1) as update:
            corrected = drift_corrected(pruned)
            update(1)
        seconds["bn_correct"] = time.perf_counter() - t
        report.notes.append(f"BN drift corrected on {len(corrected)} layers with folded BatchNormalization")

    t = time.perf_counter()
    check_graph(pruned, original)  # and onnxruntime runs it in the fidelity pass, which checks its outputs

    def sliced() -> onnx.ModelProto:  # the same channels, no refit
        model = _trial_model(prepared, shapes, opts, alloc.keep_player)
        if opts.bn_correct and prep_log.bn_scale:
            drift_corrected(model)
        return model

    pruned, fid, unwritten = _checked_refit(pruned, sliced if opts.recover else None, report, original, reference,
                                            cal, providers, progress, store.lean)
    report.macs_before = run.macs_before
    report.macs_after = count_macs(pruned, run.input_shapes)
    report.params_before, report.params_after = run.params_before, count_params(pruned)
    if report.macs_after > report.macs_before:
        from .errors import InternalError
        raise InternalError("the pruned model has more FLOPs than the original (nothing written)")
    report.fidelity_top1_agreement, report.fidelity_relative_error = fid.top1_agreement, fid.relative_error
    report.fidelity_held_out, report.fidelity_images = fid.held_out, fid.images
    report.holdout_images = fid.images if fid.held_out else 0
    seconds["verify"] = time.perf_counter() - t
    if run.evaluate is not None:
        t = time.perf_counter()
        x, y = run.evaluate
        report.accuracy_before = run.accuracy_before
        report.accuracy_after = accuracy(pruned, x, y, providers)
        if unwritten is not None:  # what recovery bought, on the labelled set: the same channels without it, or the other way
            other = accuracy(unwritten, x, y, providers)
            if report.refit_rejected:
                report.accuracy_rejected_refit = other
            else:
                report.accuracy_without_refit = other
        report.eval_samples = len(y)
        seconds["evaluate"] = seconds.pop("evaluate", 0.0) + time.perf_counter() - t  # listed last
    unwritten = None  # a second pruned model: not held through the latency measurement
    if opts.latency:
        t = time.perf_counter()
        batches = [cal.spec.fixed_batch] if cal.spec.fixed_batch else sorted({1, opts.latency_batch})
        with progress("measuring latency", 1) as update:
            report.latency = [dataclasses.asdict(l) for l in latency.measure(reference, pruned, spec.name,
                                                                              cal.first_sample(), batches, providers)]
            report.kernel_macs = _kernel_macs(run, pruned, report.notes)
            update(1)
        seconds["latency"] = time.perf_counter() - t

    report.input_path = run.loaded.path
    report.provider = run.provider_text
    report.file_size_before = run.loaded.file_size
    report.file_size_after = pruned.ByteSize() + weights.stored_bytes(pruned)
    report.calibration_images = len(cal)
    report.skipped_files = cal.skipped
    report.folded_batchnorms = len(prep_log.folded_batchnorms)
    report.seconds = seconds
    report.wall_seconds = (run.wall_seconds if first else 0.0) + time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    if cal.skipped:
        report.notes.append(f"{cal.skipped} non-image files in the calibration folder were skipped")
    report.notes.extend(cal.notes)
    if not first:
        report.notes.append(SHARED_NOTE)
    if opts.flops is not None and abs(report.flops_reduction - opts.flops) > 0.01:
        report.notes.append(
            f"achieved reduction {report.flops_reduction:.1%} is more than 1 point from the target: "
            + ("the smallest pruning step of some group is large; try --round-to 1"
               if all(r > 1 for r, _ in roundings + [(opts.round_to, 0)]) else
               "with channels unrounded the allocation still overshot: coupled channels and --min-keep make some "
               "steps large, and its greedy order can miss a closer split (another --criterion or --allocation "
               "may land nearer)"))
    if store.lean:
        report.notes.append(
            f"large model ({_gb(weights.stored_bytes(original))} of weights): one copy of the weights kept, so the "
            "reference for fidelity, accuracy and latency is the prepared model (BatchNorm folded, the same function)")
    return PruneResult(pruned, report, store, external_data=run.loaded.external_data, input_files=run.loaded.files)


# Below this many calibration images the report warns that the refit has little to go on:
# fmnist_resnet at -40% (92.30% on its 1000 shipped test images) kept 26.3% top-1 refitted on
# 3 images, 64.9% on 5, 86.5% on 8, 89.1% on 16, 90.7% on 32 and 91.7% on 64.
FEW_IMAGES = 64


def _checked_refit(refitted: onnx.ModelProto, make_sliced, report: Report, original, reference,
                   cal: CalibrationSet, providers, progress, lean: bool):
    """The model to write, its fidelity on the held-out images, and the model measured beside
    it and not written (None where there was none).

    The refit must earn its place on images it never saw: the same channels merely sliced
    (``make_sliced()``) are measured beside it in the same pass, and the better is written.
    Not without held-out images, nor for models kept lean, where a second pruned copy of the
    weights would break the memory bound; ``make_sliced`` None: no refit was made."""
    if make_sliced is not None and len(cal) < FEW_IMAGES:
        shown = (f"the {len(cal.holdout)} held out show little of it" if len(cal.holdout) else
                 "none is held out to show it")
        report.notes.append(f"only {len(cal)} calibration images: a refit on this few can cost much accuracy "
                            f"and {shown}; a few hundred are best (--max-images, 256 by default)")
    if make_sliced is not None and not len(cal.holdout):
        report.notes.append("no calibration images held out: the refit is not checked against slicing")
        make_sliced = None
    elif make_sliced is not None and lean:
        report.notes.append("model over 512 MiB of weights: the refit is not checked against slicing on held-out images")
        make_sliced = None
    if make_sliced is None:
        return refitted, fidelity(reference, [refitted], cal, providers, progress)[0], None
    sliced = make_sliced()
    check_graph(sliced, original)
    fid, without = fidelity(reference, [refitted, sliced], cal, providers, progress)
    if without.relative_error >= fid.relative_error:
        report.fidelity_without_refit = dict(relative_error=without.relative_error, top1_agreement=without.top1_agreement)
        return refitted, fid, sliced
    # what is written is not refitted: the report must not say it is
    report.notes = [n for n in report.notes if not n.startswith(REFIT_NOTES)]
    report.notes.append(
        f"the refit made the output error on the {fid.images} held-out images worse ({fid.relative_error:.4f} "
        f"against {without.relative_error:.4f} with its channels merely sliced), so no refit is written; "
        "more calibration images (--max-images) give the refit more to fit")
    report.fidelity_rejected_refit = dict(relative_error=fid.relative_error, top1_agreement=fid.top1_agreement)
    report.refitted_layers = 0
    report.refit_rejected = True
    return sliced, without, refitted


# onnxruntime writes a copy of the weights beside the graph it optimised, which is read for
# the report's "CPU kernels" line: up to this many bytes of weights (ResNet-18's 45 MB copy
# took 0.5 s per model at 224x224); larger models are left out, and the report says so.
KERNELS_MAX_BYTES = 128 * 2 ** 20


def _kernel_macs(run: "_Run", pruned: onnx.ModelProto, notes: List[str]) -> Optional[dict]:
    """The report's view of :mod:`onnxprune.kernels`: convolution MACs counted and executed by
    onnxruntime before (on the prepared model, whose names and folded constants the pruned
    model shares) and after, and the pruned layers it runs padded; None off the CPU provider
    and where it cannot be read, which the notes then say: it only describes the result, so it
    never fails a conversion."""
    if not run.providers or run.providers[0] != "CPUExecutionProvider":
        return None
    size = max(run.prepared.ByteSize() + weights.stored_bytes(run.prepared),
               pruned.ByteSize() + weights.stored_bytes(pruned))
    if run.store.lean or size > KERNELS_MAX_BYTES:
        notes.append(f"the convolutions onnxruntime's CPU kernels run were not read: onnxruntime would write a "
                     f"copy of the model's {size / 2 ** 20:.0f} MiB of weights to say (read up to "
                     f"{KERNELS_MAX_BYTES // 2 ** 20} MiB)")
        return None
    try:
        if run.kernels_before is None:
            run.kernels_before = conv_kernels(run.prepared, run.input_shapes, run.providers, shapes=run.shapes,
                                              ours=True)
        was, now = run.kernels_before, conv_kernels(pruned, run.input_shapes, run.providers, ours=True)
    except Exception as e:  # noqa: BLE001  (a full disk, say: the model itself is written regardless)
        notes.append(f"the convolutions onnxruntime's CPU kernels run were not read: {str(e).splitlines()[0][:200]}")
        return None
    if not was.counted:
        return None
    held_before = {c.name: c.held for c in was.convs}
    # a layer the pruning cut that runs padded: there the cut saved less than it counts
    return dict(counted_before=was.counted, executed_before=was.executed, counted_after=now.counted,
                executed_after=now.executed, layout_changes_before=was.layout_changes,
                layout_changes_after=now.layout_changes,
                padded=[dict(layer=c.name, held=list(c.held[:2]), run=list(c.run[:2]))
                        for c in now.convs if c.padded and held_before.get(c.name) != c.held])


def peak_rss_bytes() -> Optional[int]:
    """The most resident memory this process has held so far (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB elsewhere


def _gb(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GB"


def _from_games(games):
    """Per group: players most important first, the loss curve, the importances."""
    return ({g: game.players[game.order] for g, game in games.items()},
            {g: game.loss for g, game in games.items()},
            {g: game.shapley for g, game in games.items()})


def _rank(analysis: Analysis, opts: PruneOptions, stats, bn_scale=None):
    """Per prunable group: players most important first, and the loss curve for auto allocation."""
    if opts.criterion == "snpfi":
        # without recovery removed channels become zeros, with it their means go into the bias
        grams = {}  # each consumer's weight Gram, computed once for both games
        refit = opts.payoff == "refit" or (opts.payoff == "auto" and opts.recover)
        games = group_games(analysis, stats, centred=opts.recover, grams=grams, ranked=not refit)
        if refit:
            games = refit_games(analysis, stats, games, grams=grams)
        return _from_games(games)
    ranked, loss, importance = {}, {}, {}
    scores = score_players(analysis, opts.criterion, stats, opts.seed, bn_scale)
    for g in analysis.prunable_groups():
        players = np.flatnonzero(analysis.player_group == g.index)
        order = np.lexsort((players, -scores[players]))
        ranked[g.index] = players[order]
        # the share of the group's total score lost when only the k best are kept
        s = np.maximum(scores[ranked[g.index]], 0.0)
        total = s.sum()
        kept_share = np.concatenate([[0.0], np.cumsum(s)]) / total if total > 0 else np.ones(len(s) + 1)
        loss[g.index] = 1.0 - kept_share
        importance[g.index] = scores[players]
    return ranked, loss, importance


def _roundings(opts: PruneOptions, providers) -> List[Tuple[int, int]]:
    """The (round_to, narrow unit) pairs to try, in order: the --round-to given, or by default
    the kernels' blocks and then finer ones. The blocks are a preference: they can make a
    target unreachable (when most groups are little wider than a block) or overshoot it by
    more than a point when the steps are coarse."""
    if opts.round_to is not None:
        return [(opts.round_to, 0)]
    return list(dict.fromkeys([kernel_channel_block(providers), (8, 0), (1, 0)]))


def _rounding_text(round_to: int, narrow: int) -> str:
    if round_to <= 1:
        return ""
    return f"channels in multiples of {round_to}" + (
        f" ({narrow} in groups under {2 * round_to})" if narrow > 1 else "")


def _allocate_rounded(roundings: List[Tuple[int, int]], opts: PruneOptions, target: float, attempt):
    """The first allocation, over ``roundings``, that meets the target within one point; else
    the closest one made; else the last rounding's error. Returns it, ``opts`` with the
    --round-to used, and the narrow unit used. ``attempt(round_to, narrow_unit, last)``: ``last``
    is true for the last rounding, the only one allowed the exhaustive search for a plan within
    the point (:func:`onnxprune.allocate.allocate`): a coarser rounding that misses gives way to
    a finer one, whose plans lost less on mnist_cnn than the coarse plans that search finds
    (bench/results/2026-11-22-exact-plans.md)."""
    best, error = None, None
    for i, (r, u) in enumerate(roundings):
        try:
            alloc = attempt(r, u, i == len(roundings) - 1)
        except TargetError as e:
            error = e
            continue
        if alloc.reduction <= target + 0.01:
            return alloc, opts.replace(round_to=r), u
        if best is None or alloc.reduction < best[0].reduction:
            best = (alloc, r, u)
    if best is None:
        raise error
    return best[0], opts.replace(round_to=best[1]), best[2]


STEER_TRIES = 4  # allocations measured at most, for --latency
STEER_TOLERANCE = 0.02  # measured reduction accepted this close to the target (timing noise is about this)


def _analysis_of(prepared: onnx.ModelProto, shapes, opts: PruneOptions) -> Analysis:
    """The channel groups of the prepared model (a graph of its own: rewriting edits it)."""
    return analyse(weights.import_graph(prepared), shapes, default_opset(prepared), opts.ignore)


def _trial_model(prepared: onnx.ModelProto, shapes, opts: PruneOptions, keep: np.ndarray) -> onnx.ModelProto:
    """The pruned model of an allocation, without refitting (its speed does not depend on the
    weights), from a fresh analysis: rewriting edits the analysis's graph."""
    return rewrite(_analysis_of(prepared, shapes, opts), keep, prepared)[0]


def steer_to_measured_latency(allocate_at, target: float, measured_reduction):
    """Allocate for ``target`` of the modelled latency, then correct by measurement.

    The model sums layers timed one at a time; the whole network also spends time between
    them (layout reorders, sums, activations that fuse differently at other widths), so an
    allocation that removes the target share of the model can remove much less of the
    measured time. Each try's pruned model is timed against the original by
    ``measured_reduction(keep_player)``; the next asks the model for more or less by the
    secant through the last two tries. The chosen allocation is the least pruned one measured
    within STEER_TOLERANCE of the target or past it (else the fastest). Returns it (as
    ``allocate_at`` does) and the tries as [asked, measured] pairs."""
    tries = []  # (asked share of the model, measured reduction, allocation result)
    share = target
    for _ in range(STEER_TRIES):
        try:
            result = allocate_at(share)
        except TargetError:
            if not tries:
                raise  # the target itself is out of the model's reach
            break  # a correction (from noisy timings, or a model that saturates) asked for more than it can give
        measured = measured_reduction(result[0].keep_player)
        tries.append((share, measured, result))
        if abs(measured - target) <= STEER_TOLERANCE:
            break
        if len(tries) >= 2 and abs(tries[-1][1] - tries[-2][1]) > 1e-3:
            (s0, m0, _), (s1, m1, _) = tries[-2], tries[-1]
            nxt = s1 + (target - m1) * (s1 - s0) / (m1 - m0)
        else:
            nxt = share + (target - measured)
        nxt = float(np.clip(nxt, 0.01, 0.95))
        if any(abs(nxt - s) < 1e-3 for s, _, _ in tries):
            break  # the allocation cannot move further this way
        share = nxt
    met = [t for t in tries if t[1] >= target - STEER_TOLERANCE]
    chosen = min(met, key=lambda t: t[1]) if met else max(tries, key=lambda t: t[1])
    return chosen[2], [[round(s, 4), round(m, 4)] for s, m, _ in tries]


def _latency_model(analysis: Analysis, prepared: onnx.ModelProto, cal: CalibrationSet, opts: PruneOptions,
                   providers, progress, narrow: int = 0):
    from .latency_model import LatencyModel

    batch = cal.spec.fixed_batch or opts.latency_batch
    with progress("timing layers", len(analysis.mac_nodes)) as update:
        return LatencyModel(analysis, prepared, cal.spec.name, cal.first_sample(), batch, providers, opts.round_to,
                            opts.min_keep, default_opset(prepared), progress=lambda n: update, narrow_unit=narrow)


def _gate(analysis: Analysis, opts: PruneOptions, stats):
    """The learned bottleneck: gates per player, the groups ranked by them, and the local
    payoff's loss curve along that order (for give-back and the report)."""
    games = group_games(analysis, stats, centred=opts.recover)
    settings = GateSettings(steps=opts.gate_steps, lr=opts.gate_lr, flops_weight=opts.gate_flops_weight,
                            binary_weight=opts.gate_binary_weight)
    result = learn_gates(analysis, games, opts.flops, settings)
    ranked, loss, importance = {}, {}, {}
    for g, game in games.items():
        # most open gate first; equal logits fall back on the Shapley value
        order = np.lexsort((-game.shapley, -result.logits[g]))
        ranked[g] = game.players[order]
        loss[g] = loss_curve(game.q, order)
        importance[g] = result.gates[g]
    return ranked, loss, importance, result


def _add_curves(report: Report, analysis: Analysis, alloc: Allocation, loss, importance) -> None:
    """Per pruned group: the payoff its kept channels retain, its utilisation curve at a
    quarter, half and three quarters of its channels, and how unequal its channels are."""
    rows = {row.producers[0]: row for row in report.groups}
    for g in analysis.prunable_groups():
        row = rows.get(g.producers[0])
        curve = loss.get(g.index)
        if row is None or curve is None or curve[0] <= 0:
            continue
        row.payoff_kept = float(1.0 - curve[alloc.kept[g.index]] / curve[0])
        row.curve = [float(1.0 - curve[int(round(q * g.size))] / curve[0]) for q in (0.25, 0.5, 0.75)]
        imp = np.asarray(importance.get(g.index, []), dtype=np.float64)
        if len(imp) and abs(imp.mean()) > 0:
            row.importance_spread = float(imp.std() / abs(imp.mean()))


def _describe(analysis: Analysis, alloc: Optional[Allocation], opts: PruneOptions) -> Report:
    total = analysis.macs() or 1
    per_group = analysis.group_macs()
    payoff = "" if opts.criterion != "snpfi" else (
        opts.payoff if opts.payoff != "auto" else ("refit" if opts.recover else "local"))
    if opts.method == "bottleneck":
        payoff = "local"
    snpfi = opts.method == "snpfi"
    report = Report(method=opts.method, criterion=opts.criterion if snpfi else "gates", payoff=payoff,
                    allocation=opts.allocation if snpfi else "threshold", recovery=opts.recover,
                    flops_target=opts.flops or 0.0, latency_target=opts.latency_target,
                    macs_before=analysis.macs())
    report.prunable_macs_share = analysis.prunable_share()
    for g in analysis.groups:
        share = per_group.get(g.index, 0) / total
        if g.prunable:
            kept = alloc.kept[g.index] if alloc is not None else g.size
            report.groups.append(GroupRow(g.name, g.producers, g.size, kept, share))
        elif share > 0 and not all("(input)" in r for r in g.reasons):
            # the image input's channels are not a layer anyone expects pruned
            report.blocked.append(BlockedRow(g.name, g.size, share, g.reasons))
    return report


def analyze(model: ModelSource, options: Optional[PruneOptions] = None, calib: Optional[CalibSource] = None) -> Report:
    """Channel groups of ``model`` without pruning: which are prunable, their FLOPs
    share, and for each blocked group the op and the reason. ``calib``: only read for the
    size of a calibration array, where the model's spatial axes are dynamic."""
    opts = options or PruneOptions()
    with weights.activate(weights.WeightStore()):
        loaded = load_model(model)
        spec = input_spec(loaded.model, opts, calib)
        prepared, _ = prepare(loaded.model, release=True)
        shapes = static_shapes(prepared, {spec.name: (1,) + tuple(int(d) for d in spec.shape[1:])})
        analysis = _analysis_of(prepared, shapes, opts)
        report = _describe(analysis, None, opts)
    report.input_path = loaded.path
    return report
