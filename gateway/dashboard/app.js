// The sandboxd dashboard: one page, one websocket, the protocol of docs/protocol.md.
//
// - The sandboxes table is loaded with sandbox.search, then kept live by the event stream:
//   an event marks its sandbox dirty and sandbox.batch_get fetches the new SandboxInfo
//   (rows are updated in place; a row is replaced only by a newer `version`).
// - The event list resumes after a dropped connection with after_seq = the last seq shown,
//   and shows an event only if its seq is above it: no gap, no duplicate.
// - The token comes from #token=... (then removed from the URL) or the form, and is kept
//   in sessionStorage: for this tab only.

import { Client, probe } from "./client.js";
import { STATUS_COLORS, drawRateChart, drawStatusChart } from "./charts.js";

const STATUSES = ["STARTING", "RUNNING", "PAUSED", "ERROR", "MISSING"];
const EVENT_TYPES = [
  "sandbox.created", "sandbox.process_started", "sandbox.running", "sandbox.start_failed",
  "sandbox.paused", "sandbox.resumed", "sandbox.unhealthy", "sandbox.healthy",
  "sandbox.exited", "sandbox.adopted", "sandbox.missing", "sandbox.deleted",
  "sandbox.restarted",
  "daemon.started", "daemon.stopping",
];
const TOKEN_KEY = "sandboxd.token";
const HISTORY = 500; // events of the past shown on first load
const KEEP_EVENTS = 2000; // events kept in memory for the list's filters
const SHOW_EVENTS = 300; // events on screen
const STATUS_SPAN = 300; // seconds of the status chart
const RATE_SPAN = 120; // seconds of the events-per-second chart
const OUTPUT_BYTES = 32768;
const RETRY_FIRST = 250; // ms; doubling up to RETRY_MAX
const RETRY_MAX = 2000;

const $ = (id) => document.getElementById(id);

const page = {
  token: null,
  client: null,
  user: null, // server.info
  generation: 0, // one per connection attempt: stale callbacks check it
  retry: RETRY_FIRST,
  retryTimer: 0,
  // The table.
  rows: new Map(), // id -> {info, tr, cells}
  order: [], // ids, newest first (created_at descending)
  loaded: false,
  baseSeq: 0, // the table's search reflects every event up to here
  dirty: new Map(), // id -> seq of the newest event not yet reflected
  flushing: false,
  // The event stream.
  subscription: null,
  lastSeq: null, // the last seq received: resume after it
  events: [], // oldest first, at most KEEP_EVENTS
  pendingEvents: [], // received, not yet drawn
  // The detail page.
  detail: null, // {id, subscription, lastSeq, timer}
  // Charts.
  samples: [],
  rate: new Map(), // second -> events received
};

// --- Token and connection -------------------------------------------------------------

