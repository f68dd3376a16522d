"""Files that are never half-written: every writer goes to ``<name>.tmp``, fsyncs, then renames.

One home for the formats the project writes: JSON, safetensors (weights, with string metadata)
and torch state files (optimizer moments, steps; read back with ``weights_only``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple, Optional

import torch
from torch import Tensor, nn


def replace_atomically(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and rename it over ``final`` (readers see the old file or the new one)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def _tmp(path: Path) -> Path:
    """A temporary name beside ``path``, per process (ranks may write the same file at once)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def try_lock(path: str | Path, wait_s: float = 0.0) -> Optional[IO[str]]:
    """An exclusive advisory lock on the file ``path`` (created, with this process's pid and host),
    held while the returned handle stays open; None when another process holds it for ``wait_s``."""
    import fcntl
    import socket
    import time
    handle = open(path, "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                return None
            time.sleep(0.1)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def write_text(text: str, path: str | Path) -> Path:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text)
    replace_atomically(tmp, path)
    return path


def write_json(obj: Any, path: str | Path) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=False), path)


class SafetensorsFile(NamedTuple):
    """Tensors and string metadata of a ``.safetensors`` file."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, str]


def save_safetensors(tensors: nn.Module | Mapping[str, Tensor], path: str | Path,
                     metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """A module's state dict (or named tensors) -> ``path``; returns the path.

    Tensors are moved to the CPU and made contiguous; tensors sharing storage are copied (the
    format forbids aliasing). Metadata values that are not strings are stored as JSON text.
    """
    from safetensors.torch import save_file
    state = tensors.state_dict() if isinstance(tensors, nn.Module) else tensors
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"save_safetensors: entry '{key}' is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            t = t.clone()
        storages.add(ptr)
        out[key] = t
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    save_file(out, str(tmp), metadata=meta)
    replace_atomically(tmp, path)
    return path


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> SafetensorsFile:
    """Every tensor (onto ``device``) and the metadata of a ``.safetensors`` file."""
    from safetensors import SafetensorError, safe_open

    from trainer.errors import RunError
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: safetensors file not found")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:  # not a safetensors file, or a truncated one
        raise RunError(f"{path}: not a readable safetensors file ({err}); restore it") from None
    return SafetensorsFile(state, metadata)


def save_state(state: dict, path: str | Path) -> Path:
    """Training state (optimizer moments, step, ledger): tensors and plain containers only."""
    path = Path(path)
    tmp = _tmp(path)
    torch.save(state, tmp)
    replace_atomically(tmp, path)
    return path


def load_state(path: str | Path) -> Optional[dict]:
    """A state file written by :func:`save_state`, or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
