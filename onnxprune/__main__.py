"""python -m onnxprune: the same as the onnxprune command."""

from .cli import entry

entry()