function takeToken() {
  const match = location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    // Out of the address bar and the history: the fragment's job is done.
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function socketUrl(token) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}/v1?token=${encodeURIComponent(token)}`;
}

function setConn(state, text) {
  const conn = $("conn");
  conn.dataset.state = state;
  $("conn-text").textContent = text;
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

function showLogin(error) {
  $("app").hidden = true;
  $("login").hidden = false;
  $("who").hidden = true;
  $("change-token").hidden = true;
  $("login-error").textContent = error || "";
  $("login-error").hidden = !error;
  setConn(error ? "refused" : "idle", error ? "Token refused" : "Not connected");
  $("token-input").focus();
}

async function connect() {
  clearTimeout(page.retryTimer);
  const generation = ++page.generation;
  const current = () => generation === page.generation;
  setConn("connecting", "Connecting…");
  const client = new Client(socketUrl(page.token), {
    onFrame: (frame) => current() && onFrame(frame),
    onClose: (event) => current() && onLost(`The connection closed (code ${event.code}).`),
  });
  page.client = client;
  try {
    await client.open();
  } catch {
    if (!current()) return;
    const why = await probe(page.token);
    if (!current()) return;
    if (why === "token") {
      sessionStorage.removeItem(TOKEN_KEY);
      page.token = null;
      showLogin("The daemon refused this token (HTTP 401). Check it and enter it again.");
      return;
    }
    onLost(
      why === "unreachable"
        ? `The daemon at ${location.host} cannot be reached.`
        : "The daemon did not accept the connection.",
    );
    return;
  }
  try {
    await start(client, current);
  } catch (error) {
    // A dropped connection has called onLost already; anything else closes it, and the
    // close reconnects.
    if (!current() || error.code === "disconnected") return;
    toast(`Loading failed: ${error.message}`, "error");
    client.close();
  }
}

async function start(client, current) {
  const info = await client.request("server.info");
  if (!current()) return;
  page.user = info;
  $("login").hidden = true;
  $("app").hidden = false;
  $("who").hidden = false;
  $("who").textContent = info.admin
    ? `${info.user ?? "admin"} · admin`
    : `${info.user} · sees own sandboxes`;
  $("who").title = `sandboxd ${info.version}, up since ${info.started_at}`;
  $("change-token").hidden = false;
  if (page.lastSeq !== null && info.head_seq < page.lastSeq) {
    // A restored log: the seqs after its head will be given again.
    page.lastSeq = null;
    page.events = [];
    $("events").replaceChildren();
    toast("The daemon's log is older than what this page showed: the event list starts over.");
  }
  fillSpecs(await client.request("spec.list"));
  // Events first, then the table: whatever the search misses, the stream brings.
  page.subscription = null;
  const after = page.lastSeq ?? Math.max(0, info.head_seq - HISTORY);
  await subscribe(client, after);
  page.baseSeq = info.head_seq;
  await loadSandboxes(client, current);
  if (!current()) return;
  if (page.detail) await openDetail(page.detail.id, true);
  page.retry = RETRY_FIRST;
  showBanner("");
  setConn("live", "Live");
  tick(); // the charts now, not at the next second
}

async function subscribe(client, after) {
  let reply;
  try {
    reply = await client.request("events.subscribe", { after_seq: after });
  } catch (error) {
    if (error.code !== "gone") throw error;
    const oldest = error.extra.oldest_seq;
    toast(`Events ${after + 1} to ${oldest - 1} are no longer in the daemon's log.`);
    reply = await client.request("events.subscribe", { after_seq: oldest - 1 });
  }
  page.subscription = reply.subscription;
}

function onLost(reason) {
  page.client = null;
  page.subscription = null;
  if (page.detail) page.detail.subscription = null;
  const seconds = (page.retry / 1000).toFixed(page.retry < 1000 ? 2 : 0);
  setConn("offline", "Disconnected");
  showBanner(`${reason} Reconnecting in ${seconds} s; the page resumes where it stopped.`);
  page.retryTimer = setTimeout(connect, page.retry);
  page.retry = Math.min(page.retry * 2, RETRY_MAX);
}

// --- Frames ---------------------------------------------------------------------------

function onFrame(frame) {
  if (page.detail && frame.subscription === page.detail.subscription) {
    onDetailFrame(frame);
    return;
  }
  if (frame.subscription !== page.subscription) return;
  if (frame.event) onEvent(frame.event);
  else if (frame.ended) {
    // The daemon stops (or retention overtook us): the close that follows reconnects.
    showBanner(`The daemon ended the event stream: ${frame.reason}.`);
  }
}

function onEvent(event) {
  if (page.lastSeq !== null && event.seq <= page.lastSeq) return; // seen: never twice
  page.lastSeq = event.seq;
  page.events.push(event);
  if (page.events.length > KEEP_EVENTS) page.events.splice(0, page.events.length - KEEP_EVENTS);
  page.pendingEvents.push(event);
  scheduleDraw();
  if (event.seq > page.baseSeq) {
    const second = Math.floor(Date.now() / 1000);
    page.rate.set(second, (page.rate.get(second) || 0) + 1);
    if (event.sandbox_id) sandboxChanged(event);
  }
}

// --- The sandboxes table ----------------------------------------------------------------

