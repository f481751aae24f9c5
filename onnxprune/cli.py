"""``onnxprune IN OUT --calib PATH --flops R``: a thin layer over :func:`onnxprune.prune`.

Every pruning flag is generated from :class:`onnxprune.options.PruneOptions`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from typing import get_type_hints

import click

from . import __version__
from .errors import InternalError, PruneError, TargetError, UsageError
from .options import OPTION_SPECS, PruneOptions

PREPROCESSING_HELP = """\
Calibration images are preprocessed as pixel * --scale, then (x - --mean) / --std,
resized (short side) and centre-cropped to the model's input size. This must match
what the model was trained with. Common presets:

\b
  pixel / 255 (default):  (no flags)
  ImageNet:               --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
  [-1, 1]:                --mean 0.5 --std 0.5
  Caffe/OpenCV BGR:       add --bgr
"""


def _floats(text, count=None):
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None
    if count is not None and len(values) != count:
        raise click.BadParameter(f"expected {count} comma-separated numbers, got {text!r}")
    return values


def _option_decorators():
    hints = get_type_hints(PruneOptions)
    decorators = []
    for f in OPTION_SPECS:
        meta = dict(f.metadata)
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(help=meta["help"], show_default=f.default is not None and f.default is not False and f.default != ())
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        hint = str(hints[f.name])
        if meta["flag"]:
            flag = meta["flag"]  # a flag name other than the field's, or an on/off pair such as --recover/--no-recover
        if meta["flag"] and isinstance(f.default, bool):
            kwargs.update(default=f.default)
        elif meta["is_flag"]:
            kwargs.update(is_flag=True, default=False)
        elif meta["multiple"]:
            kwargs.update(multiple=True)
        elif meta["choices"]:
            kwargs.update(type=click.Choice(meta["choices"]), default=f.default)
        elif "Tuple[float" in hint:
            kwargs.update(type=str, default=",".join(f"{v:g}" for v in f.default),
                          callback=lambda ctx, p, v: _floats(v) if v is not None else None)
        elif "Tuple[int, int]" in hint:
            kwargs.update(type=str, default=None,
                          callback=lambda ctx, p, v: tuple(int(x) for x in _floats(v, 2)) if v else None)
        elif f.default is not None:
            kwargs.update(type=type(f.default), default=f.default)
        else:
            kwargs.update(type=int if hint == "typing.Optional[int]" else float, default=None)
        if f.name == "scale":
            kwargs["show_default"] = False
            kwargs["help"] = meta["help"]
        decorators.append(click.option(flag, f.name, **kwargs))
    return decorators


def _with_options(fn):
    for deco in reversed(_option_decorators()):
        fn = deco(fn)
    return fn


@contextlib.contextmanager
def _bar(label, total):
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar.update


class _Terminated(BaseException):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
               epilog=PREPROCESSING_HELP)
@click.argument("model_in", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("model_out", metavar="OUT", type=click.Path(), required=False)
@click.option("--analyze", is_flag=True,
              help="Only print the channel groups of IN: which can be pruned, their FLOPs share, and "
                   "why the others cannot. Needs no OUT and no --calib (a calibration array, if given, "
                   "sizes dynamic spatial axes).")
@click.option("--calib", metavar="PATH",
              help="Folder of images (png, jpg, bmp, webp; searched recursively, sorted) "
                   "or a .npy/.npz file of preprocessed input tensors.")
@_with_options
@click.option("--sweep", "sweep_targets", metavar="R1,R2,...", default=None,
              help="Prune at each of these FLOPs targets instead of one --flops; OUT is then a folder "
                   "(default: IN's name + '-sweep') that gets one model per target, sweep.md, sweep.json "
                   "and, with matplotlib installed, sweep.png (accuracy or fidelity, latency and FLOPs "
                   "against the target).")
@click.option("--eval", "eval_path", metavar="NPZ", default=None,
              help="Labelled .npz (arrays x, y) to report top-1 accuracy before and after.")
@click.option("--report", "report_path", metavar="FILE.json", default=None, help="Write the full report as JSON.")
@click.option("--verbose", is_flag=True, help="Show tracebacks (for bug reports).")
@click.version_option(__version__, "--version")
def main(model_in, model_out, analyze, calib, sweep_targets, eval_path, report_path, verbose, **option_values):
    """Prune a CNN in ONNX format so that it loses a share of its FLOPs.

    Reads IN, writes the smaller model to OUT. Example:

        onnxprune in.onnx out.onnx --calib imgs/ --flops 0.4
    """
    from .api import analyze as analyze_model
    from .api import load_labelled, prune
    from .save import check_output_path, check_report_path, data_path, save_json_atomic

    if report_path:
        if sweep_targets is not None:
            raise UsageError("--report does not apply to --sweep: the sweep folder's sweep.json holds every "
                             "conversion's report")
        outputs = [model_out, data_path(model_out)] if model_out and not analyze else []
        check_report_path(report_path, [model_in, calib, eval_path] + outputs)
    if analyze:
        report = analyze_model(model_in, PruneOptions(**option_values), calib)
        click.echo(report.format_analysis())
        if report_path:
            save_json_atomic(report.to_dict(), report_path)
        return
    if sweep_targets is not None:
        return _sweep(model_in, model_out, calib, sweep_targets, eval_path, option_values)
    if model_out is None:
        raise UsageError("missing argument OUT (or give --analyze)")
    if calib is None:
        raise UsageError("missing option --calib PATH (a folder of images or a .npy/.npz file)")
    opts = PruneOptions(**option_values).validate()
    check_output_path(model_out, model_in if os.path.exists(model_in) else None, [calib, eval_path])
    labelled = load_labelled(eval_path) if eval_path else None
    result = prune(model_in, calib, opts, evaluate=labelled, progress=_bar,
                   log=lambda line: click.echo(line, err=True))
    if report_path:  # the input's own data files are known once it is read
        check_report_path(report_path, list(result.input_files))
    result.report.output_path = model_out
    result.report.file_size_after = result.save(model_out)
    click.echo(result.report.format_text())
    if report_path:
        save_json_atomic(result.report.to_dict(), report_path)
    click.echo(f"wrote {model_out}", err=True)


def _sweep(model_in, out_dir, calib, targets_text, eval_path, option_values):
    from .api import load_labelled
    from .sweep import format_table, run_sweep

    if option_values.get("flops") is not None:
        raise UsageError("give either --flops or --sweep, not both")
    if option_values.get("latency_target") is not None:
        raise UsageError("--sweep takes FLOPs targets; it does not combine with --latency")
    try:
        targets = sorted({float(t) for t in targets_text.split(",") if t.strip()})
    except ValueError:
        raise UsageError(f"--sweep takes comma-separated FLOPs targets in (0, 1), got {targets_text!r}") from None
    if not targets or any(not 0 < t < 1 for t in targets):
        raise UsageError(f"--sweep takes comma-separated FLOPs targets in (0, 1), got {targets_text!r}")
    if calib is None:
        raise UsageError("missing option --calib PATH (a folder of images or a .npy/.npz file)")
    option_values = dict(option_values, flops=targets[0])
    opts = PruneOptions(**option_values).validate()
    if out_dir is None:
        out_dir = os.path.splitext(os.path.basename(model_in))[0] + "-sweep"
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"with --sweep, OUT is a folder; {out_dir!r} is a file")
    if os.path.isdir(calib):
        inside = os.path.relpath(os.path.realpath(out_dir), os.path.realpath(calib))
        if inside == os.curdir or not inside.startswith(os.pardir):
            # its models and chart would be read as calibration files by later runs
            raise UsageError(f"with --sweep, OUT {out_dir!r} is inside the calibration folder; give another folder")
    labelled = load_labelled(eval_path) if eval_path else None
    sweep = run_sweep(model_in, calib, targets, out_dir, opts, evaluate=labelled, progress=_bar,
                      log=lambda line: click.echo(line, err=True))
    click.echo(format_table(sweep))
    for note in sweep.notes:
        click.echo(f"note: {note}")
    if not any(r.reached for r in sweep.rows):
        written = [sweep.table_path, sweep.json_path] + ([sweep.plot_path] if sweep.plot_path else [])
        raise TargetError(f"no --sweep target can be reached ({sweep.rows[0].message}); wrote only "
                          f"{', '.join(written)}")
    click.echo(f"wrote {len([r for r in sweep.rows if r.reached])} models, {sweep.table_path}, {sweep.json_path}"
               + (f" and {sweep.plot_path}" if sweep.plot_path else ""), err=True)


def run(argv=None) -> int:
    """Entry point: one line per error, distinct exit codes, no traceback without --verbose."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main.main(args=argv, prog_name="onnxprune", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("onnxprune: interrupted", err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"onnxprune: error: {e.format_message()}", err=True)
        return 2
    except PruneError as e:
        if verbose:
            traceback.print_exc()
        kind = "internal error" if isinstance(e, InternalError) else "error"
        click.echo(f"onnxprune: {kind}: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("onnxprune: interrupted", err=True)
        return 130
    except _Terminated:
        click.echo("onnxprune: terminated", err=True)
        return 143
    except Exception as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"onnxprune: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                   "(run with --verbose for the traceback)", err=True)
        return 70
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    sys.exit(run())
