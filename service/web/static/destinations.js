/*
 * The destinations panel: each destination's state, lag (events and seconds), pending and
 * exhausted events and last error, from GET /admin/destinations every few seconds, with a
 * button that re-queues the exhausted events (POST /admin/destinations/{id}/retry).
 * Hidden while there are no destinations. The admin token is the one dashboard.js stored.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "relay.adminToken";
  const EVERY = 2000;
  const $ = (id) => document.getElementById(id);

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function seconds(value) {
    if (value < 1) return "0 s";
    if (value < 120) return Math.round(value) + " s";
    if (value < 7200) return Math.round(value / 60) + " min";
    return Math.round(value / 3600) + " h";
  }

  function stateOf(destination) {
    if (destination.paused) return "paused";
    if (destination.failing) return "failing since " + new Date(destination.failing_since).toLocaleString();
    if (destination.pending > 0) return "retrying";
    if (destination.exhausted > 0) return "exhausted";
    return "ok";
  }

  function row(destination, token) {
    const tr = document.createElement("tr");
    tr.dataset.id = destination.id;
    const state = stateOf(destination);
    tr.className = "destination " + state.split(" ")[0];
    const name = cell(destination.url, "destination-url");
    name.title = destination.id;
    const retry = document.createElement("button");
    retry.type = "button";
    retry.textContent = "Retry";
    retry.disabled = destination.exhausted === 0;
    retry.setAttribute("aria-label", "Retry the exhausted events of " + destination.url);
    retry.addEventListener("click", () => retryExhausted(destination.id, token, retry));
    const action = document.createElement("td");
    action.append(retry);
    tr.append(
      name,
      cell(state, "destination-state"),
      cell(destination.lag + " events, " + seconds(destination.lag_seconds), "destination-lag"),
      cell(String(destination.pending), "destination-pending"),
      cell(String(destination.exhausted), "destination-exhausted"),
      cell(destination.last_error || "—", "destination-error"),
      action,
    );
    return tr;
  }

  async function retryExhausted(id, token, button) {
    button.disabled = true;
    await fetch("/admin/destinations/" + encodeURIComponent(id) + "/retry", {
      method: "POST",
      headers: { Authorization: "Bearer " + token },
    });
    refresh();
  }

  let timer = null;

  async function refresh() {
    clearTimeout(timer);
    timer = setTimeout(refresh, EVERY);
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) return;
    let listed;
    try {
      const response = await fetch("/admin/destinations", { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
      if (!response.ok) return; // a refused token is reported by the dashboard's main load
      listed = (await response.json()).destinations;
    } catch (error) {
      return; // the server is restarting: keep what is shown
    }
    $("destinations").hidden = listed.length === 0;
    $("destinations-table").tBodies[0].replaceChildren(...listed.map((d) => row(d, token)));
  }

  refresh();
})();
