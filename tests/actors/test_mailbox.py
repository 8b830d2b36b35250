"""The actor's mailbox: bounded, one reader, in order; closed by its reader."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sandboxd.actors.mailbox import Mailbox


async def test_messages_come_out_in_order_and_the_reader_waits_for_one() -> None:
    mailbox = Mailbox[int](4)
    got: list[int] = []

    async def read(n: int) -> None:
        for _ in range(n):
            got.append(await mailbox.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, 3)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # nothing to read: it waits
        mailbox.post_nowait(1)
        await mailbox.post(2)
        mailbox.post_nowait(3)
    assert got == [1, 2, 3]
    assert len(mailbox) == 0


async def test_a_full_mailbox_refuses_at_once_and_makes_a_sender_wait_for_room() -> None:
    mailbox = Mailbox[int](2)
    mailbox.post_nowait(1)
    mailbox.post_nowait(2)
    with pytest.raises(trio.WouldBlock):
        mailbox.post_nowait(3)
    posted: list[int] = []

    async def post(message: int) -> None:
        await mailbox.post(message)
        posted.append(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, 3)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(post, 4)
        await trio.testing.wait_all_tasks_blocked()
        assert posted == []  # both wait for room
        assert await mailbox.get() == 1
        await trio.testing.wait_all_tasks_blocked()
        assert posted == [3]  # one taken: room for one
        assert await mailbox.get() == 2
    assert posted == [3, 4]
    assert [mailbox.get_nowait(), mailbox.get_nowait()] == [3, 4]
    with pytest.raises(trio.WouldBlock):
        mailbox.get_nowait()


async def test_once_closed_every_post_fails_and_so_do_senders_waiting_for_room() -> None:
    mailbox = Mailbox[int](1)
    mailbox.post_nowait(1)
    failed: list[int] = []

    async def post(message: int) -> None:
        try:
            await mailbox.post(message)
        except trio.BrokenResourceError:
            failed.append(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, 2)
        await trio.testing.wait_all_tasks_blocked()
        mailbox.close()
    assert failed == [2]
    with pytest.raises(trio.BrokenResourceError):
        mailbox.post_nowait(3)
    with pytest.raises(trio.BrokenResourceError):
        await mailbox.post(3)
    assert mailbox.get_nowait() == 1  # what was queued before the close is still there


async def test_a_cancelled_get_or_post_leaves_the_mailbox_as_it_was(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mailbox = Mailbox[int](1)
    with trio.move_on_after(1) as waited:
        await mailbox.get()
    assert waited.cancelled_caught
    mailbox.post_nowait(1)
    with trio.move_on_after(1) as waited:
        await mailbox.post(2)  # full: waits, then is cancelled, having queued nothing
    assert waited.cancelled_caught
    assert len(mailbox) == 1
    assert await mailbox.get() == 1  # a new get after a cancelled one is answered
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mailbox.get)
        await trio.testing.wait_all_tasks_blocked()
        mailbox.post_nowait(3)
    assert len(mailbox) == 0
