"""The byte budget of a connection's queued frames: bounded, in turn, never stuck."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sandboxd.gateway.budget import ByteBudget


async def test_takes_wait_for_room_and_are_served_in_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = ByteBudget(100)
    await budget.take(60)
    order: list[str] = []

    async def take(name: str, size: int) -> None:
        await budget.take(size)
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "big", 50)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "small", 10)  # it would fit, but the big one came first
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and budget.held == 60
        budget.give_back(5)  # room for the small one still, not yet for the big one
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and budget.held == 55
        budget.give_back(55)
    assert sorted(order) == ["big", "small"]
    assert budget.held == 60 and budget.peak == 60


async def test_one_item_bigger_than_the_budget_goes_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = ByteBudget(100)
    await budget.take(500)  # nothing else held: it goes
    assert budget.held == 500
    with trio.move_on_after(1) as waited:
        await budget.take(1)
    assert waited.cancelled_caught  # and nothing goes beside it
    budget.give_back(500)
    await budget.take(1)
    assert budget.held == 1


async def test_a_cancelled_take_holds_nothing_and_blocks_no_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = ByteBudget(100)
    await budget.take(90)
    got: list[int] = []

    async def small() -> None:
        await budget.take(10)
        got.append(10)

    async with trio.open_nursery() as others, trio.open_nursery() as big:
        big.start_soon(budget.take, 50)
        await trio.testing.wait_all_tasks_blocked()
        others.start_soon(small)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # it would fit, but waits behind the big one
        big.cancel_scope.cancel()
    # The big one gave up holding nothing, and the small one went at once.
    assert got == [10] and budget.held == 100


def test_try_take_never_waits_and_never_jumps_the_queue() -> None:
    budget = ByteBudget(100)
    assert budget.try_take(60) and budget.held == 60
    assert not budget.try_take(50)  # does not fit
    assert budget.try_take(40) and budget.held == 100
    budget.give_back(100)
    assert budget.try_take(500)  # alone, it goes
    assert not budget.try_take(1)


def test_a_budget_holds_something() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ByteBudget(0)
