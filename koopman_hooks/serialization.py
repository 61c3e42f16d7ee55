"""safetensors files with a JSON header: ``save_tensors`` / ``load_tensors``."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from koopman_hooks import __version__

FORMAT_KEY = "koopman_hooks"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str, config: dict[str, Any]) -> None:
    """Write ``tensors`` and a JSON ``config`` tagged with ``kind`` to a safetensors file."""
    meta = {FORMAT_KEY: json.dumps({"kind": kind, "version": __version__, "config": config})}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)


def load_tensors(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`, checking that it holds a ``kind``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if FORMAT_KEY not in meta:
            raise ValueError(f"{path} is not a koopman_hooks file (no {FORMAT_KEY!r} header)")
        header = json.loads(meta[FORMAT_KEY])
        if header["kind"] != kind:
            raise ValueError(f"{path} holds a {header['kind']!r}, not a {kind!r}")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return tensors, header["config"]


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = prefix + "."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}