async function loadSandboxes(client, current) {
  page.loaded = false; // until then, changes wait in page.dirty
  const started = performance.now();
  const found = [];
  let pageId = null;
  do {
    const params = { limit: 100 };
    if (pageId) params.page_id = pageId;
    const result = await client.request("sandbox.search", params);
    if (!current()) return;
    found.push(...result.items);
    pageId = result.next_page_id;
  } while (pageId);
  const rendering = performance.now();
  const seen = new Set(found.map((info) => info.id));
  for (const id of [...page.rows.keys()]) if (!seen.has(id)) removeRow(id);
  if (page.rows.size === 0) {
    // First load: one fragment, one layout.
    const fragment = document.createDocumentFragment();
    for (const info of found) {
      const row = makeRow(info);
      page.rows.set(info.id, row);
      page.order.push(info.id);
      fragment.appendChild(row.tr);
    }
    $("sandboxes").tBodies[0].appendChild(fragment);
  } else {
    for (const info of found) upsert(info);
  }
  page.loaded = true;
  applyFilter();
  updateCounts();
  performance.mark("sandboxes-rendered", {
    detail: { rows: found.length, fetchMs: rendering - started, renderMs: performance.now() - rendering },
  });
  // And once the browser has laid the rows out and painted them.
  requestAnimationFrame(() =>
    setTimeout(() =>
      performance.mark("sandboxes-painted", { detail: { ms: performance.now() - rendering } }),
    ),
  );
  flushDirty(); // what changed while the table loaded
}

function sandboxChanged(event) {
  const row = page.rows.get(event.sandbox_id);
  if (row && event.seq <= row.info.version) return; // the row says this already
  if (event.type === "sandbox.deleted" && row) {
    removeRow(event.sandbox_id);
    updateCounts();
  }
  // Fetched even when deleted: a search still under way may bring the row back.
  page.dirty.set(event.sandbox_id, Math.max(page.dirty.get(event.sandbox_id) || 0, event.seq));
  flushDirty();
}

// Fetch the SandboxInfo of dirty sandboxes, 100 a request, until none is left.
async function flushDirty() {
  if (page.flushing || !page.loaded || !page.client) return;
  page.flushing = true;
  try {
    while (page.dirty.size && page.client) {
      const batch = [...page.dirty].slice(0, 100);
      for (const [id] of batch) page.dirty.delete(id);
      const infos = await page.client.request("sandbox.batch_get", {
        sandbox_ids: batch.map(([id]) => id),
      });
      infos.forEach((info, i) => {
        const [id, seq] = batch[i];
        if (info) upsert(info);
        else if (page.rows.has(id) && page.rows.get(id).info.version < seq) removeRow(id);
      });
      updateCounts();
      applyFilter();
      if (page.detail) refreshDetailInfo();
    }
  } catch (error) {
    if (error.code !== "disconnected") toast(`Refreshing sandboxes failed: ${error.message}`);
  } finally {
    page.flushing = false;
  }
}

function upsert(info) {
  const row = page.rows.get(info.id);
  if (!row) {
    insertRow(info);
    return;
  }
  if (info.version < row.info.version) return; // an older answer than what is shown
  row.info = info;
  fillRow(row);
}

function insertRow(info) {
  const row = makeRow(info);
  page.rows.set(info.id, row);
  // Newest first: find the first row created before this one.
  let index = page.order.findIndex((id) => page.rows.get(id).info.created_at < info.created_at);
  if (index < 0) index = page.order.length;
  const before = index < page.order.length ? page.rows.get(page.order[index]).tr : null;
  page.order.splice(index, 0, info.id);
  $("sandboxes").tBodies[0].insertBefore(row.tr, before);
}

function removeRow(id) {
  const row = page.rows.get(id);
  if (!row) return;
  row.tr.remove();
  page.rows.delete(id);
  const index = page.order.indexOf(id);
  if (index >= 0) page.order.splice(index, 1);
}

function cell(tr, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  tr.appendChild(td);
  return td;
}

