/*
 * The dashboard. At `/`: recent predictions, then every event live over /events/ws.
 * At `/p/{id}`: one prediction, its events and logs, over /predictions/{id}/ws.
 * Both go through relay.js, which resumes after a disconnect without gap or duplicate.
 * With RELAY_BUDGET set, the header shows this month's spend against it (GET /admin/usage).
 * The admin token comes from the URL fragment (#token=…, as `relay serve` prints it) and is kept
 * in sessionStorage; it is removed from the address bar at once.
 */
(function () {
  "use strict";

  const { TOKEN_KEY, $, el, takeToken, looksLikeImage } = window.RelayPage;
  const RECENT = 50;
  const MAX_CARDS = 200;
  const RELOAD_DELAY = 3000;
  const SYMBOLS = { starting: "○", processing: "◔", succeeded: "✓", failed: "✗", canceled: "⊘", aborted: "⊘" };
  const MAX_OUTPUTS = 8;
  const SPEND_EVERY = 60000;
  const SPEND_AT_MOST_EVERY = 3000; // the usage query scans the month: not once per event
  const USD = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });

  const views = new Map();
  let nextElementId = 0;

  function setConnection(text) {
    $("connection").textContent = text;
  }

  function clock(iso) {
    return el("time", { datetime: iso }, iso ? new Date(iso).toLocaleTimeString() : "");
  }

  // --- the admin token -------------------------------------------------------------------

  function tokenProblem(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-message").textContent = message;
    $("token-problem").hidden = false;
    $("content").hidden = true;
    setConnection("Not connected: no valid admin token.");
  }

  function tokenRefused(error) {
    const reason = [error.status, error.code].filter(Boolean).join(" ");
    tokenProblem(
      "The admin token was refused (" + reason + "): " + (error.message || "not valid") + ". " +
        "Paste the current RELAY_ADMIN_TOKEN below, or open the link relay serve printed."
    );
  }

  $("token-form").addEventListener("submit", (submit) => {
    submit.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    location.reload();
  });

  // --- this month's spend against RELAY_BUDGET ---------------------------------------------

  const spend = { token: null, timer: null, due: 0, last: 0, asked: 0 };

  function showSpend(month) {
    $("spend").hidden = !month || month.budget == null;
    if ($("spend").hidden) return;
    const percent = Math.round(month.used * 100) + "%";
    const over = month.used >= 1 ? ", over budget" : "";
    $("spend-text").textContent =
      "Spend this month: " + USD.format(month.spend) + " of " + USD.format(month.budget) + " (" + percent + over + ")";
    $("spend-meter").value = month.used; // a meter clamps the bar at its max; the text does not
    $("spend-meter").textContent = percent;
  }

  /** Answers the prediction cache gave this month, and the predict time and cost they saved. */
  function showCached(cached) {
    $("cached").hidden = !cached || cached.answers === 0;
    if ($("cached").hidden) return;
    const cost = cached.cost_saved == null ? "" : ", " + USD.format(cached.cost_saved);
    $("cached").textContent =
      "Cached answers this month: " + cached.answers + " (saved " + cached.predict_time_saved.toFixed(1) + " s" + cost + ")";
  }

  async function loadSpend() {
    spend.timer = null;
    spend.last = Date.now();
    const asked = ++spend.asked;
    try {
      const response = await fetch("/admin/usage", { headers: { Authorization: "Bearer " + spend.token }, cache: "no-store" });
      // A refused token is reported by the page's main load; other failures keep what is shown.
      if (response.ok) {
        const usage = await response.json();
        if (asked === spend.asked) {
          showSpend(usage.this_month);
          showCached(usage.cached);
        }
      }
    } catch (error) {
      // Relay is unreachable: the next refresh tries again.
    }
    if (spend.timer === null) refreshSpend(false);
  }

  /** Reload the spend: `soon` after a prediction ended (at most every few seconds), else later. */
  function refreshSpend(soon) {
    const delay = soon ? Math.max(0, spend.last + SPEND_AT_MOST_EVERY - Date.now()) : SPEND_EVERY;
    const due = Date.now() + delay;
    if (spend.timer !== null && spend.due <= due) return;
    clearTimeout(spend.timer);
    spend.due = due;
    spend.timer = setTimeout(loadSpend, delay);
  }

  function watchSpend(token) {
    spend.token = token;
    loadSpend();
  }

  // --- one prediction's view ------------------------------------------------------------------

  function newView(id) {
    return {
      id, status: null, model: null, logs: null, output: null, error: null, timeline: [], parts: null,
      archive: [], archiveWatch: null,
    };
  }

  function applyEvent(event) {
    let view = views.get(event.prediction_id);
    if (view === undefined) {
      view = newView(event.prediction_id);
      views.set(view.id, view);
    }
    if (event.replayed) return view; // a re-delivery of an old event: the state does not move
    const last = view.timeline[view.timeline.length - 1];
    if (last && last.status === event.status) last.events += 1;
    else view.timeline.push({ status: event.status, seq: event.seq, events: 1, received_at: event.received_at });
    if (Relay.supersedes(event.status, view.status)) {
      const body = event.prediction && typeof event.prediction === "object" ? event.prediction : {};
      Object.assign(view, {
        status: event.status,
        model: body.model || body.version || view.model,
        logs: body.logs ?? null,
        output: body.output ?? null,
        error: body.error ?? null,
      });
    }
    return view;
  }

  function outputUrls(output) {
    return window.RelayPage.outputUrls(output).slice(0, MAX_OUTPUTS);
  }

  // --- rendering ---------------------------------------------------------------------------

  function buildCard(view, linked) {
    const titleId = "prediction-" + nextElementId++;
    const progressId = titleId + "-progress";
    const parts = {
      status: el("strong", { class: "status-text" }),
      symbol: el("span", { class: "symbol", "aria-hidden": "true" }),
      model: el("p", { class: "model" }),
      progressBox: el("div", { class: "progress", hidden: "" }),
      progress: el("progress", { id: progressId, max: "100", value: "0" }),
      progressText: el("span", { class: "progress-text" }),
      error: el("p", { class: "error", hidden: "" }),
      timeline: el("ol", { class: "timeline", "aria-label": "Status timeline" }),
      outputs: el("ul", { class: "outputs", "aria-label": "Outputs" }),
      outputKey: "",
    };
    parts.progressBox.append(el("label", { for: progressId }, "Progress"), parts.progress, parts.progressText);
    const name = linked ? el("a", { href: "/p/" + encodeURIComponent(view.id) }, view.id) : view.id;
    const article = el(
      "article",
      { "aria-labelledby": titleId },
      el("h3", { id: titleId, class: "prediction-id" }, name),
      parts.model,
      el("p", { class: "status" }, parts.symbol, " Status: ", parts.status),
      parts.progressBox,
      parts.error,
      parts.timeline,
      parts.outputs
    );
    parts.card = el("li", { class: "prediction", "data-prediction-id": view.id }, article);
    view.parts = parts;
    return parts.card;
  }

  function render(view) {
    const parts = view.parts;
    const status = view.status || "unknown";
    parts.card.dataset.status = status;
    parts.status.textContent = status;
    parts.symbol.textContent = SYMBOLS[status] || "•";
    parts.model.textContent = view.model ? "Model: " + view.model : "";
    renderProgress(parts, Relay.parseProgress(view.logs));
    parts.error.hidden = !view.error;
    parts.error.textContent = view.error ? "Error: " + String(view.error) : "";
    parts.timeline.replaceChildren(
      ...view.timeline.map((run) =>
        el("li", { "data-status": run.status }, run.status + (run.events > 1 ? " ×" + run.events : "") + " ", clock(run.received_at))
      )
    );
    renderOutputs(view);
  }

  function renderProgress(parts, progress) {
    parts.progressBox.hidden = progress === null;
    if (progress === null) return;
    parts.progress.value = progress.percent;
    parts.progress.textContent = progress.percent + "%";
    parts.progressText.textContent = progress.percent + "% (" + progress.current + "/" + progress.total + ")";
  }

  function archiveItem(view, url) {
    return (view.archive || []).find((item) => item.url === url) || null;
  }

  function archiveNote(item) {
    if (item === null) return null;
    if (item.status === "stored") return el("span", { class: "archive archived" }, "archived");
    if (item.status === "failed") return el("span", { class: "archive archive-failed" }, "archive failed: " + (item.reason || "unknown"));
    return el("span", { class: "archive archive-pending" }, "archiving…");
  }

  function renderOutputs(view) {
    const urls = outputUrls(view.output);
    const items = urls.map((url) => archiveItem(view, url));
    const key = urls.map((url, i) => url + " " + (items[i] ? items[i].status : "")).join("\n");
    if (key === view.parts.outputKey) return; // keep loaded images as they are
    view.parts.outputKey = key;
    view.parts.outputs.replaceChildren(
      ...urls.map((url, index) => {
        const item = items[index];
        const stored = Relay.fileUrl(item, currentToken);
        const shown = stored || url;
        const label = "Output " + (index + 1) + " of " + view.id + (stored ? " (archived copy)" : "");
        const typed = item && item.content_type ? item.content_type.startsWith("image/") : null;
        const isImage = typed ?? looksLikeImage(url);
        const content = isImage ? el("img", { src: shown, alt: label, decoding: "async" }) : label;
        const link = el("a", { href: shown, rel: "noreferrer" }, content);
        const note = archiveNote(item);
        return note ? el("li", { "data-archive": item.status }, link, note) : el("li", {}, link);
      })
    );
  }

  /** Once a prediction has ended with output, follow its archive until every file is settled. */
  function watchArchive(view) {
    if (view.archiveWatch || !Relay.isTerminal(view.status) || outputUrls(view.output).length === 0) return;
    if ((view.archive || []).length && !view.archive.some((item) => item.status === "pending")) return;
    view.archiveWatch = Relay.watchArchive(view.id, {
      token: currentToken,
      onArchive(items) {
        view.archive = items;
        if (view.parts) renderOutputs(view);
      },
    });
  }

  function showConnection(name, detail) {
    const texts = {
      connecting: "Connecting…",
      open: "Connected; catching up…",
      live: "Live: updates appear as Relay receives them.",
      reconnecting:
        "Connection lost; reconnecting in " + ((detail.delay || 0) / 1000).toFixed(1) + " s (resuming after event " + detail.after + ").",
      closed: "Disconnected.",
    };
    if (name in texts) setConnection(texts[name]);
  }

  // --- the list page ------------------------------------------------------------------------

  function showEmpty() {
    $("empty").hidden = views.size > 0;
  }

  function addCard(view, atTop) {
    const list = $("predictions");
    const card = buildCard(view, true);
    if (atTop) list.prepend(card);
    else list.append(card);
    while (views.size > MAX_CARDS) {
      const oldest = list.lastElementChild;
      views.delete(oldest.dataset.predictionId);
      oldest.remove();
    }
    showEmpty();
  }

  async function startDashboard(token) {
    setConnection("Loading recent predictions…");
    let response;
    try {
      response = await fetch("/admin/predictions?limit=" + RECENT, { headers: { Authorization: "Bearer " + token } });
    } catch (error) {
      setConnection("Relay is unreachable; trying again…");
      setTimeout(() => startDashboard(token), RELOAD_DELAY);
      return;
    }
    const body = await response.json().catch(() => ({}));
    if (response.status === 401 || response.status === 403) return tokenRefused({ status: response.status, ...body.error });
    if (!response.ok) {
      setConnection("Could not load predictions (HTTP " + response.status + "); trying again…");
      setTimeout(() => startDashboard(token), RELOAD_DELAY);
      return;
    }
    for (const prediction of body.predictions) {
      const view = Object.assign(newView(prediction.id), prediction);
      views.set(view.id, view);
      addCard(view, false);
      render(view);
      watchArchive(view);
    }
    showEmpty();
    Relay.subscribeAll({
      token,
      after: body.seq,
      onEvent(event) {
        const known = views.has(event.prediction_id);
        const view = applyEvent(event);
        if (!known) addCard(view, true);
        render(view);
        watchArchive(view);
        if (Relay.isTerminal(event.status)) refreshSpend(true);
      },
      onConnection: showConnection,
      onError: tokenRefused,
    });
  }

  // --- one prediction's page -----------------------------------------------------------------

  function addEventRow(event) {
    const source = event.source + (event.replayed ? " (replayed)" : "");
    const row = el("tr", { "data-seq": String(event.seq) });
    for (const cell of [String(event.seq), event.status, source]) row.append(el("td", {}, cell));
    row.append(el("td", {}, clock(event.received_at)));
    $("events").tBodies[0].append(row);
  }

  function startPrediction(token, id) {
    document.title = "Prediction " + id + " · Relay";
    $("content-title").textContent = "Prediction " + id;
    $("back").hidden = false;
    $("detail").hidden = false;
    $("empty").textContent = "Waiting for the first event of this prediction…";
    $("empty").hidden = false;
    const view = newView(id);
    views.set(id, view);
    Relay.subscribe(id, {
      token,
      after: 0,
      onEvent(event) {
        if (view.parts === null) $("predictions").append(buildCard(view, false));
        $("empty").hidden = true;
        applyEvent(event);
        addEventRow(event);
        render(view);
        watchArchive(view);
        $("logs").textContent = view.logs || "";
      },
      onConnection: showConnection,
      onError: tokenRefused,
      onDone(event) {
        refreshSpend(true);
        setConnection("Finished: " + (event ? event.status : view.status || "ended") + ".");
      },
    });
  }

  // --- start ---------------------------------------------------------------------------------

  const token = takeToken();
  const currentToken = token;
  if (!token) {
    tokenProblem(
      "No admin token. Open the dashboard link that relay serve printed (it ends in #token=…), " +
        "or paste RELAY_ADMIN_TOKEN below."
    );
    return;
  }
  $("content").hidden = false;
  watchSpend(token);
  const match = /^\/p\/(.+)$/.exec(location.pathname);
  if (match) startPrediction(token, decodeURIComponent(match[1]));
  else startDashboard(token);
})();
