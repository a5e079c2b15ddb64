"""Stop and Regenerate on Slack, end to end: the real adapter and bolt against the fake Slack, the
real worker with the tiny model (slowed down to be stopped mid-answer) and real Redis."""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlencode

import pytest

from bot.slack.outbox import REGENERATE_ACTION, STOP_ACTION
from contract import history
from contract.controls import NOT_YOURS, ONLY_THE_LATEST
from engine.worker import STOPPED_NOTE
from service.config import Settings
from service.redis_server import free_port
from tests.conftest import final_event, reply_events, running_worker, tiny_settings
from tests.fakes.slack_server import APP_ID, TEAM_ID, FakeSlack, Message
from tests.test_controls import slow_engine
from tests.test_slack import ALICE, DM, adapter, answer_shown, fake, send_dm, send_event

__all__ = ["fake"]  # the fixture, shared with test_slack
pytestmark = pytest.mark.timeout(120)
BOB, ADMIN = "U2BOB", "U3ADMIN"
FORM = "application/x-www-form-urlencoded"


def controls_settings(**slack) -> Settings:
    """Long answers at a large model's pace (tests/test_controls.py): about 8 s, time enough to stop one."""
    return tiny_settings(
        slack={"mode": "http", "http_port": free_port(), "edit_interval_s": 0.5, "admin_user_ids": [ADMIN], **slack},
        model={"max_prompt_tokens": 100}, generation={"max_new_tokens": 400},
    )


def click(action_id: str, message: Message, user: str = ALICE, action_ts: str = "1700000500.000001") -> str:
    """The block_actions request Slack POSTs when a button of `message` is clicked."""
    payload = {
        "type": "block_actions", "api_app_id": APP_ID, "token": "legacy-verification-token",
        "team": {"id": TEAM_ID, "domain": "fake"}, "user": {"id": user, "username": user.lower(), "team_id": TEAM_ID},
        "channel": {"id": message.channel, "name": "directmessage"}, "trigger_id": uuid.uuid4().hex,
        "container": {"type": "message", "message_ts": message.ts, "channel_id": message.channel, "is_ephemeral": False,
                      "thread_ts": message.thread_ts},
        "message": {"type": "message", "ts": message.ts, "thread_ts": message.thread_ts, "text": message.raw},
        "actions": [{"type": "button", "action_id": action_id, "block_id": "controls",
                     "value": message.buttons[action_id]["value"], "action_ts": action_ts}],
    }
    return urlencode({"payload": json.dumps(payload)})


async def clicked(fake: FakeSlack, body: str) -> None:
    answer = await fake.post(body, FORM)
    assert answer.status == 200 and answer.seconds < 3, answer  # acknowledged within Slack's 3 s


def told(fake: FakeSlack, user: str) -> list[str]:
    return [body["text"] for body in fake.ephemerals if body["user"] == user]


async def test_slacks_native_stop_by_the_asker_ends_the_streaming_answer(redis, fake, tiny_model):
    settings = controls_settings(stream_buffer_chars=1)
    async with adapter(fake, redis, settings), running_worker(redis, slow_engine(tiny_model, settings), settings):
        sent = await send_dm(fake, "Write a long answer.")
        await fake.wait_for(lambda: fake.sessions.get((DM, sent.ts)) == "processing")  # Slack shows its Stop
        await fake.wait_for(lambda: any(m.streaming and m.text for m in fake.messages_in(DM)))
        await send_event(fake, fake.native_stop(DM, sent.ts, ALICE))
        stopped = await final_event(redis, "slack", sent.job_id, timeout=20)
        assert stopped.kind == "final" and stopped.text.endswith(STOPPED_NOTE)
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == [stopped.text])
        await fake.wait_for(lambda: fake.sessions[(DM, sent.ts)] == "active")  # Slack leaves that to the app
    [message] = fake.messages_in(DM)
    assert not message.streaming and STOP_ACTION not in message.buttons
    assert message.feedback_buttons and message.buttons[REGENERATE_ACTION]["value"] == sent.job_id
    assert fake.ephemerals == []