function makeRow(info) {
  const tr = document.createElement("tr");
  tr.dataset.id = info.id;
  const cells = {
    status: cell(tr, "status-cell"),
    id: cell(tr, "id"),
    spec: cell(tr),
    owner: cell(tr),
    age: cell(tr, "num"),
    port: cell(tr, "num"),
    urls: cell(tr, "urls"),
    actions: cell(tr, "actions"),
  };
  const link = document.createElement("a");
  link.href = `#/sandbox/${encodeURIComponent(info.id)}`;
  link.textContent = info.id;
  cells.id.appendChild(link);
  const row = { info, tr, cells, shown: {} };
  fillRow(row);
  return row;
}

// Set only what changed: a row is updated in place, never rebuilt.
function put(row, key, value, draw) {
  if (row.shown[key] === value) return;
  row.shown[key] = value;
  draw(value);
}

function fillRow(row) {
  const { info, cells, tr } = row;
  put(row, "status", info.status, (status) => {
    tr.dataset.status = status;
    cells.status.replaceChildren(statusBadge(status));
  });
  put(row, "error", info.error || "", (error) => {
    cells.status.title = error;
  });
  put(row, "spec", info.sandbox_spec_id, (spec) => {
    cells.spec.textContent = spec;
  });
  put(row, "owner", ownerName(info), (owner) => {
    cells.owner.textContent = owner;
  });
  put(row, "age", age(info.created_at), (text) => {
    cells.age.textContent = text;
  });
  put(row, "port", String(info.port), (port) => {
    cells.port.textContent = port;
  });
  put(row, "urls", JSON.stringify(info.exposed_urls || []), () => {
    cells.urls.replaceChildren(...urlLinks(info.exposed_urls || []));
  });
  put(row, "actions", info.status, (status) => {
    cells.actions.replaceChildren(...actionButtons(info.id, status));
  });
}

function statusBadge(status) {
  const badge = document.createElement("span");
  badge.className = `status status-${status}`;
  badge.textContent = status;
  return badge;
}

function ownerName(info) {
  return info.created_by_user_id ?? "(admin)";
}

function urlLinks(urls) {
  return urls.map(({ name, url }) => {
    const a = document.createElement("a");
    a.href = url;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    a.textContent = name;
    a.title = url;
    return a;
  });
}

function actionButtons(id, status) {
  const buttons = [];
  const add = (action, label, className = "") => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `small ${className}`;
    button.dataset.action = action;
    button.dataset.id = id;
    button.textContent = label;
    buttons.push(button);
  };
  if (status === "RUNNING") add("pause", "Pause");
  if (status === "PAUSED") add("resume", "Resume");
  add("delete", "Delete", "danger-ghost");
  return buttons;
}

function age(createdAt) {
  const seconds = Math.max(0, Math.floor((Date.now() - Date.parse(createdAt)) / 1000));
  if (seconds < 60) return `${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes}m`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `${hours}h ${minutes % 60}m`;
  return `${Math.floor(hours / 24)}d`;
}

function counts() {
  const result = Object.fromEntries(STATUSES.map((s) => [s, 0]));
  for (const row of page.rows.values()) result[row.info.status] += 1;
  return result;
}

function updateCounts() {
  const now = counts();
  for (const status of STATUSES) $(`count-${status}`).textContent = now[status];
  $("count-ALL").textContent = page.rows.size;
  $("empty").hidden = page.rows.size > 0;
}

function applyFilter() {
  const words = $("filter").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  for (const row of page.rows.values()) {
    const { info } = row;
    const haystack = `${info.id} ${info.sandbox_spec_id} ${ownerName(info)} ${info.status}`.toLowerCase();
    const hidden = words.length > 0 && !words.every((w) => haystack.includes(w));
    if (row.tr.hidden !== hidden) row.tr.hidden = hidden;
  }
}

// --- Actions -----------------------------------------------------------------------------

