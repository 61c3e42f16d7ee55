"""The errors koopman_hooks raises for user mistakes, each naming what is wrong."""

from __future__ import annotations


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
