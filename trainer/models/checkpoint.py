"""Reading CompVis LDM checkpoints into our modules, and safetensors helpers for the stages.

A CompVis `LatentDiffusion` state dict holds the UNet under `model.diffusion_model.`, the
autoencoder under `first_stage_model.`, the conditioner under `cond_stage_model.`, the EMA copy
of the UNet under `model_ema.` (LitEma names: dots removed) and the noise schedule as top-level
buffers (`betas`, `alphas_cumprod`, ...). A bare autoencoder checkpoint holds `encoder.*`,
`decoder.*`, `quant_conv.*`, `post_quant_conv.*` and its training loss under `loss.*`.

`.ckpt` / `.pt` files are read with `torch.load(weights_only=True)`: a pickle that needs any
other Python object is refused rather than executed.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from trainer.errors import first_line
from trainer.io import SafetensorsFile, load_safetensors, save_safetensors

__all__ = ["CheckpointError", "LoadReport", "PartReport", "SafetensorsFile", "load_ldm_checkpoint",
           "load_safetensors", "read_state_dict", "save_safetensors"]

UNET_PREFIX = "model.diffusion_model."
AUTOENCODER_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
EMA_UNET_PREFIX = "model_ema.diffusion_model"  # LitEma: "diffusion_model" + name without dots
_LOSS_PREFIXES = ("loss.", AUTOENCODER_PREFIX + "loss.")
_AUTOENCODER_BARE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_SHOW = 5  # keys listed per problem in reports; the rest are counted


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys do not match the modules."""


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" (and {len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


@dataclass
class PartReport:
    """How one module's keys matched: counts and the offending keys."""

    name: str
    prefix: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs model shape"
    # all keys are given as named in the checkpoint (with the prefix)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"{self.name} ({self.prefix or 'no prefix'}): {self.loaded} tensors loaded"]
        for label, keys in (("missing from checkpoint", self.missing),
                            ("unexpected in checkpoint", self.unexpected),
                            ("shape mismatch", self.mismatched)):
            if keys:
                lines.append(f"  {len(keys)} {label}: {_listing(keys)}")
        return "\n".join(lines)


@dataclass
class LoadReport:
    """What `load_ldm_checkpoint` did: one PartReport per module, plus the keys it left aside."""

    path: str
    parts: dict[str, PartReport] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)  # reason -> number of checkpoint keys

    @property
    def ok(self) -> bool:
        return all(part.ok for part in self.parts.values())

    def __str__(self) -> str:
        lines = [f"checkpoint {self.path}"] + [str(part) for part in self.parts.values()]
        lines += [f"ignored {n} keys: {reason}" for reason, n in self.ignored.items() if n]
        return "\n".join(lines)


def _unpickling_detail(err: Exception) -> str:
    """The line of torch's weights-only error that names the refused global, if there is one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(err).__name__])[0]


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a `.safetensors` file or of a torch checkpoint (its `state_dict` if nested)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(path).state_dict
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that needs Python objects other than tensors and "
            "plain containers, and unpickling those can run arbitrary code. If you trust the file, extract "
            "its weights once elsewhere (torch.load(..., weights_only=False)['state_dict']) and save them "
            f"with save_safetensors. Details: {_unpickling_detail(err)}"
        ) from err
    except (EOFError, RuntimeError, ValueError, KeyError, OSError) as err:  # not a torch checkpoint, or truncated
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: "
                              f"{first_line(err)})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries that are not named tensors: {_listing(bad)}")
    return dict(obj)


def _match(name: str, module: nn.Module, prefix: str, tensors: dict[str, Tensor]
           ) -> tuple[PartReport, dict[str, Tensor]]:
    """Compare `tensors` (keys without prefix) with `module`'s state dict: a report and what fits."""
    report = PartReport(name, prefix)
    own = module.state_dict()
    report.missing = [prefix + k for k in own if k not in tensors]
    report.unexpected = [prefix + k for k in tensors if k not in own]
    report.mismatched = [f"{prefix + k}: {tuple(t.shape)} vs {tuple(own[k].shape)}"
                         for k, t in tensors.items() if k in own and t.shape != own[k].shape]
    loadable = {k: t for k, t in tensors.items() if k in own and t.shape == own[k].shape}
    return report, loadable


