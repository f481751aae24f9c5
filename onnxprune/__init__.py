"""onnxprune: structured pruning of ONNX CNNs, calibrated on a few hundred unlabelled images."""

__version__ = "0.1.0"

from .api import PruneResult, prune, prune_each  # noqa: E402
from .errors import InputError, InternalError, PruneError, TargetError, UsageError  # noqa: E402
from .options import PruneOptions  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["prune", "prune_each", "PruneOptions", "PruneResult", "Report", "PruneError", "UsageError", "InputError",
           "TargetError", "InternalError", "__version__"]
