// jetspool's dashboard: plain JavaScript, no build step. It reads /system/dashboard (queue
// figures and the last minutes of activity), follows /system/dashboard/events (recent requests,
// live) and a request's own status stream, and submits and cancels through the public API.
"use strict";

const KEY_STORAGE = "jetspool.key";
const OVERVIEW_INTERVAL_MS = 2000;
const RECENT_ROWS = 50;

const $ = (id) => document.getElementById(id);
const esc = (text) =>
  String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  requests: new Map(), // request id -> latest status object
  functions: [],
  selected: null, // request id shown in the detail panel
  detailAbort: null,
};

// --- talking to the gateway ----------------------------------------------------------------

function headers(extra = {}) {
  return state.key ? { Authorization: `Bearer ${state.key}`, ...extra } : extra;
}

let keyWanted = null; // one pending key prompt at a time

function askForKey(message) {
  if (!keyWanted) {
    keyWanted = new Promise((resolve) => {
      $("key-error").hidden = !message;
      $("key-error").textContent = message || "";
      $("key-input").value = "";
      $("key-dialog").showModal();
      $("key-form").onsubmit = () => {
        state.key = $("key-input").value.trim();
        sessionStorage.setItem(KEY_STORAGE, state.key);
        $("forget-key").hidden = false;
        keyWanted = null;
        resolve();
      };
    });
  }
  return keyWanted;
}

async function api(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: headers(options.headers) });
    if (response.status === 401 || response.status === 403) {
      const body = await response.json().catch(() => ({}));
      await askForKey(response.status === 403 ? "This needs an admin key." : body.detail);
      continue;
    }
    return response;
  }
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header).
async function follow(path, onData, signal) {
  const response = await api(path, { signal });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) onData(JSON.parse(data.join("\n")));
    }
  }
}

// --- functions: figures and small charts ----------------------------------------------------

function sparkline(values, color, max) {
  const top = Math.max(max ?? Math.max(...values), 1e-9);
  const step = 100 / Math.max(values.length - 1, 1);
  const points = values.map((v, i) => `${(i * step).toFixed(2)},${(40 - (v / top) * 38).toFixed(2)}`);
  return `<svg viewBox="0 0 100 40" preserveAspectRatio="none" role="img">
    <polyline points="0,40 ${points.join(" ")} 100,40" fill="${color}" fill-opacity=".15" stroke="none"/>
    <polyline points="${points.join(" ")}" fill="none" stroke="${color}" stroke-width="1.5" vector-effect="non-scaling-stroke"/>
  </svg>`;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
}

function renderFunction(fn) {
  const a = fn.activity;
  const perSecond = a.completed.map((c) => c / a.bucket_seconds);
  const failureRate = a.completed.map((c, i) => (c + a.failed[i] ? a.failed[i] / (c + a.failed[i]) : 0));
  const waiting = fn.stats.waiting;
  const lastRate = perSecond[perSecond.length - 1];
  return `<article class="card" data-function="${fn.name}">
    <h2>${fn.name} <span class="note">concurrency ${fn.concurrency}</span></h2>
    <div class="figures">
      <div class="figure"><b data-figure="waiting">${waiting.high + waiting.normal + waiting.low}</b><span>waiting</span></div>
      <div class="figure"><b data-figure="in_progress">${fn.stats.in_progress}</b><span>in progress</span></div>
      <div class="figure"><b data-figure="completed">${fn.stats.completed}</b><span>completed</span></div>
      <div class="figure"><b data-figure="failed">${fn.stats.failed}</b><span>failed</span></div>
      <div class="priorities">waiting by priority: <b>${waiting.high}</b> high · <b>${waiting.normal}</b> normal ·
        <b>${waiting.low}</b> low</div>
    </div>
    <div class="chart"><div class="label"><span>throughput, last 10 min</span><span>${lastRate.toFixed(1)}/s</span></div>
      ${sparkline(perSecond, "var(--done)")}</div>
    <div class="chart"><div class="label"><span>failure rate</span>
      <span>${(100 * failureRate[failureRate.length - 1]).toFixed(0)} %</span></div>
      ${sparkline(failureRate, "var(--fail)", 1)}</div>
    <div class="runtime"><span>run time p50 <b>${seconds(a.run_seconds.p50)}</b></span>
      <span>p99 <b>${seconds(a.run_seconds.p99)}</b></span><span class="note">${a.run_seconds.count} runs</span></div>
  </article>`;
}