async function act(action, id, button) {
  if (!page.client) {
    toast("Not connected to the daemon: try again once the page is live.");
    return;
  }
  if (action === "delete" && !(await confirmDelete(id))) return;
  if (button) button.disabled = true;
  const op = { pause: "sandbox.pause", resume: "sandbox.resume", delete: "sandbox.delete" }[action];
  try {
    const result = await page.client.request(op, { sandbox_id: id });
    if (result && typeof result === "object") upsert(result);
    else if (action === "delete") removeRow(id);
    updateCounts();
  } catch (error) {
    toast(`${action[0].toUpperCase()}${action.slice(1)} ${id}: ${error.message}`, "error");
  } finally {
    if (button) button.disabled = false;
  }
}

function confirmDelete(id) {
  const dialog = $("confirm");
  $("confirm-text").textContent =
    `Every process of sandbox ${id} is ended and its working directory removed. This cannot be undone.`;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    $("confirm-ok").focus();
  });
}

async function startSandbox() {
  if (!page.client) {
    toast("Not connected to the daemon: try again once the page is live.");
    return;
  }
  const button = $("start");
  button.disabled = true;
  try {
    const info = await page.client.request("sandbox.start", {
      spec_id: $("spec-select").value || null,
      wait: false,
    });
    upsert(info);
    updateCounts();
    applyFilter();
  } catch (error) {
    toast(`Start: ${error.message}`, "error");
  } finally {
    button.disabled = false;
  }
}

function fillSpecs(specs) {
  const select = $("spec-select");
  const chosen = select.value;
  select.replaceChildren(
    ...specs.map((spec) => {
      const option = document.createElement("option");
      option.value = spec.id;
      option.textContent = spec.id;
      option.title = spec.command.join(" ");
      return option;
    }),
  );
  if (specs.some((spec) => spec.id === chosen)) select.value = chosen;
}

// --- The event list ----------------------------------------------------------------------

let drawScheduled = false;
function scheduleDraw() {
  if (drawScheduled) return;
  drawScheduled = true;
  requestAnimationFrame(() => {
    drawScheduled = false;
    const fresh = page.pendingEvents.filter(eventMatches);
    page.pendingEvents = [];
    if (!fresh.length) return;
    const list = $("events");
    const fragment = document.createDocumentFragment();
    for (let i = fresh.length - 1; i >= 0; i -= 1) fragment.appendChild(eventItem(fresh[i], true));
    list.insertBefore(fragment, list.firstChild);
    while (list.childElementCount > SHOW_EVENTS) list.lastElementChild.remove();
  });
}

function eventMatches(event) {
  const type = $("event-type").value;
  const sandbox = $("event-sandbox").value.trim();
  return (!type || event.type === type) && (!sandbox || (event.sandbox_id || "").startsWith(sandbox));
}

function redrawEvents() {
  const matching = page.events.filter(eventMatches).slice(-SHOW_EVENTS).reverse();
  $("events").replaceChildren(...matching.map((event) => eventItem(event, true)));
}

function eventItem(event, withSandbox) {
  const li = document.createElement("li");
  li.dataset.seq = event.seq;
  li.dataset.type = event.type;
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = `#${event.seq}`;
  const time = document.createElement("time");
  time.dateTime = event.ts;
  time.textContent = event.ts.slice(11, 23);
  time.title = event.ts;
  const type = document.createElement("span");
  type.className = `type type-${event.type.split(".")[1]}`;
  type.textContent = event.type;
  li.append(seq, time, type);
  if (withSandbox && event.sandbox_id) {
    const a = document.createElement("a");
    a.className = "sid";
    a.href = `#/sandbox/${encodeURIComponent(event.sandbox_id)}`;
    a.textContent = event.sandbox_id;
    li.append(a);
  }
  const detail = describe(event);
  if (detail) {
    const span = document.createElement("span");
    span.className = "detail";
    span.textContent = detail;
    span.title = detail;
    li.append(span);
  }
  return li;
}

