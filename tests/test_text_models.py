"""text.model beyond "bundled": a local directory, a Hugging Face id from the local cache, and
freezing any BERT-family encoder. The models are tiny random BERTs built here (nothing is downloaded)
that share the bundled MiniLM tokenizer's vocabulary."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForPreTraining, BertModel, DistilBertConfig, DistilBertModel

from pokesprite.models.text import TextEncoder, load_tokenizer, resolve_model_path, transformer_layers

BUNDLED_DIR = Path(resolve_model_path("bundled"))
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HUB_ID = "prajjwal1/bert-mini"
CAPTIONS = ["a small green creature with a bulb on its back", "fire"]


def tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512)


def trainable_groups(enc: TextEncoder) -> set[str]:
    """Trainable parameters grouped as "proj" or "transformer.encoder.layer.N" (or the full name)."""
    out = set()
    for name, p in enc.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            out.add("proj" if parts[0] == "proj" else ".".join(parts[:4]) if "layer" in parts else name)
    return out


@pytest.fixture(scope="module")
def local_model_dir(tmp_path_factory) -> Path:
    """A tiny BERT saved the modern way (save_pretrained) next to the bundled tokenizer files."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_bert")
    BertModel(tiny_bert_config()).save_pretrained(d)
    for f in TOKENIZER_FILES:
        shutil.copyfile(BUNDLED_DIR / f, d / f)
    return d


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face hub cache holding ``prajjwal1/bert-mini`` laid out like a real download.

    Like the real checkpoint (converted from the original TensorFlow BERT release) its config.json
    has no ``model_type``, the weights are a ``bert.``-prefixed BertForPreTraining state dict in
    pytorch_model.bin, and the tokenizer is a bare vocab.txt. Files are blobs named by hash with
    snapshot symlinks, as huggingface_hub writes them.
    """
    torch.manual_seed(1)
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    commit = hashlib.sha1(b"pokesprite tiny bert").hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)

    staging = tmp_path_factory.mktemp("staging")
    cfg = tiny_bert_config().to_dict()
    keys = ("hidden_size", "hidden_act", "initializer_range", "vocab_size", "hidden_dropout_prob",
            "num_attention_heads", "type_vocab_size", "max_position_embeddings", "num_hidden_layers",
            "intermediate_size", "attention_probs_dropout_prob")
    (staging / "config.json").write_text(json.dumps({k: cfg[k] for k in keys}))
    model = BertForPreTraining(tiny_bert_config())
    torch.save(model.state_dict(), staging / "pytorch_model.bin")
    shutil.copyfile(BUNDLED_DIR / "vocab.txt", staging / "vocab.txt")
    for f in staging.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.move(f, blob)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return cache, model.state_dict()


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    """Point huggingface_hub (and so transformers) at the fake cache, offline.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE from the environment once, at import, into
    huggingface_hub.constants; both it and transformers look the constants up there at call time,
    so patching the module attributes is what takes effect (the env vars are set for consistency).
    """
    cache, state = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache, state


def check_encoder(enc: TextEncoder, *, hidden: int, layers: int, dim: int, max_tokens: int) -> None:
    assert enc.hidden == hidden and len(transformer_layers(enc.transformer)) == layers
    assert enc.proj.in_features == hidden and enc.proj.out_features == dim
    tok = enc.tokenize(CAPTIONS)
    assert tok["input_ids"].shape == (2, max_tokens)
    assert tok["attention_mask"][1].sum() == 3  # [CLS] fire [SEP]
    out = enc(**tok)
    assert out.shape == (2, max_tokens, dim) and torch.isfinite(out).all()
    h, mask = enc.encode_hidden(CAPTIONS * 3, batch_size=4)
    assert h.shape == (6, max_tokens, hidden) and mask.shape == (6, max_tokens)


def same_ids_as_bundled(tokenizer) -> bool:
    bundled = load_tokenizer("bundled")
    return tokenizer(CAPTIONS)["input_ids"] == bundled(CAPTIONS)["input_ids"]


def test_local_directory_loads_by_path(local_model_dir):
    enc = TextEncoder.from_pretrained(str(local_model_dir), dim=16, max_tokens=24)
    check_encoder(enc, hidden=32, layers=2, dim=16, max_tokens=24)
    assert same_ids_as_bundled(load_tokenizer(str(local_model_dir)))
    saved = BertModel.from_pretrained(local_model_dir)
    assert torch.equal(enc.transformer.embeddings.word_embeddings.weight, saved.embeddings.word_embeddings.weight)


def test_hub_id_loads_from_local_cache_offline(offline_cache):
    _, state = offline_cache
    enc = TextEncoder.from_pretrained(HUB_ID, dim=256, max_tokens=32)
    check_encoder(enc, hidden=32, layers=2, dim=256, max_tokens=32)
    # the cached weights were loaded (not a fresh random init)
    assert torch.equal(enc.transformer.encoder.layer[1].output.dense.weight,
                       state["bert.encoder.layer.1.output.dense.weight"])
    assert same_ids_as_bundled(load_tokenizer(HUB_ID))


def test_freeze_top_layer_of_any_bert(offline_cache, local_model_dir):
    for name in (HUB_ID, str(local_model_dir)):
        enc = TextEncoder.from_pretrained(name, dim=8, max_tokens=8)
        enc.freeze_transformer(1)
        assert trainable_groups(enc) == {"proj", "transformer.encoder.layer.1"}
        enc.freeze_transformer(2)
        assert trainable_groups(enc) == {"proj", "transformer.encoder.layer.0", "transformer.encoder.layer.1"}
        enc.freeze_transformer(0)
        assert {n for n, p in enc.named_parameters() if p.requires_grad} == {"proj.weight", "proj.bias"}
        with pytest.raises(ValueError, match="top 3 layers.*only 2"):
            enc.freeze_transformer(3)


def test_freeze_finds_other_layer_lists():
    """DistilBERT keeps its blocks under transformer.layer, not encoder.layer."""
    distil = DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=3, n_heads=2, hidden_dim=64))
    enc = TextEncoder(distil, load_tokenizer("bundled"), dim=8, max_tokens=8)
    enc.freeze_transformer(2)
    assert trainable_groups(enc) == {"proj", "transformer.transformer.layer.1", "transformer.transformer.layer.2"}


def test_freeze_without_layer_list_is_a_clear_error():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2)
            self.body = nn.Linear(8, 8)

    enc = TextEncoder(NoLayers(), load_tokenizer("bundled"), dim=4, max_tokens=8)
    enc.freeze_transformer(0)  # needs no layer list
    with pytest.raises(ValueError, match="cannot find the list of transformer layers in NoLayers"):
        enc.freeze_transformer(1)


def test_missing_models_name_text_model_and_say_what_to_do(offline_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"text.model 'prajjwal1/bert-tiny'.*Hugging Face cache.*hf download"):
        TextEncoder.from_pretrained("prajjwal1/bert-tiny", dim=8, max_tokens=8)
    with pytest.raises(FileNotFoundError, match=r"text.model 'prajjwal1/bert-tiny'.*hf download"):
        load_tokenizer("prajjwal1/bert-tiny")
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=rf"text.model '{missing}'.*no such directory"):
        TextEncoder.from_pretrained(str(missing), dim=8, max_tokens=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"exists but is not a complete Hugging Face model folder"):
        TextEncoder.from_pretrained(str(tmp_path / "empty"), dim=8, max_tokens=8)


def test_max_tokens_beyond_the_model_positions_is_an_error(local_model_dir):
    with pytest.raises(ValueError, match="text.max_tokens=600 exceeds the text model's 512 positions"):
        TextEncoder.from_pretrained(str(local_model_dir), dim=8, max_tokens=600)