async function refreshOverview() {
  try {
    const response = await api("/system/dashboard");
    if (!response.ok) throw new Error(`${response.status}`);
    const { functions } = await response.json();
    state.functions = functions;
    $("functions").innerHTML = functions.length
      ? functions.map(renderFunction).join("")
      : `<p class="note">No functions registered yet.</p>`;
    const select = $("submit-function");
    const chosen = select.value;
    select.innerHTML = functions.map((f) => `<option>${f.name}</option>`).join("");
    if (functions.some((f) => f.name === chosen)) select.value = chosen;
    setConnection(true);
  } catch (error) {
    setConnection(false, error);
  }
}

function setConnection(ok, error) {
  const pill = $("connection");
  pill.textContent = ok ? "live" : `unreachable (${error?.message || error})`;
  pill.className = `status ${ok ? "COMPLETED" : "FAILED"}`;
}

// --- recent requests, live ------------------------------------------------------------------

function statusClass(status) {
  return status.status === "COMPLETED" && status.error_type ? "FAILED" : status.status;
}

function statusText(status) {
  return status.error_type ? `${status.status} · ${status.error_type}` : status.status;
}

function duration(status) {
  if (!status.completed_at) return status.started_at ? "running" : "";
  return seconds((Date.parse(status.completed_at) - Date.parse(status.submitted_at)) / 1000);
}

function remember(status) {
  const known = state.requests.get(status.request_id);
  if (known && rank(known) > rank(status)) return; // an event that arrived late
  state.requests.set(status.request_id, status);
}

function rank(status) {
  return { IN_QUEUE: 0, IN_PROGRESS: 1, COMPLETED: 2 }[status.status] * 1000 + status.attempts;
}

let recentPending = false;
function renderRecent() {
  if (recentPending) return;
  recentPending = true;
  requestAnimationFrame(() => {
    recentPending = false;
    const rows = [...state.requests.values()]
      .sort((a, b) => Date.parse(b.submitted_at) - Date.parse(a.submitted_at))
      .slice(0, RECENT_ROWS);
    $("recent").tBodies[0].innerHTML = rows
      .map((s) => `<tr data-request="${s.request_id}" data-function="${s.function}"
          class="${s.request_id === state.selected ? "selected" : ""}">
        <td><code>${s.request_id.slice(0, 8)}</code></td><td>${s.function}</td>
        <td><span class="status ${statusClass(s)}">${esc(statusText(s))}</span></td>
        <td>${s.attempts}</td><td>${esc(duration(s))}</td>
        <td>${new Date(s.submitted_at).toLocaleTimeString()}</td></tr>`)
      .join("");
  });
}

async function followRecent() {
  for (;;) {
    try {
      await follow("/system/dashboard/events?limit=100", (event) => {
        remember(event.status);
        renderRecent();
      });
    } catch (error) {
      setConnection(false, error);
    }
    await new Promise((resolve) => setTimeout(resolve, 2000)); // the stream ended: follow it again
  }
}

// --- one request in detail ------------------------------------------------------------------

function clock(at) {
  const when = new Date(at);
  return `${when.toLocaleTimeString()} +${String(when.getMilliseconds()).padStart(3, "0")} ms`;
}