function describe(event) {
  const d = event.data || {};
  const by = event.by ? `by ${event.by}` : "";
  switch (event.type) {
    case "sandbox.created":
      return `spec ${d.spec_id}, port ${d.port} ${by}`.trim();
    case "sandbox.process_started":
      return `pid ${d.pid}`;
    case "sandbox.running":
      return (d.exposed_urls || []).map((u) => u.url).join(" ");
    case "sandbox.start_failed":
    case "sandbox.unhealthy":
    case "sandbox.missing":
      return d.reason;
    case "sandbox.exited":
      return d.signal != null ? `signal ${d.signal}` : `exit code ${d.exit_code ?? "unknown"}`;
    case "sandbox.adopted":
      return `pid ${d.pid}`;
    case "sandbox.deleted":
      return `${d.forced ? "forced (SIGKILL) " : ""}${by}`.trim();
    case "daemon.started":
      return `version ${d.version}, pid ${d.pid}, ${d.recovered} recovered`;
    case "daemon.stopping":
      return d.reason;
    default:
      return by;
  }
}

// --- One sandbox's page ------------------------------------------------------------------

function route() {
  const match = location.hash.match(/^#\/sandbox\/(.+)$/);
  if (match) openDetail(decodeURIComponent(match[1]), false);
  else closeDetail();
}

async function openDetail(id, reconnecting) {
  if (!reconnecting && page.detail && page.detail.id === id) return;
  if (!reconnecting) closeDetail();
  $("list-view").hidden = true;
  $("detail-view").hidden = false;
  $("detail-title").textContent = id;
  if (!page.detail) {
    page.detail = { id, subscription: null, lastSeq: 0, timer: 0 };
    $("detail-events").replaceChildren();
    $("detail-output").textContent = "";
    page.detail.timer = setInterval(refreshOutput, 2000);
  }
  const detail = page.detail;
  refreshDetailInfo();
  if (!page.client) return;
  try {
    const reply = await page.client.request("events.subscribe", {
      sandbox_id: id,
      after_seq: detail.lastSeq,
    });
    if (page.detail === detail) detail.subscription = reply.subscription;
    else page.client.request("events.unsubscribe", { subscription: reply.subscription });
  } catch (error) {
    if (error.code === "not_found") $("detail-title").textContent = `${id}: no such sandbox`;
    else if (error.code !== "disconnected") toast(`Events of ${id}: ${error.message}`);
  }
  refreshOutput();
}

function closeDetail() {
  const detail = page.detail;
  if (!detail) return;
  clearInterval(detail.timer);
  if (detail.subscription && page.client) {
    page.client.request("events.unsubscribe", { subscription: detail.subscription }).catch(() => {});
  }
  page.detail = null;
  $("detail-view").hidden = true;
  $("list-view").hidden = false;
}

function onDetailFrame(frame) {
  const detail = page.detail;
  if (!frame.event || frame.event.seq <= detail.lastSeq) return;
  detail.lastSeq = frame.event.seq;
  const list = $("detail-events");
  list.insertBefore(eventItem(frame.event, false), list.firstChild);
}

function refreshDetailInfo() {
  const detail = page.detail;
  if (!detail) return;
  const row = page.rows.get(detail.id);
  const info = row ? row.info : null;
  $("detail-status").replaceChildren(info ? statusBadge(info.status) : deletedBadge());
  $("detail-actions").replaceChildren(...(info ? actionButtons(info.id, info.status) : []));
  if (!info) {
    const note = document.createElement("p");
    note.className = "gone";
    note.textContent = "This sandbox does not exist (any more); its events stay in the log.";
    $("detail-fields").replaceChildren(note);
    return;
  }
  const fields = [
    ["Spec", info.sandbox_spec_id],
    ["Owner", ownerName(info)],
    ["Created", info.created_at],
    ["Updated", info.updated_at],
    ["Port", info.port],
    ["PID", info.pid ?? "—"],
    ["URLs", info.exposed_urls?.length ? info.exposed_urls : "—"],
    ["Working dir", info.working_dir],
    ["Error", info.error ?? "—"],
    ["Version", info.version],
  ];
  $("detail-fields").replaceChildren(
    ...fields.flatMap(([name, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      if (Array.isArray(value)) dd.append(...urlLinks(value));
      else dd.textContent = String(value);
      return [dt, dd];
    }),
  );
}

function deletedBadge() {
  const badge = document.createElement("span");
  badge.className = "status status-DELETED";
  badge.textContent = "DELETED";
  return badge;
}

async function refreshOutput() {
  const detail = page.detail;
  if (!detail || !page.client || !page.rows.has(detail.id)) return;
  try {
    const result = await page.client.request("sandbox.logs", {
      sandbox_id: detail.id,
      tail_bytes: OUTPUT_BYTES,
    });
    if (page.detail !== detail) return;
    const output = $("detail-output");
    const atBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
    output.textContent = (result.truncated ? "… (earlier output cut)\n" : "") + (result.data || "(no output yet)");
    if (atBottom) output.scrollTop = output.scrollHeight;
  } catch (error) {
    if (error.code !== "disconnected" && error.code !== "not_found") {
      toast(`Output of ${detail.id}: ${error.message}`);
    }
  }
}

// --- Charts, toasts, ticking -------------------------------------------------------------

function sample() {
  if (!page.loaded) return;
  const now = Date.now();
  page.samples.push({ t: now, counts: counts() });
  while (page.samples.length && page.samples[0].t < now - STATUS_SPAN * 1000) page.samples.shift();
}

function drawCharts() {
  if ($("app").hidden) return;
  const now = Date.now();
  drawStatusChart($("chart-status"), page.samples, STATUS_SPAN, now);
  const second = Math.floor(now / 1000);
  const perSecond = [];
  for (let s = second - RATE_SPAN; s < second; s += 1) perSecond.push(page.rate.get(s) || 0);
  for (const s of page.rate.keys()) if (s < second - RATE_SPAN) page.rate.delete(s);
  drawRateChart($("chart-rate"), perSecond, RATE_SPAN);
  const last = perSecond[perSecond.length - 1];
  $("rate-now").textContent = `· ${last}/s now`;
}

function tick() {
  sample();
  drawCharts();
  for (const row of page.rows.values()) {
    put(row, "age", age(row.info.created_at), (text) => {
      row.cells.age.textContent = text;
    });
  }
}

function toast(text, kind = "info") {
  const item = document.createElement("div");
  item.className = `toast toast-${kind}`;
  item.setAttribute("role", kind === "error" ? "alert" : "status");
  item.textContent = text;
  $("toasts").appendChild(item);
  setTimeout(() => item.remove(), 8000);
}

// --- Wiring ------------------------------------------------------------------------------

function init() {
  for (const status of STATUSES) {
    document.documentElement.style.setProperty(`--status-${status}`, STATUS_COLORS[status]);
  }
  const typeSelect = $("event-type");
  for (const type of EVENT_TYPES) {
    const option = document.createElement("option");
    option.value = type;
    option.textContent = type;
    typeSelect.appendChild(option);
  }
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    page.token = token;
    $("token-input").value = "";
    $("login-error").hidden = true;
    connect();
  });
  $("change-token").addEventListener("click", () => {
    page.generation += 1; // whatever the old connection still does is ignored
    clearTimeout(page.retryTimer);
    if (page.client) page.client.close();
    page.client = null;
    sessionStorage.removeItem(TOKEN_KEY);
    page.token = null;
    for (const id of [...page.rows.keys()]) removeRow(id);
    page.loaded = false;
    page.lastSeq = null;
    page.events = [];
    $("events").replaceChildren();
    showBanner("");
    showLogin("");
  });
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) act(button.dataset.action, button.dataset.id, button);
  });
  $("start").addEventListener("click", startSandbox);
  $("filter").addEventListener("input", applyFilter);
  $("event-type").addEventListener("change", redrawEvents);
  $("event-sandbox").addEventListener("input", redrawEvents);
  $("detail-refresh").addEventListener("click", refreshOutput);
  window.addEventListener("hashchange", route);
  setInterval(tick, 1000);

  page.token = takeToken();
  route();
  if (page.token) connect();
  else showLogin("");
}

init();
