"""The one door between trio and nats-py: an asyncio loop in its own thread.

nats-py is asyncio; sandboxd is trio. Rather than run the daemon under
trio-asyncio (every trio task would pay for the translation layer, and the
two loops' cancellation would have to agree everywhere), nats-py gets an
asyncio loop of its own in one daemon thread, and this module is the only
place that crosses over:

- ``Bridge.run(fn, *args)`` runs the coroutine ``fn(*args)`` on that loop and
  parks the calling trio task until it is done (a trio cancellation cancels
  the asyncio side and is raised once the coroutine has stopped);
- ``Bridge.call(fn, *args)`` does the same for a plain thread (the offline
  audit commands, which have no trio run);
- asyncio callbacks hand results to trio through the trio token
  (``run_sync_soon``), never by touching trio objects from the other thread.

Measured (``python -m sandboxd.events.nats.bridge``, this machine, 2 shared
cores, idle): a no-op ``run`` costs two cross-thread
wake-ups (the asyncio loop's self-pipe, then trio's wake-up fd): 55 to 80 µs
over three runs, so 12k to 18k calls/s from one task. That is why the
JetStream log crosses once per *batch* of appends (``Nats.publish_each``),
not once per append, and its acks come back once per turn of the asyncio
loop, for every batch in flight: at 256 appends in flight the bridge's share
per append is a fraction of a microsecond.

``Nats`` is the connection, with the trio-facing operations both the log and
the cluster's node layer use: core publish/request/subscribe, JetStream
publish (one or an atomic batch, with expected-last-subject-sequence
headers), announcements of what was stored, the batch direct get that reads
history, an ordered consumer from a sequence, and key-value buckets with a TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import attrs
import nats
import nats.errors
import nats.js.api
import nats.js.errors
import orjson
import outcome
import trio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from sandboxd.events.errors import LogUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

#: The server's error codes for a failed Nats-Expected-Last-(Subject-)Sequence check
#: ("wrong last sequence: N", and the same without N).
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
#: The server's error code for "JetStream temporarily unavailable" (no meta leader yet).
TEMPORARILY_UNAVAILABLE = 10008
#: ... and for "no suitable peers for placement": "not now" when it adds "peer offline" (a
#: replica's server is down, or the cluster is still forming: a cluster that is starting
#: answers it for seconds), for good otherwise (more replicas asked than servers).
NO_PEERS = 10005


class NatsUnavailable(LogUnavailable):
    """NATS did not answer (not connected, timed out, no stream leader): try later."""


class WrongLastSequence(Exception):
    """A conditional publish was refused: the subject's last sequence was not the one expected."""


