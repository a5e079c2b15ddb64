"""A tiny random Llama-2-shaped model with the real Llama-2 tokenizer.

It talks nonsense, but it exercises the exact Llama-2 path (tokenizer, chat template, special
tokens, 4096 context) in a few MB and generates hundreds of tokens a second on a CPU, which is
what tests and demos without the real weights need.
"""

from __future__ import annotations

from pathlib import Path

from engine.assets import Stage, prepare_once
from engine.assets.llama2_tokenizer import VOCAB_SIZE, write_llama2_tokenizer

SEED = 0


def prepare_tiny_llama(dest: Path) -> Path:
    return prepare_once(dest, _build)


def _build(folder: Path, stage: Stage) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    write_llama2_tokenizer(folder, stage)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    # Forked so seeding for a reproducible model leaves the caller's random stream alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model.save_pretrained(folder)
    stage(f"random model saved: {model.num_parameters():,} parameters")
