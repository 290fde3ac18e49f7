import torch

from pokesprite.models.text import TextEncoder


def test_bundled_encoder_loads_offline_and_projects():
    enc = TextEncoder.from_pretrained("bundled", dim=256, max_tokens=32)
    assert enc.hidden == 384 and len(enc.transformer.encoder.layer) == 6
    tok = enc.tokenize(["a small green creature with a bulb on its back", "fire"])
    assert tok["input_ids"].shape == (2, 32)
    assert tok["attention_mask"][1].sum() == 3  # [CLS] fire [SEP]
    assert enc(**tok).shape == (2, 32, 256)


def test_pretrained_weights_carry_meaning():
    """Real all-MiniLM-L6-v2 weights: paraphrases are closer than unrelated sentences."""
    enc = TextEncoder.from_pretrained("bundled", dim=8, max_tokens=32)
    h, mask = enc.encode_hidden(["a red fire lizard", "a crimson lizard made of flame", "a blue water turtle"])
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.1


def test_freeze_leaves_only_top_layers_and_projection_trainable():
    enc = TextEncoder.from_pretrained("bundled", dim=16, max_tokens=8)
    enc.freeze_transformer(2)
    trainable = {n.split(".")[0] if n.startswith("proj") else ".".join(n.split(".")[:4])
                 for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"proj", "transformer.encoder.layer.4", "transformer.encoder.layer.5"}
    enc.freeze_transformer(0)
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == {"proj.weight", "proj.bias"}


def test_frozen_layers_train_without_dropout():
    """In stage 3 the frozen embeddings and lower layers compute what the frozen U-Net was trained on:
    train() leaves them in eval mode, and only the trainable top layers drop out."""
    enc = TextEncoder.from_pretrained("bundled", dim=16, max_tokens=16)
    tok = enc.tokenize(["a small green creature with a bulb on its back"])
    layers = enc.transformer.encoder.layer
    enc.freeze_transformer(2)
    enc.train()
    assert enc.training and enc.proj.training and not enc.transformer.embeddings.training
    assert [layer.training for layer in layers] == [False] * 4 + [True] * 2
    below = {}  # the output of the top frozen layer, per forward pass
    layers[3].register_forward_hook(
        lambda m, i, out: below.setdefault(len(below), out[0] if isinstance(out, tuple) else out))
    torch.manual_seed(0)
    top_a = enc.hidden_states(**tok)
    torch.manual_seed(1)
    top_b = enc.hidden_states(**tok)
    assert torch.equal(below[0], below[1])  # the frozen part: deterministic
    assert not torch.equal(top_a, top_b)  # the trainable layers: dropout
    enc.freeze_transformer(0)
    enc.train()
    assert not any(m.training for m in enc.transformer.modules()) and enc.proj.training
    enc.eval()
    assert not any(m.training for m in enc.modules())


def test_tokenizing_from_many_threads_gives_each_caller_its_own_settings():
    """A served model tokenizes concurrent requests in threads: padded batches (the drawing) and
    untruncated counts (the truncation note) must not get each other's settings."""
    from concurrent.futures import ThreadPoolExecutor

    from pokesprite.models.text import load_tokenizer
    from transformers import BertConfig, BertModel

    tokenizer = load_tokenizer("bundled")
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    text = TextEncoder(bert, tokenizer, dim=8, max_tokens=16)
    long = ["word " * (20 + i % 7) for i in range(32)]

    def padded(_):
        return tuple(text.tokenize(long)["input_ids"].shape)

    def counts(_):
        return tuple(text.token_counts(long))

    with ThreadPoolExecutor(8) as pool:
        shapes = list(pool.map(lambda i: padded(i) if i % 2 else counts(i), range(400)))
    assert set(shapes[1::2]) == {(32, 16)}
    assert set(shapes[0::2]) == {tuple(22 + i % 7 for i in range(32))}


def test_padding_does_not_change_a_captions_features():
    """The attention mask reaches the transformer: a caption's token features are the same whatever
    the padding (max_tokens) around them, so the U-Net's context does not depend on text.max_tokens."""
    caption = ["a small green creature with a bulb on its back"]
    a, mask_a = TextEncoder.from_pretrained("bundled", dim=8, max_tokens=16).encode_hidden(caption)
    b, mask_b = TextEncoder.from_pretrained("bundled", dim=8, max_tokens=64).encode_hidden(caption)
    n = int(mask_a.sum())
    assert int(mask_b.sum()) == n < 16
    torch.testing.assert_close(a[:, :n], b[:, :n], atol=1e-4, rtol=0)
