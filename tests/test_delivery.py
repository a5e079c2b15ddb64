"""Reply delivery bookkeeping that the platform tests do not reach."""

from __future__ import annotations

import time

from bot.delivery import ABANDONED_AFTER_S, Delivery, Shown


class Nowhere:
    limit = 2000

    async def post(self, reply_to, text):
        raise AssertionError("nothing should be posted")

    async def edit(self, reply_to, message_id, text):
        raise AssertionError("nothing should be edited")


def test_replies_whose_final_never_comes_are_forgotten(redis):
    delivery = Delivery(redis, "slack", "adapter", Nowhere(), edit_interval_s=1.0)
    now = time.monotonic()
    delivery.shown = {
        "slack:abandoned": Shown(message_ids=["1"], texts=["half"], edited_at=now - ABANDONED_AFTER_S - 1),
        "slack:streaming": Shown(message_ids=["2"], texts=["still going"], edited_at=now),
    }
    delivery._forget_abandoned()
    assert list(delivery.shown) == ["slack:streaming"]
