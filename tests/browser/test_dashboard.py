"""The dashboard in real headless Chromium against a real `sandboxd serve`.

Each test starts its own daemon (tests/e2e/support.py: a subprocess, specs of `sleep`)
and drives the page as a person would, while other clients (bare websocket peers) change
things behind its back.
"""

from __future__ import annotations

import time
from pathlib import Path

from selenium.webdriver.support.ui import Select

from sandboxd.events import types as ev
from tests.browser.support import Browser
from tests.e2e.support import append_offline, daemon_process, read_log
from tests.gateway.support import trio_peer
from tests.support import TOKENS, eventually, is_paused, proc_state

ALICE, ROOT = TOKENS["alice"], TOKENS["root"]


async def test_the_page_loads_live(browser: Browser, tmp_path: Path) -> None:
    async with daemon_process(tmp_path) as daemon:
        browser.open(daemon.port, ROOT)
        await browser.live()
        assert browser.driver.title == "sandboxd"
        assert browser.text("#who") == "root · admin"
        # The token left the address bar, and is kept for this tab.
        assert browser.js("return location.hash") == ""
        assert browser.js("return sessionStorage.getItem('sandboxd.token')") == ROOT
        assert browser.visible("#empty")
        # The history so far: daemon.started.
        await eventually(lambda: browser.event_seqs() == [1], what="the first event")
        specs = browser.js(
            "return [...document.querySelectorAll('#spec-select option')].map(o => o.value)"
        )
        assert specs == ["sleep", "agent"]
        assert browser.console_errors() == []


async def test_a_sandbox_started_elsewhere_appears_running_within_1_s(
    browser: Browser, tmp_path: Path
) -> None:
    async with daemon_process(tmp_path) as daemon, trio_peer(daemon.url, ROOT) as other:
        browser.open(daemon.port, ROOT)
        await browser.live()
        started = await other.call("sandbox.start", spec_id="sleep")
        # From the reply (sent once RUNNING is durable) to the row on screen.
        await eventually(
            lambda: browser.status_of(started["id"]) == "RUNNING",
            within=1.0,
            what="the sandbox, RUNNING, on the page",
        )
        row = f"tr[data-id='{started['id']}']"
        assert browser.text(f"{row} td:nth-child(3)") == "sleep"
        assert browser.text(f"{row} td:nth-child(4)") == "root"
        assert browser.text(f"{row} td:nth-child(6)") == str(started["port"])
        link = browser.find(f"{row} td.urls a")
        assert link.get_attribute("href") == started["exposed_urls"][0]["url"] + "/"
        assert browser.text("#count-RUNNING") == "1"

        # The event list, filtered by type, then by sandbox.
        def shown() -> list[tuple[str, str | None]]:
            return [
                (t, s)
                for t, s in browser.js(
                    "return [...document.querySelectorAll('#events li')]"
                    ".map(li => [li.dataset.type, li.querySelector('.sid')?.textContent ?? null])"
                )
            ]

        await eventually(lambda: len(shown()) == 4, what="daemon.started and three events")
        Select(browser.find("#event-type")).select_by_value("sandbox.running")
        assert shown() == [("sandbox.running", started["id"])]
        Select(browser.find("#event-type")).select_by_value("")
        browser.find("#event-sandbox").send_keys(started["id"][:6])
        assert [t for t, _ in shown()] == [
            "sandbox.running",
            "sandbox.process_started",
            "sandbox.created",
        ]
        browser.find("#event-sandbox").send_keys("no-such-sandbox")
        assert shown() == []


async def test_pause_resume_and_delete_from_the_page(browser: Browser, tmp_path: Path) -> None:
    async with daemon_process(tmp_path) as daemon, trio_peer(daemon.url, ROOT) as other:
        started = await other.call("sandbox.start", spec_id="sleep")
        sandbox_id, pid = started["id"], started["pid"]
        browser.open(daemon.port, ROOT)
        await browser.live()
        await eventually(lambda: browser.status_of(sandbox_id) == "RUNNING", what="the row")
        row = f"tr[data-id='{sandbox_id}']"

        browser.find(f"{row} button[data-action=pause]").click()
        await eventually(lambda: browser.status_of(sandbox_id) == "PAUSED", what="PAUSED shown")
        assert (await other.call("sandbox.get", sandbox_id=sandbox_id))["status"] == "PAUSED"
        assert is_paused(pid)  # its cgroup frozen, or stopped (markers)

        browser.find(f"{row} button[data-action=resume]").click()
        await eventually(lambda: browser.status_of(sandbox_id) == "RUNNING", what="RUNNING")
        assert (await other.call("sandbox.get", sandbox_id=sandbox_id))["status"] == "RUNNING"

        # Delete asks first; cancelling changes nothing.
        browser.find(f"{row} button[data-action=delete]").click()
        assert browser.js("return document.getElementById('confirm').open") is True
        assert sandbox_id in browser.text("#confirm-text")
        browser.find("#confirm button[value=cancel]").click()
        assert browser.js("return document.getElementById('confirm').open") is False
        assert (await other.call("sandbox.get", sandbox_id=sandbox_id)) is not None

        browser.find(f"{row} button[data-action=delete]").click()
        browser.find("#confirm-ok").click()
        await eventually(lambda: browser.status_of(sandbox_id) is None, what="the row gone")
        assert (await other.call("sandbox.get", sandbox_id=sandbox_id)) is None
        await eventually(lambda: proc_state(pid) is None, what="the process gone")


