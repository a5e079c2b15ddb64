"""Reply delivery bookkeeping that the platform tests do not reach."""

from __future__ import annotations

import asyncio
import time

from bot.delivery import ABANDONED_AFTER_S, Delivery, Shown
from contract import keys
from contract.jobs import ReplyEvent
from service.redis_client import connect
from service.redis_server import RedisServer
from service.tasks import cancel_until_done


class Nowhere:
    limit = 2000
    settles = False

    async def post(self, part):
        raise AssertionError("nothing should be posted")

    async def edit(self, message_id, part):
        raise AssertionError("nothing should be edited")

    async def remove(self, message_id, reply_to):
        raise AssertionError("nothing should be removed")


def test_replies_whose_final_never_comes_are_forgotten(redis):
    delivery = Delivery(redis, "slack", "adapter", Nowhere(), edit_interval_s=1.0)
    now = time.monotonic()
    delivery.shown = {
        "slack:abandoned": Shown(message_ids=["1"], texts=["half"], edited_at=now - ABANDONED_AFTER_S - 1),
        "slack:streaming": Shown(message_ids=["2"], texts=["still going"], edited_at=now),
    }
    delivery._forget_abandoned()
    assert list(delivery.shown) == ["slack:streaming"]


class Recording:
    limit = 2000
    settles = False

    def __init__(self):
        self.posted: list[str] = []

    async def post(self, part):
        self.posted.append(part.text)
        return str(len(self.posted))

    async def edit(self, message_id, part):
        self.posted[int(message_id) - 1] = part.text

    async def remove(self, message_id, reply_to):
        self.posted[int(message_id) - 1] = None


async def test_delivery_rides_out_a_redis_restart(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    redis = connect(server.url)
    outbox = Recording()
    delivery = Delivery(redis, "slack", "slack-adapter", outbox, edit_interval_s=1.0)
    task = asyncio.create_task(delivery.run())

    async def shown(text: str) -> None:
        deadline = time.monotonic() + 20
        while text not in outbox.posted:
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, f"{text!r} never delivered"
            await asyncio.sleep(0.02)

    async def publish(text: str) -> None:
        event = ReplyEvent(job_id=f"slack:{text}", conversation="slack:D1", kind="final", text=text)
        await redis.xadd(keys.replies("slack"), {"event": event.model_dump_json()})

    try:
        await publish("before")
        await shown("before")
        server.stop()
        await asyncio.sleep(1.5)  # delivery polls a dead server meanwhile
        server.start()
        await publish("after")
        await shown("after")
        assert outbox.posted == ["before", "after"]
        assert not task.done()
    finally:
        await cancel_until_done([task])
        await redis.aclose()
        server.stop()


class Counting(Recording):
    """Records texts and counts edits; `settles` as a platform that stops streams would have it."""

    def __init__(self, settles: bool):
        super().__init__()
        self.settles = settles
        self.edits = 0

    async def edit(self, message_id, part):
        self.edits += 1
        await super().edit(message_id, part)


async def test_a_final_equal_to_the_last_partial_is_one_more_edit_only_where_messages_settle(redis):
    for settles, edits in ((False, 0), (True, 1)):
        outbox = Counting(settles)
        delivery = Delivery(redis, "slack", "adapter", outbox, edit_interval_s=0.0)
        for kind in ("partial", "final"):
            await delivery.deliver(ReplyEvent(job_id=f"slack:same-{settles}", conversation="slack:c", kind=kind, text="Hello.", reply_to={}))
        assert (outbox.posted, outbox.edits) == (["Hello."], edits)