function history(status) {
  const steps = [["IN_QUEUE", "IN_QUEUE", status.submitted_at]];
  if (status.started_at) steps.push(["IN_PROGRESS", "IN_PROGRESS", status.started_at]);
  if (status.completed_at) steps.push([statusClass(status), statusText(status), status.completed_at]);
  return steps
    .map(([kind, text, at]) => `<li><span class="status ${kind}">${esc(text)}</span> <span class="note">${clock(at)}</span></li>`)
    .join("");
}

function renderDetail(status) {
  $("detail-status").textContent = statusText(status);
  $("detail-status").className = `status ${statusClass(status)}`;
  $("detail-function").textContent = `${status.function} · ${status.priority} · attempt ${status.attempts}` +
    (status.queue_position !== undefined ? ` · position ${status.queue_position}` : "");
  $("detail-history").innerHTML = history(status);
  $("detail-error").hidden = !status.error;
  $("detail-error").textContent = status.error || "";
  $("detail-callbacks").innerHTML = status.callbacks.length
    ? status.callbacks
        .map((c) => `<li><code>${esc(c.url)}</code> ${esc(c.kind)} · ${esc(c.state)} · ${c.attempts} attempts` +
          (c.last_status ? ` · last answer ${c.last_status}` : "") + `</li>`)
        .join("")
    : `<li class="note">none</li>`;
  $("detail-logs").textContent =
    (status.logs || []).map((l) => `${l.timestamp || ""} ${l.level || ""} ${l.message}`).join("\n") || "no log lines";
  $("detail-cancel").disabled = status.status === "COMPLETED";
}

async function showDetail(functionName, requestId) {
  state.detailAbort?.abort();
  const abort = new AbortController();
  state.detailAbort = abort;
  state.selected = requestId;
  $("detail").hidden = false;
  $("detail").dataset.function = functionName;
  $("detail").dataset.request = requestId;
  $("detail-id").textContent = requestId;
  renderRecent();
  try {
    await follow(`/queue/${functionName}/requests/${requestId}/status/stream?logs=1`, (status) => {
      remember(status);
      renderRecent();
      if (state.selected === requestId) renderDetail(status);
    }, abort.signal);
  } catch (error) {
    if (!abort.signal.aborted) $("detail-function").textContent = `stream ended: ${error.message}`;
  }
}

async function cancelSelected() {
  const { function: fn, request } = $("detail").dataset;
  const response = await api(`/queue/${fn}/requests/${request}/cancel`, { method: "PUT" });
  const body = await response.json().catch(() => ({}));
  $("detail-function").textContent = `cancel: ${response.status} ${body.status || body.detail || ""}`;
}

// --- submitting a test request --------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  const fn = $("submit-function").value;
  const path = $("submit-path").value.replace(/^\/+/, "");
  let body;
  try {
    body = JSON.stringify(JSON.parse($("submit-body").value || "null"));
  } catch (error) {
    $("submit-result").textContent = `The body is not JSON: ${error.message}`;
    return;
  }
  const response = await api(`/queue/${fn}${path ? `/${path}` : ""}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Queue-Priority": $("submit-priority").value },
    body,
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    $("submit-result").textContent = `Refused: ${response.status} ${answer.detail || ""}`;
    return;
  }
  $("submit-result").textContent = `Queued ${answer.request_id} at position ${answer.queue_position}`;
  remember({ status: "IN_QUEUE", request_id: answer.request_id, function: fn, attempts: 0,
    submitted_at: new Date().toISOString(), callbacks: [] });
  renderRecent();
  showDetail(fn, answer.request_id);
}

// --- start ----------------------------------------------------------------------------------

$("submit-form").addEventListener("submit", submit);
$("detail-cancel").addEventListener("click", cancelSelected);
$("recent").tBodies[0].addEventListener("click", (event) => {
  const row = event.target.closest("tr[data-request]");
  if (row) showDetail(row.dataset.function, row.dataset.request);
});
$("forget-key").hidden = !state.key;
$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = "";
  location.reload();
});

refreshOverview().then(() => {
  setInterval(refreshOverview, OVERVIEW_INTERVAL_MS);
  followRecent();
});
