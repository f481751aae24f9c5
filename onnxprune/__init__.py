"""onnxprune: structured pruning of ONNX CNNs, calibrated on a few hundred unlabelled images."""

import importlib

__version__ = "0.1.0"

# The public names are imported on first use: the command line then starts with click alone,
# and numpy, onnx and onnxruntime load inside its error handling (a Ctrl-C during those
# imports ends in one line and exit 130, not a traceback).
_PUBLIC = {"prune": "api", "prune_each": "api", "PruneResult": "api", "PruneOptions": "options", "Report": "report",
           "PruneError": "errors", "UsageError": "errors", "InputError": "errors", "TargetError": "errors",
           "InternalError": "errors"}

__all__ = ["prune", "prune_each", "PruneOptions", "PruneResult", "Report", "PruneError", "UsageError", "InputError",
           "TargetError", "InternalError", "__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    else:
        try:  # a submodule, as `import onnxprune; onnxprune.api` reached it when all were loaded
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