async def test_a_start_from_the_page_and_a_refused_one(browser: Browser, tmp_path: Path) -> None:
    async with daemon_process(tmp_path, max_sandboxes_per_user=1) as daemon:
        browser.open(daemon.port, ALICE)
        await browser.live()
        assert browser.text("#who") == "alice · sees own sandboxes"
        browser.find("#start").click()
        await eventually(lambda: list(browser.rows().values()) == ["RUNNING"], what="a start")
        browser.find("#start").click()
        # The daemon's own message, on screen.
        await eventually(
            lambda: "max_sandboxes_per_user" in browser.text("#toasts"),
            what="the refusal's message",
        )
        assert len(browser.rows()) == 1


async def test_a_user_sees_only_its_own(browser: Browser, tmp_path: Path) -> None:
    async with (
        daemon_process(tmp_path) as daemon,
        trio_peer(daemon.url, ROOT) as root,
        trio_peer(daemon.url, ALICE) as alice,
    ):
        roots = await root.call("sandbox.start", spec_id="sleep")
        alices = await alice.call("sandbox.start", spec_id="sleep")
        browser.open(daemon.port, ALICE)
        await browser.live()
        await eventually(lambda: alices["id"] in browser.rows(), what="alice's sandbox")
        await root.call("sandbox.pause", sandbox_id=roots["id"])
        await alice.call("sandbox.pause", sandbox_id=alices["id"])
        await eventually(lambda: browser.status_of(alices["id"]) == "PAUSED", what="PAUSED")
        assert list(browser.rows()) == [alices["id"]]
        shown = browser.js(
            "return [...document.querySelectorAll('#events li')]"
            ".map(li => li.querySelector('.sid')?.textContent ?? li.dataset.type)"
        )
        assert shown and set(shown) == {alices["id"]}  # no daemon.* events, no root's


async def test_one_sandbox_s_page_shows_its_events_and_output(
    browser: Browser, tmp_path: Path
) -> None:
    async with daemon_process(tmp_path) as daemon, trio_peer(daemon.url, ROOT) as other:
        agent = await other.call("sandbox.start", spec_id="agent")
        await other.call("sandbox.start", spec_id="sleep")
        browser.open(daemon.port, ROOT)
        await browser.live()
        await eventually(lambda: len(browser.rows()) == 2, what="two rows")
        browser.find(f"tr[data-id='{agent['id']}'] td.id a").click()
        await eventually(lambda: browser.visible("#detail-view"), what="the sandbox's page")
        assert not browser.visible("#list-view")
        assert browser.text("#detail-title") == agent["id"]
        # Its output: the agent server says where it listens.
        await eventually(
            lambda: (
                f"listening on http://127.0.0.1:{agent['port']}" in browser.text("#detail-output")
            ),
            what="its output",
        )

        def types() -> list[str]:
            return list(
                browser.js(
                    "return [...document.querySelectorAll('#detail-events li')]"
                    ".map(li => li.dataset.type)"
                )
            )

        # Its events only, newest first, live.
        await eventually(
            lambda: types() == ["sandbox.running", "sandbox.process_started", "sandbox.created"],
            what="its history",
        )
        await other.call("sandbox.pause", sandbox_id=agent["id"])
        await eventually(lambda: types()[0] == "sandbox.paused", what="a live event")
        await eventually(lambda: browser.text("#detail-status") == "PAUSED", what="its status")
        browser.find("#detail-view a.back").click()
        await eventually(lambda: browser.visible("#list-view"), what="the list again")


