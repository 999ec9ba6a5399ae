"""Tiny offline models and tokenizers for tests, benchmarks and the demo.

No hub access: the tokenizer is the 32k SentencePiece model shipped inside the ``mistral-common``
wheel (Apache-2.0), converted to a fast tokenizer, or (the demo's) a small byte-level BPE trained on
the text the models are pretrained on; models are built from configs with seeded random weights and
saved as normal Hugging Face folders, so the real loading code reads them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from selectmoe.layout import LM_PRETRAINING


def build_tokenizer(out_dir: str | os.PathLike | None = None):
    """A real 32k SentencePiece tokenizer built offline; saved to ``out_dir`` when given."""
    try:
        import mistral_common
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the offline 32k tokenizer needs mistral-common: pip install 'selectmoe[benchmarks]'"
        ) from err
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    spm = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    extracted = SentencePieceExtractor(str(spm)).extract(None)
    tokenizer = LlamaTokenizer(vocab=extracted["vocab"], merges=extracted["merges"])
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def train_tokenizer(rows: list[list[dict]], vocab_size: int):
    """A byte-level BPE tokenizer trained on the chat-template text of ``rows`` (seconds), with Llama's
    special tokens and ids (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2) and, like ``build_tokenizer``'s, no BOS
    added; any text encodes, none is dropped. The demo's: its generated rows use a small share of the
    32k tokenizer's ids, whose LM head dominated each step of the tiny models (benchmarks/README.md)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from selectmoe.data.template import format_messages

    specials = ["<unk>", "<s>", "</s>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((format_messages(messages, eos_token="")[0] for messages in rows), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_olmoe_config(vocab_size: int = 32000, **overrides):
    """A 2-layer OLMoE config (hidden 64, 8 experts top-2); ``overrides`` replace any field."""
    from transformers import OlmoeConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return OlmoeConfig(**kwargs)


def tiny_llama_config(vocab_size: int = 32000, **overrides):
    """A 2-layer Llama config (hidden 64) as a stand-in for the stage-3 target."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_olmoe(out_dir: str | os.PathLike, seed: int = 0, tokenizer=None, **config_overrides) -> Path:
    """Save a randomly initialised tiny OLMoE + tokenizer (default: the 32k one; a given one sets the
    vocab size) as a HF folder; returns the folder."""
    from transformers import OlmoeForCausalLM

    return _save_tiny(OlmoeForCausalLM, tiny_olmoe_config, out_dir, seed, tokenizer, config_overrides)


def build_tiny_llama(out_dir: str | os.PathLike, seed: int = 0, tokenizer=None, **config_overrides) -> Path:
    """Save a randomly initialised tiny Llama + tokenizer (as ``build_tiny_olmoe``) as a HF folder."""
    from transformers import LlamaForCausalLM

    return _save_tiny(LlamaForCausalLM, tiny_llama_config, out_dir, seed, tokenizer, config_overrides)


def _save_tiny(model_cls, make_config, out_dir, seed: int, tokenizer, overrides: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = model_cls(make_config(**{"vocab_size": len(tokenizer), **overrides}))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def final_lm_loss(model_dir: str | os.PathLike) -> tuple[int, float] | None:
    """(steps, mean training loss over the last tenth of them) of a model ``pretrain_tiny_lm`` saved;
    None for a model without that record."""
    record = Path(model_dir) / LM_PRETRAINING
    if not record.exists():
        return None
    losses = json.loads(record.read_text())["loss"]
    last = losses[-max(1, len(losses) // 10) :]
    return (len(losses), sum(last) / len(last)) if last else None


def pretrain_tiny_lm(
    model_dir: str | os.PathLike,
    rows: list[list[dict]],
    out_dir: str | os.PathLike,
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 8,
    max_seq_length: int = 128,
    learning_rate: float = 3e-3,
) -> Path:
    """Briefly train a tiny model as a plain LM on chat rows (the shared template, loss on every
    token), so that its perplexity and its experts mean something; save it with its tokenizer and its
    per-step training loss (``LM_PRETRAINING``)."""
    import random

    from transformers import AutoModelForCausalLM

    from selectmoe.data.collate import collate
    from selectmoe.data.template import encode_batch, ensure_pad_token, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = ensure_pad_token(load_tokenizer(str(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    encoded = [
        e
        for e in encode_batch(rows, tokenizer, max_seq_length=max_seq_length, loss_on="all")
        if isinstance(e, dict)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        batch = collate(
            rng.sample(encoded, min(batch_size, len(encoded))), tokenizer.pad_token_id, torch.device("cpu")
        )
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / LM_PRETRAINING).write_text(json.dumps({"steps": steps, "loss": losses}))
    return out
