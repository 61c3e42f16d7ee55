"""The errors koopman_hooks raises for user mistakes, each naming what is wrong, and
:func:`warn`, which attributes a warning to the user's line."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

#: frames in these folders or files are never a warning's "caller": the package's own, torch's
#: (module calls, hooks, ``no_grad`` decorators) and ``contextlib``'s
_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))
_INTERNAL_FILES = (os.path.abspath(contextlib.__file__),)


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_INTERNAL_DIRS) or path in _INTERNAL_FILES


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside koopman_hooks,
    torch and ``contextlib``: the user's line, however deep in the package the warning arises."""
    level, frame = 1, sys._getframe(0)
    while frame.f_back is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class LayerError(ValueError):
    """A layer specification does not match the model, or a layer misbehaves in forward."""


class ShapeError(LayerError):
    """A layer's activation has another shape than the probe was fitted on."""


class NotFittedError(RuntimeError):
    """The probe has not been fitted (or loaded) yet, or its last fit failed."""


class ConfigError(ValueError):
    """An option or a recipe value has the wrong name, type or range."""


class IncompatibleFileError(ValueError):
    """A saved file is corrupt, of another kind, or made for another model."""


class EmptyLoaderError(ValueError):
    """The loader yielded no batches."""

    def __init__(self, what: str = "the loader", hint: str | None = None) -> None:
        super().__init__(f"{what} yielded no batches" + (f"; {hint}" if hint else ""))


__all__ = ["EmptyLoaderError", "ConfigError", "IncompatibleFileError", "LayerError", "NotFittedError", "ShapeError"]
