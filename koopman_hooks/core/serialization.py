"""safetensors files with a JSON header: ``save_tensors`` / ``load_tensors``.

Loading never executes code (safetensors holds tensors and strings only); a file that is not
a koopman_hooks file of the expected kind, or whose header is malformed, raises
:class:`~koopman_hooks.errors.IncompatibleFileError`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from koopman_hooks._version import __version__
from koopman_hooks.errors import IncompatibleFileError

FORMAT_KEY = "koopman_hooks"


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], kind: str, config: dict[str, Any]) -> None:
    """Write ``tensors`` and a JSON ``config`` tagged with ``kind`` to a safetensors file."""
    meta = {FORMAT_KEY: json.dumps({"kind": kind, "version": __version__, "config": config})}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)


def load_tensors(path: str | os.PathLike[str], kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`, checking that it holds a ``kind``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if FORMAT_KEY not in meta:
                raise IncompatibleFileError(f"{path} is not a koopman_hooks file (no {FORMAT_KEY!r} header)")
            header = json.loads(meta[FORMAT_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except IncompatibleFileError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise IncompatibleFileError(f"{path} is not a readable safetensors file: {err}") from None
    if not isinstance(header, dict) or not isinstance(header.get("config"), dict):
        raise IncompatibleFileError(f"{path} has a malformed koopman_hooks header")
    if header.get("kind") != kind:
        raise IncompatibleFileError(f"{path} holds a {header.get('kind')!r}, not a {kind!r}")
    not_finite = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if not_finite:
        raise IncompatibleFileError(f"{path} is not a valid {kind} file: non-finite values in {not_finite}")
    return tensors, header["config"]


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = prefix + "."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}
