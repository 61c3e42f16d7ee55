"""Optional recipe sections (``[unlearning]``, ``[topology]``): run, aggregate, render.

Each section registers three functions: one that runs it for a seed from the
:class:`~koopman_hooks.recipes.runner.RunContext`, one that aggregates the per-seed results
into ``report.json``, and one that renders them as Markdown lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SECTIONS: dict[str, Callable[[Any], Any]] = {}
AGGREGATORS: dict[str, Callable[[list[Any]], Any]] = {}
MARKDOWN: dict[str, Callable[[Any], list[str]]] = {}