async def test_the_stop_button_refuses_another_person_and_lets_an_admin_stop(redis, fake, tiny_model):
    settings = controls_settings(streaming=False)  # posted and edited: the Stop button rides on the message
    async with adapter(fake, redis, settings), running_worker(redis, slow_engine(tiny_model, settings), settings):
        sent = await send_dm(fake, "Write a long answer.")
        await fake.wait_for(lambda: any(STOP_ACTION in m.buttons for m in fake.messages_in(DM)))
        [message] = fake.messages_in(DM)
        assert message.buttons[STOP_ACTION]["value"] == sent.job_id
        await clicked(fake, click(STOP_ACTION, message, user=BOB))
        await fake.wait_for(lambda: told(fake, BOB) == [NOT_YOURS])
        assert [e for e in await reply_events(redis, "slack", sent.job_id) if e.kind != "partial"] == []  # goes on
        await clicked(fake, click(STOP_ACTION, message, user=ADMIN, action_ts="1700000600.000001"))
        stopped = await final_event(redis, "slack", sent.job_id, timeout=20)
        assert stopped.text.endswith(STOPPED_NOTE)
        await fake.wait_for(lambda: [m.text for m in fake.messages_in(DM)] == [stopped.text])
    [message] = fake.messages_in(DM)
    assert set(message.buttons) == {REGENERATE_ACTION} and message.feedback_buttons
    assert told(fake, ADMIN) == [] and fake.ephemerals[0]["thread_ts"] == sent.ts


async def test_regenerate_edits_the_answer_in_place_once_however_often_the_click_comes(redis, fake, tiny_engine):
    settings = controls_settings(stream_buffer_chars=1)
    async with adapter(fake, redis, settings), running_worker(redis, tiny_engine, settings):
        sent = await send_dm(fake, "What is the capital of France?")
        await answer_shown(fake, redis, sent.job_id, before=0)
        [old] = fake.messages_in(DM)
        assert old.buttons[REGENERATE_ACTION]["value"] == sent.job_id
        posts = len(fake.calls_to("chat.postMessage")) + len(fake.calls_to("chat.startStream"))
        regenerate = click(REGENERATE_ACTION, old)
        for _ in range(2):  # Slack's retry of a click carries the same payload
            await clicked(fake, regenerate)
        new_job = f"slack:regenerate:{ALICE}-1700000500.000001"
        regenerated = await final_event(redis, "slack", new_job, timeout=20)
        await fake.wait_for(lambda: fake.messages_in(DM)[0].buttons.get(REGENERATE_ACTION, {}).get("value") == new_job)
    [message] = fake.messages_in(DM)  # the same message, edited
    assert message.ts == old.ts and message.text == regenerated.text
    assert message.feedback_buttons and STOP_ACTION not in message.buttons
    assert len(fake.calls_to("chat.postMessage")) + len(fake.calls_to("chat.startStream")) == posts
    assert [call.body["ts"] for call in fake.calls_to("chat.update")] and {c.body["ts"] for c in fake.calls_to("chat.update")} == {old.ts}
    [exchange] = await history.load_exchanges(redis, sent.conversation)
    assert exchange.assistant.job == new_job and exchange.assistant.text == regenerated.text
    regenerations = [e for e in await reply_events(redis, "slack") if e.job_id.startswith("slack:regenerate:")]
    assert {e.job_id for e in regenerations} == {new_job} and [e.kind for e in regenerations].count("final") == 1
    assert fake.ephemerals == []


async def test_regenerate_is_refused_for_an_older_answer_and_for_another_person(redis, fake, tiny_engine):
    settings = controls_settings()
    async with adapter(fake, redis, settings), running_worker(redis, tiny_engine, settings):
        first = await send_dm(fake, "Hello")
        await answer_shown(fake, redis, first.job_id, before=0)
        second = await send_dm(fake, "And again", thread_ts=first.thread)
        await answer_shown(fake, redis, second.job_id, before=1)
        older, latest = fake.messages_in(DM)
        await clicked(fake, click(REGENERATE_ACTION, older))
        await clicked(fake, click(REGENERATE_ACTION, latest, user=BOB))
        await fake.wait_for(lambda: told(fake, ALICE) == [ONLY_THE_LATEST] and told(fake, BOB) == [NOT_YOURS])
    assert [e for e in await reply_events(redis, "slack") if e.job_id.startswith("slack:regenerate:")] == []
    assert [e.assistant.job for e in await history.load_exchanges(redis, first.conversation)] == [first.job_id, second.job_id]
