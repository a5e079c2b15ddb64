"""The benchmarks' own helpers work (they run only under `make bench`, so nothing else would notice)."""

from __future__ import annotations

from bench.scale import MemoryOutbox
from bot.delivery import Part


async def test_the_scale_benchmarks_outbox_notes_when_each_answer_is_shown():
    outbox = MemoryOutbox()
    message = await outbox.post(Part("j1", {}, "Half an", settled=False))
    assert outbox.final_at == {}  # a partial is not the answer shown
    await outbox.edit(message, Part("j1", {}, "Half an answer.", feedback=True))
    assert list(outbox.final_at) == ["j1"] and not outbox.refused(RuntimeError("refused"))
