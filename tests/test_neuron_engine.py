"""The Neuron engine against a fake that holds optimum-neuron 0.4.5's continuous-batching contract call by call.

References are to the optimum-neuron 0.4.5 wheel (`pip download --no-deps optimum-neuron==0.4.5`):
  modeling_base.py:33-34           NeuronModel.__call__ is forward
  models/inference/backend/modules/decoder/modeling_decoder.py
    361-405  NxDModelForCausalLM.forward(input_ids, position_ids, seq_ids, sampling_params);
             380: a prefill is `input_ids.shape[-1] > 1 and position_ids.min() == 0`, else a decode step
    163-170  decode masks the cache up to position_ids - 1: a row's position is its cached length
  models/inference/backend/modules/decoder/decoder_wrappers.py
    115-131  int64 ids accepted (cast to int32), more rows than the compiled batch refused
    119-124  a prompt is padded to the compiled context length, so it must fit it
    53-88    a decode with fewer rows than the batch is padded with unused seq ids
  models/inference/backend/config.py:133-134   the context graph has batch 1 under continuous batching
  models/inference/backend/modules/generation/sampling.py:102-147   validate_sampling_params
  vllm/model_loader.py:170-198     rows sorted by seq id before the call; logits output[:, -1, :]
  vllm/runner.py:48-52, 367-444    greedy as top_k=1; prefill positions range(len(prompt)); decode feeds
                                   the last token at num_tokens - 1
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from contract.jobs import Conversation
from engine.serving.engine import saved_end_ids
from engine.serving.neuron_engine import NeuronEngine
from engine.serving.scheduler import Scheduler
from service.config import GenerationSettings
from tests.conftest import Queues, reply_events, run_staggered, running_worker, tiny_settings

END = 2
VOCAB = 32000


class FakeNeuronLlama:
    """A compiled Llama: fixed batch and length, one KV-cache line per seq id, scripted answers per prompt."""

    def __init__(self, batch_size: int, sequence_length: int, answers: dict[tuple[int, ...], list[int]], on_device_sampling=True):
        self.neuron_config = SimpleNamespace(
            batch_size=batch_size, sequence_length=sequence_length, tp_degree=2, continuous_batching=batch_size > 1,
            on_device_sampling=on_device_sampling, max_topk=256,
        )
        self.generation_config = GenerationConfig(eos_token_id=END)
        self.answers = answers
        self.lines: dict[int, list[int]] = {}  # seq id -> tokens whose keys/values are cached
        self.prompts: dict[int, tuple[int, ...]] = {}
        self.calls: list[dict] = []

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_ids, position_ids, seq_ids, sampling_params):
        rows = input_ids.shape[0]
        assert input_ids.dtype == position_ids.dtype == seq_ids.dtype == torch.long
        assert position_ids.shape == input_ids.shape and seq_ids.shape == (rows,)
        assert sampling_params.dtype == torch.float32 and sampling_params.shape == (rows, 3)
        if self.neuron_config.on_device_sampling:
            top_k, top_p, temperature = sampling_params.T
            assert torch.all((top_k > 0) & (top_k <= self.neuron_config.max_topk)) and torch.equal(top_k, top_k.floor())
            assert torch.all((top_p > 0) & (top_p <= 1)) and torch.all(temperature > 0)
        ids = seq_ids.tolist()
        assert ids == sorted(set(ids)) and all(0 <= i < self.neuron_config.batch_size for i in ids)
        prefill = input_ids.shape[-1] > 1 and position_ids.min().item() == 0
        self.calls.append({"prefill": prefill, "seq_ids": ids, "width": input_ids.shape[1], "sampling": sampling_params[0].tolist()})
        if prefill:
            ctx_batch = 1 if self.neuron_config.continuous_batching else self.neuron_config.batch_size
            assert rows <= ctx_batch, "the context graph takes one prompt at a time"
            assert input_ids.shape[1] <= self.neuron_config.sequence_length
            assert position_ids[0].tolist() == list(range(input_ids.shape[1]))
            [line] = ids
            self.lines[line] = input_ids[0].tolist()
            self.prompts[line] = tuple(self.lines[line])
        else:
            assert input_ids.shape[1] == 1 and rows <= self.neuron_config.batch_size
            for line, token, position in zip(ids, input_ids[:, 0].tolist(), position_ids[:, 0].tolist()):
                assert line in self.lines, f"decode of seq id {line}, which was never prefilled"
                assert position == len(self.lines[line]), f"seq id {line}: position {position}, cached {len(self.lines[line])}"
                assert position < self.neuron_config.sequence_length
                self.lines[line].append(token)
            # _forward_with_pad runs the missing rows on the unused seq ids, writing their cache
            # lines: a line decoded later without a new prefill would show it in its position.
            for line in range(self.neuron_config.batch_size):
                if line not in ids and line in self.lines:
                    self.lines[line].append(-1)
        tokens = [self._next(line) for line in ids]
        if self.neuron_config.on_device_sampling:
            return torch.tensor(tokens)
        logits = torch.zeros(rows, 1, VOCAB)
        logits[torch.arange(rows), 0, torch.tensor(tokens)] = 1.0
        return logits

    def _next(self, line: int) -> int:
        answer = self.answers[self.prompts[line]]
        produced = len(self.lines[line]) - len(self.prompts[line])
        return answer[produced] if produced < len(answer) else END


PROMPTS = [[1, 10, 11, 12], [1, 20, 21], [1, 30, 31, 32, 33]]
ANSWERS = {(1, 10, 11, 12): [101, 102, 103, 104, 105], (1, 20, 21): [201], (1, 30, 31, 32, 33): [301, 302, 303]}


def neuron_engine(model: FakeNeuronLlama, generation: GenerationSettings | None = None) -> NeuronEngine:
    return NeuronEngine(model, SimpleNamespace(eos_token_id=END), generation or GenerationSettings())


@pytest.mark.parametrize("on_device_sampling", [True, False])
def test_slots_prefill_one_prompt_per_call_and_decode_live_slots_together(on_device_sampling):
    model = FakeNeuronLlama(batch_size=2, sequence_length=64, answers=ANSWERS, on_device_sampling=on_device_sampling)
    outputs, admitted = run_staggered(Scheduler(neuron_engine(model), max_new_tokens=50), PROMPTS)
    assert outputs == {0: [101, 102, 103, 104, 105], 1: [201], 2: [301, 302, 303]}
    prefills = [call for call in model.calls if call["prefill"]]
    assert [call["seq_ids"] for call in prefills] == [[0], [1], [1]]  # the third prompt reuses the freed slot
    decodes = [call["seq_ids"] for call in model.calls if not call["prefill"]]
    assert decodes == [[0], [0, 1], [0, 1], [0, 1], [0, 1]]  # every live slot in one call, in seq-id order
    assert all(call["sampling"] == [1.0, 1.0, 1.0] for call in model.calls)  # greedy is top_k=1


def test_a_model_compiled_with_batch_size_1_is_one_slot_through_the_same_path():
    model = FakeNeuronLlama(batch_size=1, sequence_length=64, answers=ANSWERS)
    outputs, _ = run_staggered(Scheduler(neuron_engine(model), max_new_tokens=50), PROMPTS)
    assert outputs == {0: [101, 102, 103, 104, 105], 1: [201], 2: [301, 302, 303]}
    assert {tuple(call["seq_ids"]) for call in model.calls} == {(0,)}


def test_prompt_plus_output_stays_within_the_compiled_length():
    model = FakeNeuronLlama(batch_size=2, sequence_length=7, answers=ANSWERS)
    outputs, _ = run_staggered(Scheduler(neuron_engine(model), max_new_tokens=50), PROMPTS[:1])
    assert outputs == {0: [101, 102, 103]}  # 7 compiled - 4 prompt tokens


def test_sampling_settings_become_the_on_device_sampling_row():
    model = FakeNeuronLlama(batch_size=2, sequence_length=64, answers=ANSWERS)
    sampling = GenerationSettings(do_sample=True, temperature=0.5, top_k=20, top_p=0.8)
    run_staggered(Scheduler(neuron_engine(model, sampling), max_new_tokens=50), PROMPTS[:2])
    assert all(call["sampling"] == pytest.approx([20.0, 0.8, 0.5]) for call in model.calls)


def test_a_one_token_prompt_is_refused_rather_than_run_as_a_decode_step():
    engine = neuron_engine(FakeNeuronLlama(batch_size=2, sequence_length=64, answers=ANSWERS))
    with pytest.raises(ValueError, match="at least two tokens"):
        engine.prefill(0, [1])


async def test_the_worker_serves_conversations_through_the_neuron_engine(redis, llama_tokenizer):
    settings = tiny_settings(model={"batch_size": 2})
    answer = llama_tokenizer("Hello there", add_special_tokens=False).input_ids

    class SameAnswer(dict):
        def __missing__(self, prompt):  # prompts are rendered by the worker
            return answer

    model = FakeNeuronLlama(batch_size=2, sequence_length=512, answers=SameAnswer())
    engine = NeuronEngine(model, llama_tokenizer, settings.generation)
    queue = Queues(redis)
    await queue.submit(Conversation(platform="local", channel="a"), "a", "Hi")
    await queue.submit(Conversation(platform="local", channel="b"), "b", "Weather?")
    async with running_worker(redis, engine, settings):
        async def finals():
            while len(done := {e.job_id: e.text for e in await reply_events(redis, "local") if e.kind == "final"}) < 2:
                await asyncio.sleep(0.02)
            return done

        done = await asyncio.wait_for(finals(), 30)
    assert done == {"local:a": "Hello there", "local:b": "Hello there"}
    assert [0, 1] in [call["seq_ids"] for call in model.calls if not call["prefill"]]


def test_end_of_turn_ids_named_only_in_generation_config_json_end_the_answer(tmp_path):
    """optimum-neuron builds the model's generation config from config.json alone
    (generation_utils.py:70), so an end id only generation_config.json names was missed."""
    model = FakeNeuronLlama(batch_size=1, sequence_length=64, answers=ANSWERS)  # eos from config.json: END only
    tokenizer = SimpleNamespace(eos_token_id=END)
    assert saved_end_ids(tokenizer, str(tmp_path), model.generation_config) == {END}  # an export without the file
    GenerationConfig(eos_token_id=[END, 103]).save_pretrained(tmp_path)
    engine = NeuronEngine(model, tokenizer, GenerationSettings(), saved_end_ids(tokenizer, str(tmp_path), model.generation_config))
    outputs, _ = run_staggered(Scheduler(engine, max_new_tokens=50), PROMPTS[:1])
    assert outputs == {0: [101, 102]}  # 103 ends the turn
