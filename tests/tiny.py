"""Tiny random models of every supported family, built from a config (no files needed).

Used across the test suite: `tiny_model("gemma")` returns a LoadedModel whose tokenizer is a
word-level tokenizer over a small fixed vocabulary.
"""

from __future__ import annotations

import torch

FAMILIES = ("gemma", "gemma2", "llama", "qwen2", "qwen3", "gpt2")

WORDS = (
    "the a of in is to and city capital Paris France Texas Austin Dallas state opposite "
    "hot cold big small Tokyo Japan yen currency country whose Fact : sport plays Michael "
    'Jordan basketball " . , located tower Eiffel'
).split()


def tiny_tokenizer(words: list[str] = WORDS):
    """A word-level tokenizer over `words` (after <pad> <bos> <eos> <unk>) that prepends <bos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_config(family: str, vocab_size: int = 64, n_layers: int = 3, d: int = 32):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "gemma":
        return tf.Gemma3TextConfig(
            **common,
            head_dim=8,
            sliding_window=4,
            query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"][:n_layers]
            + ["full_attention"] * max(0, n_layers - 3),
        )
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8, sliding_window=4, query_pre_attn_scalar=8)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=d,
            n_layer=n_layers,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, n_layers: int = 3, d: int = 32):
    """A LoadedModel with random weights (norm weights randomised too, so they matter)."""
    from transformers import AutoModelForCausalLM

    from cltrace.models.loading import from_pretrained_objects

    torch.manual_seed(seed)
    config = tiny_config(family, n_layers=n_layers, d=d)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0, 0.15)
            else:
                p.normal_(0, 0.05)
    return from_pretrained_objects(model, tiny_tokenizer(), name=f"tiny-{family}")


def save_model(lm, folder) -> None:
    """Write a tiny LoadedModel as a model folder (weights + tokenizer) that `--model` reads."""
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)


def saved_run(root, family: str = "gemma"):
    """`root/model` (a tiny model) and `root/run1` (a calibrated CLT for it), for CLI tests."""
    from test_attribution import make_transcoder

    lm = tiny_model(family)
    save_model(lm, root / "model")
    make_transcoder(lm, "clt").save(root / "run1")
    return root