def _ema_unet_tensors(unet: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The UNet's weights from LitEma keys (`model_ema.diffusion_model` + param name without dots)."""
    names = [k for k, p in unet.named_parameters()]
    ema_names = {EMA_UNET_PREFIX + k.replace(".", ""): k for k in names}
    if len(ema_names) != len(names):
        raise CheckpointError("UNet parameter names collide once dots are removed; cannot map EMA keys")
    if not any(k in state for k in ema_names):
        raise CheckpointError("use_ema=True but the checkpoint has no model_ema.diffusion_model* keys")
    return {ours: state[ema] for ema, ours in ema_names.items() if ema in state}


def load_ldm_checkpoint(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    autoencoder: nn.Module | None = None,
    cond_stage: nn.Module | None = None,
    strict: bool = True,
    use_ema: bool = False,
    state: Mapping[str, Tensor] | None = None,
) -> LoadReport:
    """Load a CompVis-layout checkpoint (`.ckpt`, `.pt` or `.safetensors`) into the given modules.

    Each module given receives the keys under its prefix (see the module docstring); a bare
    autoencoder checkpoint (no `first_stage_model.` keys) is read without prefix. With
    use_ema the UNet takes the EMA weights. Keys of modules not given, the autoencoder's loss,
    EMA keys (unless used) and the schedule buffers are ignored and counted in the report.
    strict: raise CheckpointError when a given module has missing, unexpected or mis-shaped keys
    (nothing is copied into any module then); otherwise load what matches and report the rest.
    state: the checkpoint's tensors when already read (``path`` then only names it in reports).
    """
    state = read_state_dict(path) if state is None else dict(state)
    report = LoadReport(str(path))
    bare_autoencoder = not any(k.startswith(AUTOENCODER_PREFIX) for k in state) and any(
        k.startswith(_AUTOENCODER_BARE_PREFIXES) for k in state)
    ae_prefix = "" if bare_autoencoder else AUTOENCODER_PREFIX

    groups: dict[str, tuple[nn.Module, str, dict[str, Tensor]]] = {}
    claimed: set[str] = set()
    for name, module, prefix in (("unet", unet, UNET_PREFIX), ("autoencoder", autoencoder, ae_prefix),
                                 ("cond_stage", cond_stage, COND_STAGE_PREFIX)):
        if module is None:
            continue
        if name == "unet" and use_ema:
            tensors = _ema_unet_tensors(module, state)
            groups[name] = (module, EMA_UNET_PREFIX, tensors)
            claimed.update(k for k in state if k.startswith(EMA_PREFIX))
            continue
        keys = [k for k in state if k.startswith(prefix) and not k.startswith(_LOSS_PREFIXES)]
        if name == "autoencoder" and bare_autoencoder:
            keys = [k for k in keys if k.startswith(_AUTOENCODER_BARE_PREFIXES)]
        groups[name] = (module, prefix, {k[len(prefix):]: state[k] for k in keys})
        claimed.update(keys)

    matches = {name: (module, *_match(name, module, prefix, tensors))
               for name, (module, prefix, tensors) in groups.items()}
    failed = [str(part) for _, part, _ in matches.values() if not part.ok]
    if strict and failed:  # raise before copying anything into any module
        raise CheckpointError(f"checkpoint {path} does not match the modules:\n" + "\n".join(failed))
    for name, (module, part, loadable) in matches.items():
        module.load_state_dict(loadable, strict=False)
        part.loaded = len(loadable)
        report.parts[name] = part

    for key in state:
        if key in claimed:
            continue
        if key.startswith(_LOSS_PREFIXES):
            reason = "autoencoder training loss"
        elif use_ema and unet is not None and key.startswith(UNET_PREFIX):
            reason = "non-EMA UNet weights (use_ema=True)"
        elif key.startswith(EMA_PREFIX):
            reason = "EMA weights (pass use_ema=True to load them)"
        elif key.startswith((UNET_PREFIX, AUTOENCODER_PREFIX, COND_STAGE_PREFIX) + _AUTOENCODER_BARE_PREFIXES):
            reason = "modules not passed to the loader"
        else:
            reason = "other entries (noise schedule buffers, ...)"
        report.ignored[reason] = report.ignored.get(reason, 0) + 1
    return report
