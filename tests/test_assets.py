"""Offline models: the rebuilt Llama-2 tokenizer against reference ids, the tiny Llama, SmolLM2.

The models are prepared in the real cache (CHATBOT_CACHE_DIR or ~/.cache/llama2-chatbot), so only
the first run pays for preparation (SmolLM2: about half a minute); later runs reuse it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.assets import MARKER, cache_root, prepare_once, resolve_model
from engine.assets.llama2_tokenizer import package_source


@pytest.fixture(scope="module")
def llama2_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("embedded:llama2-tokenizer"))


# Expected ids from the Hugging Face Llama-2 tokenizer, as listed in llama-tokenizer-js's own tests.
@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello world!", [1, 15043, 3186, 29991]),
        ("grabbed", [1, 2646, 1327, 287]),
        ("           grabbed", [1, 9651, 2646, 1327, 287]),
        (" \n", [1, 259, 13]),
        ("\ttabs\t\t\t\tout here", [1, 29871, 12, 21175, 12, 12, 12, 12, 449, 1244]),
        ("ax\n####\nboo", [1, 4853, 13, 4136, 13, 833, 29877]),
        ("镇", [1, 29871, 30411]),
        ("🦙", [1, 29871, 243, 162, 169, 156]),
        ("Ꙋ🦙", [1, 29871, 237, 156, 141, 243, 162, 169, 156]),
    ],
)
def test_llama2_reference_ids(llama2_tokenizer, text, ids):
    assert llama2_tokenizer(text).input_ids == ids
    assert llama2_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_llama2_every_case_shipped_with_the_js_package(llama2_tokenizer):
    literal = r"""(?P<q>["'])(?P<text>(?:\\.|(?!(?P=q)).)*)(?P=q)"""
    cases = [
        (json.loads('"' + m["text"].replace("\\'", "'") + '"', strict=False), [int(i) for i in m["ids"].split(",")])
        for m in re.finditer(rf"testCase\({literal},\s*\[(?P<ids>[\d,\s]+)\]\)", package_source(), re.DOTALL)
    ]
    assert len(cases) >= 12 and max(len(ids) for _, ids in cases) > 400
    for text, ids in cases:
        assert llama2_tokenizer(text).input_ids == ids, text[:40]


def test_llama2_control_strings_tokenize_like_meta(llama2_tokenizer):
    assert llama2_tokenizer("<s>[INST]", add_special_tokens=False).input_ids == [1, 518, 25580, 29962]
    assert (llama2_tokenizer.bos_token_id, llama2_tokenizer.eos_token_id, llama2_tokenizer.unk_token_id) == (1, 2, 0)
    assert llama2_tokenizer.pad_token is None
    assert llama2_tokenizer.model_max_length == 4096


def test_llama2_chat_template_matches_the_hand_written_format(llama2_tokenizer):
    sys_, u1, a1, u2 = "Answer briefly.", "Hi there!", "Hello! How can I help?", "What is 2+2?"
    messages = [
        {"role": "system", "content": sys_},
        {"role": "user", "content": u1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": u2},
    ]
    rendered = llama2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == f"<s>[INST] <<SYS>>\n{sys_}\n<</SYS>>\n\n{u1} [/INST] {a1} </s><s>[INST] {u2} [/INST]"
    with pytest.raises(Exception, match="alternate"):
        llama2_tokenizer.apply_chat_template(messages[1:2] * 2, tokenize=False)


def test_tiny_llama_loads_and_generates():
    path = resolve_model("embedded:tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.vocab_size == len(tokenizer) == 32000
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (1, 2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False, pad_token_id=2
        )
    assert output.shape[1] > prompt.shape[1]


def test_smollm2_ends_turns_with_im_end():
    path = Path(resolve_model("embedded:smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer("Hello").input_ids == tokenizer("Hello", add_special_tokens=False).input_ids
    for name in ("config.json", "generation_config.json"):
        assert json.loads((path / name).read_text())["eos_token_id"] == 2
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_answers_and_stops():
    path = resolve_model("embedded:smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    reply = output[0, inputs["input_ids"].shape[1]:].tolist()
    assert reply[-1] == 2 and "Paris" in tokenizer.decode(reply)


def test_resolve_model_passes_other_ids_through():
    assert resolve_model("/models/llama-2-7b-chat") == "/models/llama-2-7b-chat"
    assert resolve_model("meta-llama/Llama-2-7b-chat-hf") == "meta-llama/Llama-2-7b-chat-hf"
    with pytest.raises(ValueError, match="unknown embedded model"):
        resolve_model("embedded:nope")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATBOT_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("CHATBOT_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "llama2-chatbot"


def test_prepare_once_builds_once_even_when_racing(tmp_path):
    builds = []

    def build(folder: Path, stage) -> None:
        builds.append(folder)
        time.sleep(0.2)
        (folder / "weights").write_text("ok")

    dest = tmp_path / "model"
    threads = [threading.Thread(target=prepare_once, args=(dest, build)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert prepare_once(dest, build) == dest and len(builds) == 1
    assert (dest / "weights").read_text() == "ok" and (dest / MARKER).exists()


def test_prepare_once_leaves_nothing_behind_when_a_build_fails(tmp_path):
    def build(folder: Path, stage) -> None:
        (folder / "half").write_text("written")
        raise OSError("disk full")

    with pytest.raises(OSError):
        prepare_once(tmp_path / "model", build)
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]
