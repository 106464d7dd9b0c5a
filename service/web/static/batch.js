/*
 * The batch pages. At `/batches`: every batch (GET /api/batches). At `/b/{id}`: one batch, its
 * progress over items, counts by status, items with thumbnails as they finish, and a cancel
 * button; live over WS /batches/{id}/ws, which closes once every item has ended. Each event
 * updates its item; the counts are re-read (at most every REFRESH_MS) from GET /api/batches/{id}.
 * The admin token is the dashboard's (sessionStorage, or #token=… in the URL).
 */
(function () {
  "use strict";

  const { $, el, takeToken, outputUrls, looksLikeImage } = window.RelayPage;
  const REFRESH_MS = 500;
  const PAGE = 1000;
  const TERMINAL = new Set(["succeeded", "failed", "canceled", "aborted"]);
  const SYMBOLS = { pending: "·", creating: "…", starting: "○", processing: "◔", succeeded: "✓", failed: "✗", canceled: "⊘", aborted: "⊘" };
  function problem(text) {
    $("problem").textContent = text;
    $("problem").hidden = false;
    $("connection").textContent = "Not connected.";
  }

  async function api(token, path, options) {
    const response = await fetch(path, { ...options, headers: { Authorization: "Bearer " + token }, cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw Object.assign(new Error((body.error && body.error.message) || "HTTP " + response.status), { status: response.status });
    return body;
  }

  function ended(counts) {
    return Object.entries(counts).reduce((sum, [status, n]) => sum + (TERMINAL.has(status) ? n : 0), 0);
  }

  function progressText(batch) {
    return ended(batch.counts) + " of " + batch.total + " items ended";
  }

  // --- the list ---------------------------------------------------------------------------------

  async function startList(token) {
    $("list").hidden = false;
    const body = await api(token, "/api/batches?limit=200");
    $("list-empty").hidden = body.batches.length > 0;
    $("batches").hidden = body.batches.length === 0;
    for (const batch of body.batches) {
      const bar = el("progress", { max: String(batch.total), value: String(ended(batch.counts)), "aria-label": progressText(batch) });
      const row = el("tr", {});
      row.append(el("td", {}, el("a", { href: "/b/" + encodeURIComponent(batch.id) }, batch.id)));
      row.append(el("td", {}, batch.status), el("td", {}, bar, " " + progressText(batch)));
      row.append(el("td", {}, el("time", { datetime: batch.created_at }, new Date(batch.created_at).toLocaleString())));
      $("batches").tBodies[0].append(row);
    }
    $("connection").textContent = "Batches as of " + new Date().toLocaleTimeString() + ".";
  }

  // --- one batch --------------------------------------------------------------------------------

  const items = new Map(); // index -> {item, node}
  const byPrediction = new Map(); // prediction id -> index

  function renderItem(item) {
    let entry = items.get(item.index);
    if (entry === undefined) {
      entry = { item, node: el("li", { "data-index": String(item.index) }) };
      items.set(item.index, entry);
      $("items").append(entry.node);
    }
    entry.item = item;
    if (item.prediction_id) byPrediction.set(item.prediction_id, item.index);
    const status = el("span", { class: item.status }, (SYMBOLS[item.status] || "?") + " " + item.status);
    const parts = [el("strong", {}, "#" + item.index), " ", status];
    if (item.error) parts.push(el("div", { class: "error" }, String(item.error)));
    const [first] = outputUrls(item.output);
    if (first && TERMINAL.has(item.status)) {
      const label = "Output of item " + item.index;
      const isImage = looksLikeImage(first);
      parts.push(el("a", { href: first, rel: "noreferrer" }, isImage ? el("img", { src: first, alt: label, decoding: "async" }) : label));
    }
    entry.node.replaceChildren(...parts);
  }

  function renderBatch(batch, token) {
    document.title = "Batch " + batch.id + " · Relay";
    $("batch-title").textContent = "Batch " + batch.id;
    const target = batch.model || batch.version;
    const canceling = batch.status === "running" && batch.cancel_requested ? " (canceling)" : "";
    $("batch-status").textContent = "Status: " + batch.status + canceling + " · " + target + " · " + batch.concurrency + " at a time";
    $("progress-bar").max = batch.total;
    $("progress-bar").value = ended(batch.counts);
    $("progress-label").textContent = progressText(batch);
    $("counts").replaceChildren(
      ...Object.entries(batch.counts)
        .sort()
        .map(([status, n]) => el("li", { "data-status": status }, (SYMBOLS[status] || "?") + " " + status + ": " + n))
    );
    $("held").hidden = !batch.held;
    $("held").textContent = batch.held ? "No new item starts: " + batch.held.reason : "";
    $("cancel").hidden = batch.status !== "running" || batch.cancel_requested;
  }

  async function loadAll(token, id) {
    let after = null;
    let batch;
    do {
      batch = await api(token, "/api/batches/" + encodeURIComponent(id) + "?limit=" + PAGE + (after === null ? "" : "&after=" + after));
      batch.items.forEach(renderItem);
      after = batch.next_after;
    } while (after !== null);
    renderBatch(batch, token);
    return batch;
  }

  function startBatch(token, id) {
    $("batch").hidden = false;
    let timer = null;
    const refresh = () => {
      if (timer !== null) return;
      timer = setTimeout(async () => {
        timer = null;
        const batch = await api(token, "/api/batches/" + encodeURIComponent(id) + "?limit=1").catch(() => null);
        if (batch) renderBatch(batch, token);
      }, REFRESH_MS);
    };
    $("cancel").addEventListener("click", async () => {
      $("cancel").disabled = true;
      try {
        renderBatch(await api(token, "/api/batches/" + encodeURIComponent(id) + "/cancel", { method: "POST" }), token);
      } catch (error) {
        problem("Cancel failed: " + error.message);
      }
      $("cancel").disabled = false;
    });
    loadAll(token, id)
      .then(() => watch(token, id, refresh))
      .catch((error) => problem(error.status === 404 ? "No batch " + id + "." : "Could not load the batch: " + error.message));
  }

  function watch(token, id, refresh) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(scheme + "//" + location.host + "/batches/" + encodeURIComponent(id) + "/ws?token=" + encodeURIComponent(token));
    $("connection").textContent = "Connecting…";
    socket.onmessage = (message) => {
      const data = JSON.parse(message.data);
      if (data.type === "caught_up") $("connection").textContent = "Live: items update as Relay receives their events.";
      if (data.type !== "event") return;
      const index = byPrediction.get(data.prediction_id);
      const prediction = data.prediction || {};
      if (index !== undefined) {
        const item = items.get(index).item;
        renderItem({ ...item, status: data.status, output: prediction.output ?? item.output, error: prediction.error ?? item.error });
      }
      refresh();
    };
    socket.onclose = (close) => {
      if (close.code === 1000) {
        $("connection").textContent = "Finished: every item has ended.";
        loadAll(token, id).catch(() => {});
      } else {
        $("connection").textContent = "Disconnected (" + close.code + "); reconnecting…";
        reconnect(token, id, refresh, 2000);
      }
    };
  }

  // Relay may be down for a while (a restart, a deploy): keep trying, backing off to 30 s.
  function reconnect(token, id, refresh, delay) {
    setTimeout(() => {
      loadAll(token, id)
        .then(() => watch(token, id, refresh))
        .catch(() => reconnect(token, id, refresh, Math.min(delay * 2, 30000)));
    }, delay);
  }

  const token = takeToken();
  if (!token) return problem("No admin token: open the dashboard link that relay serve printed (it ends in #token=…).");
  const match = /^\/b\/(.+)$/.exec(location.pathname);
  if (match) startBatch(token, decodeURIComponent(match[1]));
  else startList(token).catch((error) => problem("Could not list batches: " + error.message));
})();