async def test_a_wrong_token_shows_the_error(browser: Browser, tmp_path: Path) -> None:
    async with daemon_process(tmp_path) as daemon:
        browser.open(daemon.port, "not-a-token-of-this-daemon")
        await eventually(lambda: browser.conn_state() == "refused", what="the refusal")
        assert browser.visible("#login-error")
        assert "refused this token" in browser.text("#login-error")
        assert not browser.visible("#app")
        # The right one, entered in the form, works.
        browser.find("#token-input").send_keys(ROOT)
        browser.find("#login-form button").click()
        await browser.live()
        assert browser.js("return sessionStorage.getItem('sandboxd.token')") == ROOT


async def test_the_event_list_continues_without_a_gap_after_the_daemon_restarts(
    browser: Browser, tmp_path: Path
) -> None:
    async with daemon_process(tmp_path) as daemon:
        async with trio_peer(daemon.url, ROOT) as other:
            first = await other.call("sandbox.start", spec_id="sleep")
        browser.open(daemon.port, ROOT)
        await browser.live()
        await eventually(lambda: browser.status_of(first["id"]) == "RUNNING", what="the row")

        daemon.kill()
        await eventually(lambda: browser.conn_state() == "offline", what="the page to notice")
        await eventually(
            lambda: "cannot be reached" in browser.text("#banner"), what="the daemon is gone"
        )
        await daemon.start()
        async with trio_peer(daemon.url, ROOT) as other:
            second = await other.call("sandbox.start", spec_id="sleep")
            await other.call("sandbox.pause", sandbox_id=first["id"])
        await browser.live()
        await eventually(lambda: browser.status_of(second["id"]) == "RUNNING", what="new row")
        await eventually(lambda: browser.status_of(first["id"]) == "PAUSED", what="update")
        head = read_log(daemon.state_dir)[-1].seq
        await eventually(lambda: browser.event_seqs()[:1] == [head], what="the newest event")
        # Every event of the log, once, newest first: nothing lost while the daemon was
        # down and the page reconnected, nothing shown twice.
        assert browser.event_seqs() == list(range(head, 0, -1))
        assert not browser.visible("#banner")


async def test_1000_sandboxes_render_in_under_1_s_and_rows_update_in_place(
    browser: Browser, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    # 1,000 sandboxes in the log, as fast as one batch can put them there; with no
    # process behind them the daemon marks them MISSING when it starts.
    await append_offline(
        state_dir,
        [
            ev.PendingEvent(
                f"load-{i:04d}",
                "bob",
                ev.SandboxCreated(
                    "sleep", "bob", str(state_dir / "sandboxes" / f"load-{i:04d}"), 20000 + i
                ),
            )
            for i in range(1000)
        ],
    )
    async with (
        daemon_process(tmp_path, max_sandboxes=2000) as daemon,
        trio_peer(daemon.url, ROOT) as other,
    ):
        live = await other.call("sandbox.start", spec_id="sleep")
        browser.open(daemon.port, ROOT)
        await browser.live(within=30)
        rows = browser.rows()
        assert len(rows) == 1001 and rows[live["id"]] == "RUNNING"
        assert next(iter(rows)) == live["id"]  # newest first
        await eventually(
            lambda: browser.js("return performance.getEntriesByName('sandboxes-painted').length"),
            what="the rows painted",
        )
        mark = browser.js(
            "const m = performance.getEntriesByName('sandboxes-rendered')[0];"
            " const p = performance.getEntriesByName('sandboxes-painted')[0];"
            " return {at: m.startTime, paintedMs: p.detail.ms, ...m.detail}"
        )
        # The table itself: 1,001 rows built, laid out and painted in under a second,
        # measured in the page from the last search reply to the first frame after the
        # rows are in the DOM (here about 20-40 ms to build them). The whole load, the
        # page and 11 search round trips included (here about 0.3-0.5 s), gets a generous
        # bound: this machine's two cores are shared with the rest of the suite.
        assert mark["rows"] == 1001
        assert mark["renderMs"] < 1000 and mark["paintedMs"] < 1000, mark
        assert mark["at"] < 10_000, mark

        # Live changes update the rows in place: the same element, its status redrawn.
        browser.js(
            "window.probe = document.querySelector(`tr[data-id='${arguments[0]}']`)", live["id"]
        )
        started = time.monotonic()
        await other.call("sandbox.pause", sandbox_id=live["id"])
        await other.call("sandbox.delete", sandbox_id="load-0500")
        await eventually(lambda: browser.status_of(live["id"]) == "PAUSED", what="PAUSED")
        await eventually(lambda: "load-0500" not in browser.rows(), what="a row removed")
        assert time.monotonic() - started < 5
        assert browser.js(
            "return window.probe === document.querySelector(`tr[data-id='${arguments[0]}']`)",
            live["id"],
        )
        assert browser.text("#count-ALL") == "1000"
        assert browser.text("#count-MISSING") == "999"
