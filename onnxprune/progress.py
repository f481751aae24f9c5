"""Progress reporting that the API leaves silent and the CLI draws as bars."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

# progress(label, total) -> context manager yielding update(n)
Progress = Callable[[str, int], ContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def silent(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None
