"""Personas: a system prompt per workspace or channel, from config.yaml and set at run time, through the real worker."""

from __future__ import annotations

import pytest

from contract.jobs import Conversation, Scope
from contract.personas import MAX_PERSONA_CHARS, Personas, SystemPrompt
from engine.prompts import PromptBuilder
from engine.serving.transformers_engine import TransformersEngine
from engine.worker import PERSONA_TOO_LONG
from tests.conftest import Queues, final_event, running_worker, tiny_settings
from tests.test_cli import chatbot

GUILD = Scope(platform="discord", workspace="g1", channel="c1")
OTHER_CHANNEL = Scope(platform="discord", workspace="g1", channel="c2")
ELSEWHERE = Scope(platform="discord", workspace="g2", channel="c3")
PERSONAS = [
    {"platform": "discord", "workspace": "g1", "system_prompt": "You are the guild's librarian."},
    {"platform": "discord", "channel": "c1", "system_prompt": "You are a pirate. Answer like one."},
]


class RecordingEngine(TransformersEngine):
    """The tiny model, keeping the prompts it was given (what the worker really sent it)."""

    prompts: list[list[int]]

    def prefill(self, slot: int, prompt: list[int]) -> int:
        self.prompts.append(prompt)
        return super().prefill(slot, prompt)


def recording_engine(tiny_model, settings) -> RecordingEngine:
    model = settings.model
    engine = RecordingEngine(tiny_model.model, tiny_model.tokenizer, model.sequence_length, model.batch_size, settings.generation)
    engine.prompts = []
    return engine


async def test_the_most_specific_persona_wins(redis):
    personas = Personas(redis, tiny_settings(personas=PERSONAS))
    assert (await personas.system_prompt(GUILD)).source == "channel in config.yaml"
    assert (await personas.system_prompt(OTHER_CHANNEL)).text == "You are the guild's librarian."
    assert (await personas.system_prompt(ELSEWHERE)).source == "global system_prompt"
    assert (await personas.system_prompt(None)).source == "global system_prompt"

    await personas.set(GUILD, "  You are a calm poet.  ")
    assert await personas.system_prompt(GUILD) == SystemPrompt("You are a calm poet.", "run time")
    assert await personas.clear(GUILD) and not await personas.clear(GUILD)
    assert (await personas.system_prompt(GUILD)).source == "channel in config.yaml"


async def test_a_persona_must_say_something_and_fit(redis):
    personas = Personas(redis, tiny_settings())
    with pytest.raises(ValueError, match="cannot be empty"):
        await personas.set(GUILD, "   ")
    with pytest.raises(ValueError, match=f"at most {MAX_PERSONA_CHARS:,}"):
        await personas.set(GUILD, "x" * (MAX_PERSONA_CHARS + 1))


def test_a_persona_needs_a_place():
    with pytest.raises(Exception, match="names a workspace or a channel"):
        tiny_settings(personas=[{"platform": "slack", "system_prompt": "hi"}])


async def test_the_worker_answers_each_channel_with_its_persona(redis, tiny_model):
    settings = tiny_settings(personas=PERSONAS)
    engine = recording_engine(tiny_model, settings)
    queue = Queues(redis)
    async with running_worker(redis, engine, settings):
        for n, scope in enumerate((GUILD, OTHER_CHANNEL, ELSEWHERE)):
            conversation = Conversation(platform="discord", channel=scope.channel)
            await queue.submit(conversation, f"m{n}", "Who are you?", scope=scope)
            assert (await final_event(redis, "discord", f"discord:m{n}")).kind == "final"
        await Personas(redis, settings).set(GUILD, "You are a calm poet.")
        await queue.submit(Conversation(platform="discord", channel="c1"), "m3", "And now?", scope=GUILD)
        assert (await final_event(redis, "discord", "discord:m3")).kind == "final"

    shown = [engine.tokenizer.decode(prompt) for prompt in engine.prompts]
    assert "You are a pirate" in shown[0] and "librarian" in shown[1]
    assert settings.system_prompt in shown[2]
    assert "calm poet" in shown[3] and "pirate" not in shown[3]  # set at run time: the next message has it


async def test_a_persona_too_long_for_the_budget_is_answered_with_a_sentence(redis, tiny_model):
    settings = tiny_settings(model={"max_prompt_tokens": 64})
    engine = recording_engine(tiny_model, settings)
    await Personas(redis, settings).set(GUILD, "You are a very thorough assistant. " * 20)
    async with running_worker(redis, engine, settings):
        await Queues(redis).submit(Conversation(platform="discord", channel="c1"), "m1", "Hello", scope=GUILD)
        answered = await final_event(redis, "discord", "discord:m1")
    assert (answered.kind, answered.text) == ("error", PERSONA_TOO_LONG) and engine.prompts == []


def test_a_persona_keeps_the_prompt_prefix_stable_from_turn_to_turn(llama_tokenizer):
    from contract.history import Exchange

    builder = PromptBuilder(llama_tokenizer, "default", 4000).with_system_prompt("You are a pirate.")
    first = builder.build([], "Hello")
    user, assistant = builder.exchange_turns(first.user_content, "Arr, hello!", None)
    second = builder.build([Exchange(user=user, assistant=assistant)], "How are you?")
    assert second.ids[: len(first.ids)] == first.ids and "You are a pirate." in second.text


async def test_chatbot_prompt_shows_the_channels_persona(redis, redis_server, tmp_path):
    await Personas(redis, tiny_settings()).set(Scope(platform="discord", channel="c9"), "You are a pirate.")
    code, out, err = await chatbot(redis_server.url, tmp_path, "prompt", "discord:t5", "Hello", "--channel", "c9")
    assert code == 0, err
    assert "You are a pirate." in out and "system prompt: run time" in err
    code, out, err = await chatbot(redis_server.url, tmp_path, "prompt", "discord:t5", "Hello")
    assert code == 0 and "You are a pirate." not in out and "system prompt: global system_prompt" in err