class Bridge:
    """An asyncio event loop running in a daemon thread of its own, until ``close``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._serve, name="sandboxd-nats-asyncio", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def run(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the asyncio loop; wait for it in trio."""
        future = asyncio.run_coroutine_threadsafe(_coroutine(fn, *args, **kwargs), self.loop)
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        raise_cancel: list[trio.lowlevel.RaiseCancelT] = []

        def done(_: object) -> None:
            if raise_cancel and future.cancelled():
                result: outcome.Outcome[Any] = outcome.capture(raise_cancel[0])
            else:
                result = outcome.capture(future.result)
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        def abort(cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            # The coroutine may be mid-way: let it unwind on its loop, then raise.
            raise_cancel.append(cancel)
            future.cancel()
            return trio.lowlevel.Abort.FAILED

        future.add_done_callback(done)
        value: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return value

    def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the asyncio loop from a plain thread; block for it."""
        return asyncio.run_coroutine_threadsafe(_coroutine(fn, *args, **kwargs), self.loop).result()

    def close(self) -> None:
        """Stop the loop and wait for its thread (after what ran on it has been closed)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()


async def _coroutine(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    return await fn(*args, **kwargs)


@attrs.frozen
class StreamMessage:
    """One stored message of a stream: where it is, and what it holds."""

    seq: int
    subject: str
    data: bytes
    msg_id: str | None = None  # its Nats-Msg-Id: who sent it, when it was this node


@attrs.frozen
class KvEntry:
    key: str
    value: bytes
    revision: int


class Nats:
    """One nats-py connection on a bridge's loop, used from trio. Made by ``connect``."""

    def __init__(self, bridge: Bridge, client: NatsClient, servers: Sequence[str]) -> None:
        self.bridge = bridge
        self.client = client
        self.js = client.jetstream()
        self.servers = tuple(servers)
        self._acks: _Acks | None = None  # the JetStream acks' subscription, made by connect()
        self._outbox: list[tuple[Callable[[list[Any]], None], list[Any]]] = []
        self._announced: dict[str, int] = {}  # subject -> the highest seq to announce on it
        self._quiet: set[asyncio.Task[None]] = set()

    async def _subscribe_acks(self) -> None:
        acks = _Acks(self.client.new_inbox())
        await self._run(self.client.subscribe, f"{acks.prefix}.*", cb=acks.on_ack)
        self._acks = acks

    @property
    def connected(self) -> bool:
        return bool(self.client.is_connected)

    # -- core NATS --------------------------------------------------------------------

    async def publish(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        await self._run(self.client.publish, subject, data, headers=dict(headers or {}) or None)

    async def request(self, subject: str, data: bytes, answer_within: float) -> Msg:
        """One request, one reply; ``NatsUnavailable`` if none comes within ``answer_within`` s."""
        return await self._run(self.client.request, subject, data, timeout=answer_within)

    async def respond(self, message: Msg, data: bytes) -> None:
        await self._run(message.respond, data)

    async def flush(self, answer_within: float = 5.0) -> None:
        """Wait until the server has processed everything sent so far (a subscription
        made just before is in place once this returns)."""
        await self._run(self.client.flush, timeout=answer_within)  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def subscribe(
        self, subject: str, *, queue: str = "", buffer: int = 1024
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Msg]]:
        """The messages of ``subject`` as a trio channel, while the block runs.

        At most ``buffer`` messages wait in trio for the reader; past that the
        newest are dropped (and logged): core NATS is at-most-once anyway, and a
        reader that does not keep up must not grow the daemon's memory.
        """
        send, receive = trio.open_memory_channel[Msg](buffer)
        token = trio.lowlevel.current_trio_token()

        def deliver(message: Msg) -> None:
            try:
                send.send_nowait(message)
            except trio.WouldBlock:
                logger.warning("%s: the reader is %d messages behind; dropped one", subject, buffer)
            except trio.ClosedResourceError:
                pass

        async def on_message(message: Msg) -> None:
            token.run_sync_soon(deliver, message)

        sub = await self._run(self.client.subscribe, subject, queue=queue, cb=on_message)
        try:
            with receive:
                yield receive
        finally:
            send.close()
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._run(sub.unsubscribe)

    # -- JetStream --------------------------------------------------------------------

    async def ensure_stream(self, config: nats.js.api.StreamConfig) -> nats.js.api.StreamInfo:
        """Create the stream, or check that the existing one has the same subjects."""

        async def ensure() -> nats.js.api.StreamInfo:
            assert config.name is not None
            try:
                info = await self.js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                return await self.js.add_stream(config)
            return info

        return await self._run(ensure)

    async def publish_many(
        self, items: Sequence[tuple[str, bytes, Mapping[str, str]]], answer_within: float
    ) -> list[int | BaseException]:
        """JetStream-publish each (subject, data, headers) at once; each one's seq or error.

        One bridge crossing for the lot: they are all in flight together, and
        each is answered on its own (a refused one does not fail the others).
        """

        async def publish_all() -> list[int | BaseException]:
            # Each a request of its own on nats-py's shared reply subscription: a refused
            # one gets its error back (publish_async would hand it to error_cb instead).
            done = await asyncio.gather(
                *(
                    self.js.publish(
                        subject, data, timeout=answer_within, headers=dict(headers) or None
                    )
                    for subject, data, headers in items
                ),
                return_exceptions=True,
            )
            return [r.seq if isinstance(r, nats.js.api.PubAck) else _translate(r) for r in done]

        return await self._run(publish_all)

    async def publish_each(
        self,
        items: Sequence[tuple[str, bytes, Mapping[str, str]]],
        answer_within: float,
        on_results: Callable[[list[tuple[int, int | BaseException]]], None],
        *,
        announce: str | None = None,
    ) -> None:
        """JetStream-publish each (subject, data, headers) at once, and tell ``on_results``
        (on the trio thread) each one's index and seq, or error, as soon as it comes: a
        slow ack does not hold up the others. Returns once every one has been told (one
        that had no answer within ``answer_within`` s: ``NatsUnavailable``).

        One bridge crossing out for the lot, and one back per turn of the asyncio loop
        that received acks (for every batch in flight, not one per batch or per ack).
        The acks come to one subscription of this connection's (``_Acks``), not as
        nats-py's ``js.publish`` requests: no task, timer and random token per message.

        ``announce``: a core NATS subject on which the highest seq acknowledged in a turn
        is published, once per turn (``announcements`` hears it elsewhere).
        """
        token = trio.lowlevel.current_trio_token()
        acks = self._acks
        assert acks is not None, "made by connect()"
        tell_trio = functools.partial(self._to_trio, token, on_results, announce)

        async def publish_all() -> None:
            batch = acks.open(len(items), tell_trio)
            try:
                for i, (subject, data, headers) in enumerate(items):
                    reply = acks.reply_to(batch, i)
                    try:
                        await self.client.publish(
                            subject, data, reply=reply, headers=dict(headers) or None
                        )
                    except Exception as exc:  # not connected, its buffer full: not sent
                        acks.withdraw(batch)
                        for j in range(i, len(items)):
                            batch.tell(j, _translate(exc))
                        break
                if batch.left:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(batch.done), answer_within)
            finally:
                acks.close(
                    batch, NatsUnavailable(f"NATS did not answer within {answer_within:g} s")
                )
                # Every result is queued for trio before this call's return is (FIFO).
                batch.flush()
                self._hand_over(token)

        await self._run(publish_all)

    def _to_trio(
        self,
        token: trio.lowlevel.TrioToken,
        on_results: Callable[[list[tuple[int, int | BaseException]]], None],
        announce: str | None,
        results: list[tuple[int, int | BaseException]],
    ) -> None:
        """On the asyncio thread: hand ``results`` to ``on_results`` on the trio thread,
        with whatever else is handed over in this turn of the loop, in one wake-up."""
        if not self._outbox:
            self.bridge.loop.call_soon(self._hand_over, token)
        self._outbox.append((on_results, results))
        if announce is not None:
            seqs = [r for _, r in results if type(r) is int]
            if seqs:
                self._announced[announce] = max(self._announced.get(announce, 0), *seqs)

    def _hand_over(self, token: trio.lowlevel.TrioToken) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            token.run_sync_soon(_tell_all, outbox)
        if self._announced:
            announced, self._announced = self._announced, {}
            for subject, seq in announced.items():
                task = self.bridge.loop.create_task(self._publish_quietly(subject, b"%d" % seq))
                self._quiet.add(task)  # held until done: the loop keeps only weak references
                task.add_done_callback(self._quiet.discard)

    async def _publish_quietly(self, subject: str, data: bytes) -> None:
        """A core publish no one waits for: not connected, it is dropped (and said)."""
        try:
            await self.client.publish(subject, data)
        except Exception as exc:
            logger.debug("could not publish on %s: %r", subject, exc)

    @contextlib.asynccontextmanager
    async def announcements(
        self, subject: str, own: str, on_seq: Callable[[int], None]
    ) -> AsyncIterator[None]:
        """While the block runs, tell ``on_seq`` (on the trio thread) the highest seq
        announced on ``subject`` (a wildcard) since it was last told, at most once per turn
        of the asyncio loop; what comes on ``own`` (this node's announcements) is dropped
        there, without crossing. Core NATS: an announcement may be lost (not connected);
        the caller looks for itself now and then."""
        token = trio.lowlevel.current_trio_token()
        loop = self.bridge.loop
        highest = [0]  # announced, not yet handed over

        def hand_over() -> None:
            seq, highest[0] = highest[0], 0
            token.run_sync_soon(on_seq, seq)

        async def on_message(message: Msg) -> None:
            if message.subject == own:
                return
            try:
                seq = int(message.data)
            except ValueError:
                return
            if not highest[0]:
                loop.call_soon(hand_over)
            highest[0] = max(highest[0], seq)

        sub = await self._run(self.client.subscribe, subject, cb=on_message)
        try:
            await self.flush()  # in place at the server: nothing announced from now is missed
            yield
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._run(sub.unsubscribe)

    async def publish_atomic(
        self,
        items: Sequence[tuple[str, bytes, Mapping[str, str]]],
        answer_within: float,
        *,
        announce: str | None = None,
    ) -> int:
        """Publish a batch that the stream stores all together or not at all (atomic batch
        publish, nats-server 2.12+, the stream's ``allow_atomic``); return its last seq,
        announced on ``announce`` if given (as ``publish_each`` does)."""
        batch_id = self.client.new_inbox().rsplit(".", 1)[-1]

        async def publish_batch() -> int:
            last = len(items)
            for i, (subject, data, headers) in enumerate(items, 1):
                header = {**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
                if i < last:
                    await self.client.publish(subject, data, headers=header)
                    continue
                header["Nats-Batch-Commit"] = "1"
                reply = await self.client.request(
                    subject, data, timeout=answer_within, headers=header
                )
                answer = json.loads(reply.data)
                if "error" in answer:
                    raise nats.js.errors.APIError.from_error(answer["error"])
                seq = int(answer["seq"])
                if announce is not None:
                    await self._publish_quietly(announce, b"%d" % seq)
                return seq
            raise ValueError("an atomic batch needs at least one message")

        return await self._run(publish_batch)

    async def direct_batch(
        self, stream: str, first_seq: int, count: int, max_bytes: int, answer_within: float = 5.0
    ) -> list[StreamMessage]:
        """Up to ``count`` stored messages from ``first_seq`` on, in one round trip
        (a batched direct get: the stream needs ``allow_direct``). Fewer, or none,
        when the stream ends sooner or the answering replica has not caught up."""

        async def fetch() -> list[StreamMessage]:
            found: list[StreamMessage] = []
            inbox = self.client.new_inbox()
            sub = await self.client.subscribe(inbox)
            try:
                body = {"seq": first_seq, "batch": count, "max_bytes": max_bytes}
                await self.client.publish(
                    f"$JS.API.DIRECT.GET.{stream}", json.dumps(body).encode(), reply=inbox
                )
                while True:
                    message = await sub.next_msg(timeout=answer_within)
                    headers = message.headers or {}
                    status = headers.get("Status")
                    if status is not None:  # 204: end of batch; 404: nothing there (yet)
                        if status in ("204", "404"):
                            return found
                        raise NatsUnavailable(f"direct get: {_status(headers)}")
                    found.append(
                        StreamMessage(
                            int(headers["Nats-Sequence"]),
                            headers["Nats-Subject"],
                            message.data,
                            headers.get("Nats-Msg-Id"),
                        )
                    )
            finally:
                await sub.unsubscribe()

        return await self._run(fetch)

    async def last_on_subject(self, stream: str, subject: str, answer_within: float = 5.0) -> int:
        """The seq of the last message on ``subject`` in ``stream``; 0 if it has none."""

        async def fetch() -> int:
            body = json.dumps({"last_by_subj": subject}).encode()
            reply = await self.client.request(
                f"$JS.API.DIRECT.GET.{stream}", body, timeout=answer_within
            )
            headers = reply.headers or {}
            status = headers.get("Status")
            if status == "404":
                return 0
            if status is not None:
                raise NatsUnavailable(f"direct get: {_status(headers)}")
            return int(headers["Nats-Sequence"])

        return await self._run(fetch)

    @contextlib.asynccontextmanager
    async def ordered_consumer(
        self,
        stream: str,
        subject: str,
        start_seq: int,
        on_messages: Callable[[list[StreamMessage]], None],
        *,
        idle_heartbeat: float = 1.0,
        in_hand: int = 65536,
    ) -> AsyncIterator[None]:
        """Deliver every message of ``stream`` from ``start_seq`` on, in order, while the
        block runs: ``on_messages`` is called on the trio thread with batches of them.

        nats-py's ordered consumer: an ephemeral push consumer that is made again
        from the last delivered seq whenever a delivery is missed or two idle
        heartbeats go by (so within ``2 * idle_heartbeat`` seconds of losing the
        server it lived on). Messages are handed to trio in batches: the
        asyncio side queues them and schedules one trio call per wake-up.

        Memory stays bounded if trio falls behind: once ``in_hand`` messages are
        handed over and not yet taken, the asyncio side stops taking more; nats-py
        then stops answering the consumer's flow control, and the server stops
        sending until it does (the consumer is made with flow control on).
        """
        token = trio.lowlevel.current_trio_token()
        pending: list[StreamMessage] = []
        counts = [0, 0]  # taken in (written by the asyncio thread), taken out (by trio's)
        room = asyncio.Event()  # cleared only while this waits; set by trio once it took
        room.set()
        loop = self.bridge.loop

        def take(batch: list[StreamMessage]) -> None:  # on the trio thread
            counts[1] += len(batch)
            on_messages(batch)
            if not room.is_set():
                loop.call_soon_threadsafe(room.set)

        def hand_over() -> None:  # on the asyncio thread, once per loop turn with messages
            batch = pending.copy()
            pending.clear()
            token.run_sync_soon(take, batch)

        async def on_message(message: Msg) -> None:
            while counts[0] - counts[1] >= in_hand:  # trio is behind: let it catch up
                room.clear()
                if counts[0] - counts[1] < in_hand:  # it took some meanwhile
                    break
                await room.wait()
            if not pending:
                loop.call_soon(hand_over)
            counts[0] += 1
            seq = message.metadata.sequence.stream
            msg_id = message.headers.get("Nats-Msg-Id") if message.headers else None
            pending.append(StreamMessage(seq, message.subject, message.data, msg_id))

        sub = await self._run(
            self.js.subscribe,
            subject,
            stream=stream,
            cb=on_message,
            ordered_consumer=True,
            idle_heartbeat=idle_heartbeat,
            deliver_policy=nats.js.api.DeliverPolicy.BY_START_SEQUENCE,
            config=nats.js.api.ConsumerConfig(opt_start_seq=start_seq),
            # No limit here: a drop would leave a gap that nats-py's ordered consumer does
            # not always notice. The server's flow control bounds what waits instead: it
            # stops sending until nats-py has passed on what it sent.
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        try:
            yield
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._run(sub.unsubscribe)

    async def key_value(self, bucket: str, *, ttl: float, replicas: int) -> Kv:
        """The key-value bucket ``bucket`` (made if need be) whose entries live ``ttl`` s."""

        async def open_bucket() -> KeyValue:
            try:
                return await self.js.key_value(bucket)
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
                return await self.js.create_key_value(
                    nats.js.api.KeyValueConfig(bucket=bucket, ttl=ttl, replicas=replicas, history=1)
                )

        return Kv(self, await self._run(open_bucket))

    # -- every crossing ---------------------------------------------------------------

    async def _run(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await self.bridge.run(fn, *args, **kwargs)
        except Exception as exc:
            raise _translate(exc) from exc


async def patiently(call: Callable[[], Awaitable[T]], *, within: float, what: str) -> T:
    """``call()``, tried again while NATS answers "not now", for up to ``within`` s.

    For what a daemon does once at start (make its stream, take its lease): the
    servers may be starting too, and a cluster answers "no meta leader" or "peer
    offline" for seconds while it forms. Past ``within``, ``NatsUnavailable``
    saying what could not be done and NATS's last answer.
    """
    failure: NatsUnavailable | None = None
    with trio.move_on_after(within):
        while True:
            try:
                return await call()
            except NatsUnavailable as exc:
                failure = exc
                await trio.sleep(0.25)  # NATS's state, asked again: nothing to wait on
    raise NatsUnavailable(f"{what} within {within:g} s: {failure or 'NATS did not answer'}")


def _tell_all(outbox: list[tuple[Callable[[list[Any]], None], list[Any]]]) -> None:
    for on_results, results in outbox:
        on_results(results)


class _Batch:
    """One ``publish_each`` call's messages: the results not yet handed over, and how many
    are still unanswered."""

    __slots__ = ("done", "left", "results", "tell_trio")

    def __init__(self, size: int, tell_trio: Callable[[list[tuple[int, Any]]], None]) -> None:
        self.left = size
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.results: list[tuple[int, int | BaseException]] = []
        self.tell_trio = tell_trio

    def tell(self, i: int, result: int | BaseException) -> None:
        if not self.results:  # the first of this turn: one hand-over for the turn's lot
            asyncio.get_running_loop().call_soon(self.flush)
        self.results.append((i, result))
        self.left -= 1
        if not self.left and not self.done.done():
            self.done.set_result(None)

    def flush(self) -> None:
        if self.results:
            results, self.results = self.results, []
            self.tell_trio(results)


class _Acks:
    """The acks of every JetStream publish of one connection, on one subscription.

    Each message goes with the reply subject ``PREFIX.N`` (N counts up for the
    connection's life), and the server's ack (a PubAck, or an error) comes back to
    the wildcard subscription on ``PREFIX.*``, which finds the message's batch by N.
    An ack that comes after its batch gave up (``close``) finds none and is dropped:
    the message is sent again with the same ``Nats-Msg-Id``, and the stream answers
    that with the seq it stored it at.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._cut = len(prefix) + 1
        self._waiting: dict[int, tuple[_Batch, int]] = {}
        self._count = 0
        self._of_batch: dict[_Batch, list[int]] = {}

    def open(self, size: int, tell_trio: Callable[[list[tuple[int, Any]]], None]) -> _Batch:
        batch = _Batch(size, tell_trio)
        self._of_batch[batch] = []
        return batch

    def reply_to(self, batch: _Batch, i: int) -> str:
        self._count += 1
        self._waiting[self._count] = (batch, i)
        self._of_batch[batch].append(self._count)
        return f"{self.prefix}.{self._count}"

    def withdraw(self, batch: _Batch) -> None:
        """The batch's last message was not sent after all: no answer is waited for."""
        self._waiting.pop(self._of_batch[batch].pop(), None)

    def close(self, batch: _Batch, unanswered: BaseException) -> None:
        """Forget the batch; tell each of its messages still unanswered ``unanswered``."""
        for n in self._of_batch.pop(batch):
            entry = self._waiting.pop(n, None)
            if entry is not None:
                batch.tell(entry[1], unanswered)

    def lost(self, error: BaseException) -> None:
        """The connection is lost: no message sent on it will be answered now (a message
        the stream stored meanwhile is answered with its seq when it is sent again). Each
        one still waiting is told ``error`` at once, not when its batch gives up: so its
        try ends, and it goes again on the next connection, without waiting out a timeout
        (a server killed under a node cost its appends that timeout, 1 s, before)."""
        waiting, self._waiting = self._waiting, {}
        for batch, i in waiting.values():
            batch.tell(i, error)

    async def on_ack(self, message: Msg) -> None:
        try:
            n = int(message.subject[self._cut :])
        except ValueError:
            return
        entry = self._waiting.pop(n, None)
        if entry is None:
            return  # its batch gave up on it
        batch, i = entry
        batch.tell(i, _pub_ack(message))


def _status(headers: Mapping[str, str]) -> str:
    """A status answer's code and description, on one line (a 503 of a direct get has the
    rest of its headers after an empty description)."""
    description = headers.get("Description", "").strip().split("\n", 1)[0].strip()
    return f"{headers.get('Status')} {description}".strip()


def _pub_ack(message: Msg) -> int | BaseException:
    """The seq a JetStream publish's answer gives, or its error (as ``_translate`` has it)."""
    if message.headers and message.headers.get("Status") == "503":
        return NatsUnavailable("NATS did not answer: no stream takes this subject now")
    try:
        answer = orjson.loads(message.data)
        if "error" in answer:
            nats.js.errors.APIError.from_error(answer["error"])  # raises it
        return int(answer["seq"])
    except Exception as exc:
        return _translate(exc)


class Kv:
    """A key-value bucket, used from trio: what leases need."""

    def __init__(self, nats_: Nats, kv: KeyValue) -> None:
        self._nats = nats_
        self._kv = kv

    async def get(self, key: str) -> KvEntry | None:
        async def get() -> KvEntry | None:
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                return None
            return KvEntry(key, entry.value or b"", entry.revision or 0)

        return await self._nats._run(get)

    async def create(self, key: str, value: bytes) -> int:
        """Put ``key`` only if it is absent (or deleted, or expired); its revision."""
        return await self._nats._run(self._kv.create, key, value)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Put ``key`` only if its revision is still ``revision``; the new revision."""
        return await self._nats._run(self._kv.update, key, value, last=revision)

    async def put(self, key: str, value: bytes) -> int:
        return await self._nats._run(self._kv.put, key, value)

    async def delete(self, key: str) -> None:
        await self._nats._run(self._kv.delete, key)

    async def keys(self) -> list[str]:
        async def keys() -> list[str]:
            try:
                return list(await self._kv.keys())
            except nats.js.errors.NoKeysError:
                return []

        return await self._nats._run(keys)


def _translate(exc: BaseException) -> BaseException:
    """nats-py's errors as the two this package's callers tell apart."""
    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or (
        isinstance(exc, nats.js.errors.APIError)
        and getattr(exc, "err_code", None) in WRONG_LAST_SEQUENCE
    ):
        return WrongLastSequence(getattr(exc, "description", None) or "wrong last sequence")
    if isinstance(exc, nats.js.errors.APIError):
        code, description = getattr(exc, "err_code", None), getattr(exc, "description", "")
        if code == TEMPORARILY_UNAVAILABLE or (code == NO_PEERS and "offline" in description):
            return NatsUnavailable(f"NATS cannot do it now: {description}")
    if isinstance(
        exc,
        asyncio.TimeoutError
        | nats.errors.TimeoutError
        | nats.errors.ConnectionClosedError
        | nats.errors.NoRespondersError
        | nats.errors.OutboundBufferLimitError
        | nats.errors.StaleConnectionError
        | nats.js.errors.NoStreamResponseError
        | nats.js.errors.ServiceUnavailableError,
    ):
        return NatsUnavailable(f"NATS did not answer: {type(exc).__name__} {exc}".strip())
    return exc


@contextlib.asynccontextmanager
async def connect(
    servers: Sequence[str],
    *,
    credentials: Path | None = None,
    name: str = "sandboxd",
    connect_timeout: float = 2.0,
) -> AsyncIterator[Nats]:
    """A bridge and a connection to one of ``servers``, reconnecting for as long as it is open.

    Raises ``NatsUnavailable`` naming the servers if none answers at first. Once
    connected, a lost server is left for another (or the same, when it is back):
    nats-py reconnects on its own; what is in flight meanwhile fails with
    ``NatsUnavailable`` (its publish buffer is kept small, so nothing waits long).
    """
    bridge = Bridge()
    try:

        async def on_error(exc: Exception) -> None:
            logger.warning("NATS: %s", exc or type(exc).__name__)

        async def on_disconnected() -> None:
            if connection is not None and connection._acks is not None:
                # What was sent on the lost connection is answered there or not at all.
                connection._acks.lost(NatsUnavailable("NATS did not answer: connection lost"))
            if closing:
                return
            logger.warning("NATS: disconnected from %s; reconnecting", ", ".join(servers))

        async def on_reconnected() -> None:
            url = client.connected_url if client is not None else None
            logger.info("NATS: reconnected to %s", url.netloc if url is not None else "?")

        client: NatsClient | None = None
        connection: Nats | None = None
        closing = False
        try:
            client = await bridge.run(
                nats.connect,
                servers=list(servers),
                name=name,
                user_credentials=str(credentials) if credentials else None,
                connect_timeout=connect_timeout,
                reconnect_time_wait=0.25,
                # At first each server is tried twice, then the error is the caller's;
                # once connected, reconnecting never stops (set just below).
                max_reconnect_attempts=1,
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                pending_size=8 << 20,
            )
        except Exception as exc:
            raise NatsUnavailable(
                f"cannot connect to NATS at {', '.join(servers)}: {exc or type(exc).__name__}"
            ) from None
        client.options["max_reconnect_attempts"] = -1  # nats-py reads it at each reconnect
        connection = Nats(bridge, client, servers)
        try:
            await connection._subscribe_acks()
            yield connection
        finally:
            closing = True
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await bridge.run(client.close)
    finally:
        bridge.close()


def _measure() -> None:
    """Time a no-op round trip through the bridge: the number in the docstring."""

    async def nothing() -> None:
        pass

    async def main() -> None:
        bridge = Bridge()
        try:
            n = 20_000
            started = trio.current_time()
            for _ in range(n):
                await bridge.run(nothing)
            seconds = trio.current_time() - started
            print(json.dumps({"bridge_roundtrip_us": round(seconds / n * 1e6, 1)}))
        finally:
            bridge.close()

    trio.run(main)


if __name__ == "__main__":
    _measure()
