/*
 * relay.js: watch Relay's live prediction events from a browser. No dependencies.
 *
 *   <script src="https://RELAY/relay.js"></script>
 *   const sub = Relay.subscribe("PREDICTION_ID", {
 *     token: "…",                   // subscriber token for that prediction, or the admin token
 *     after: 0,                     // resume after this seq (0: from the first event)
 *     onEvent(event) {},            // every stored event once, in seq order
 *     onStatus(status, event) {},   // each forward move of the status
 *     onDone(event) {},             // once, at the terminal status (succeeded, failed, …)
 *   });
 *   sub.close();
 *
 *   // Stored copies of the outputs (Relay keeps them after Replicate deletes its own, an hour
 *   // after completion): each item is {url, status: "pending"|"stored"|"failed", file, reason}.
 *   const watch = Relay.watchArchive("PREDICTION_ID", { token: "…", onArchive(items) {} });
 *   Relay.fileUrl(item, token, base)    // the stored copy's URL (with ?token=) once "stored", else null
 *   Relay.outputUrl(url, items, token, base)  // the stored copy of an output URL if any, else the URL
 *   // (`base`: Relay's origin, for a page served from another one; default: the page's own)
 *
 * The socket reconnects by itself with capped exponential backoff and jitter, resuming with
 * `after=` the last seq it delivered, so a dropped connection loses nothing and repeats nothing.
 */
(function (root) {
  "use strict";

  const TERMINAL_STATUSES = ["succeeded", "failed", "canceled", "aborted"];
  const RANKS = { starting: 1, processing: 2 };
  const TERMINAL_RANK = 3;
  const NORMAL_CLOSURE = 1000;
  const PROGRESS = /(\d{1,3})%\|[^|\r\n]*\|\s*(\d+)\/(\d+)/g;
  const PROGRESS_TAIL = 4000;

  function isTerminal(status) {
    return TERMINAL_STATUSES.includes(status);
  }

  // Unknown (future) statuses rank with "processing", as on the server (service/statuses.py).
  function rank(status) {
    return isTerminal(status) ? TERMINAL_RANK : RANKS[status] || 2;
  }

  /** Whether `next` replaces `current`: forward only, and the first terminal status stays. */
  function supersedes(next, current) {
    if (current == null) return true;
    const a = rank(next);
    const b = rank(current);
    return a > b || (a === b && b < TERMINAL_RANK);
  }

  /** The last tqdm-style progress line of `logs` (" 45%|████▌     | 45/100 [...]"), or null. */
  function parseProgress(logs) {
    if (typeof logs !== "string") return null;
    let tail = logs;
    if (logs.length > PROGRESS_TAIL) {
      tail = logs.slice(-PROGRESS_TAIL);
      tail = tail.slice(tail.search(/[\r\n]/) + 1); // drop a cut-off first line
    }
    let last = null;
    for (const match of tail.matchAll(PROGRESS)) last = match;
    if (last === null) return null;
    return { percent: Math.min(100, Number(last[1])), current: Number(last[2]), total: Number(last[3]) };
  }

  function httpBase(base) {
    return (base || root.location.origin).replace(/\/+$/, "");
  }

  /**
   * One resumable stream. `path` is the WebSocket path; `probe` an HTTP path that answers
   * 401/403 for the same token, asked only when a handshake fails: browsers hide the
   * handshake's 403, and a refused token must end the retries with a clear error.
   */
  function stream(path, probe, options, endsAtTerminal) {
    const opts = Object.assign({ after: 0, minDelay: 250, maxDelay: 10000 }, options);
    const base = httpBase(opts.base);
    const state = { lastSeq: Number(opts.after) || 0, status: null, done: false, closed: false };
    let attempts = 0;
    let socket = null;
    let timer = null;

    const call = (name, ...args) => {
      if (typeof opts[name] === "function") opts[name](...args);
    };
    const connection = (name, detail) => call("onConnection", name, detail || {});

    function url() {
      const query = "?after=" + state.lastSeq + (opts.token ? "&token=" + encodeURIComponent(opts.token) : "");
      return base.replace(/^http/, "ws") + path + query;
    }

    function connect() {
      timer = null;
      if (state.closed) return;
      connection("connecting", { after: state.lastSeq });
      let opened = false;
      socket = new WebSocket(url());
      socket.onopen = () => {
        opened = true;
        attempts = 0;
        connection("open", { after: state.lastSeq });
      };
      socket.onmessage = (message) => receive(JSON.parse(message.data));
      socket.onclose = (close) => {
        socket = null;
        closed(close.code, opened);
      };
    }

    function receive(message) {
      if (message.type === "caught_up") {
        // Every event up to message.seq that this stream covers has been sent.
        state.lastSeq = Math.max(state.lastSeq, message.seq);
        connection("live", { seq: message.seq });
        call("onCaughtUp", message.seq);
        return;
      }
      if (message.type !== "event") return;
      if (message.replayed) {
        call("onEvent", message); // a replay keeps its old seq and never moves the cursor
        return;
      }
      if (message.seq <= state.lastSeq) return; // already delivered
      state.lastSeq = message.seq;
      call("onEvent", message);
      if (!endsAtTerminal) return;
      if (message.status !== state.status && supersedes(message.status, state.status)) {
        state.status = message.status;
        call("onStatus", message.status, message);
      }
      if (isTerminal(message.status)) finish(message);
    }

    function finish(event) {
      if (state.done) return;
      state.done = true;
      stop();
      call("onDone", event);
    }

    function closed(code, opened) {
      if (state.closed) return;
      if (endsAtTerminal && code === NORMAL_CLOSURE) {
        // The server ends a prediction's stream only at its terminal status; when `after`
        // was already past that event, there is no event to hand over.
        finish(null);
        return;
      }
      if (opened) retry(code);
      else checkToken().then((refused) => (refused ? refuse(refused) : retry(code)));
    }

    function checkToken() {
      const headers = opts.token ? { Authorization: "Bearer " + opts.token } : {};
      return fetch(base + probe, { headers: headers, cache: "no-store" })
        .then((response) => {
          if (response.status !== 401 && response.status !== 403) return null;
          return response
            .json()
            .catch(() => ({}))
            .then((body) => Object.assign({ status: response.status }, body.error || {}));
        })
        .catch(() => null); // unreachable: the server is down, keep retrying
    }

    function refuse(error) {
      stop();
      connection("refused", error);
      call("onError", error);
    }

    function retry(code) {
      if (state.closed) return;
      const delay = Math.min(opts.maxDelay, opts.minDelay * 2 ** attempts) * (0.5 + Math.random() / 2);
      attempts += 1;
      connection("reconnecting", { code: code, delay: delay, after: state.lastSeq });
      timer = setTimeout(connect, delay);
    }

    function stop() {
      state.closed = true;
      if (timer !== null) clearTimeout(timer);
      timer = null;
      if (socket !== null && socket.readyState <= WebSocket.OPEN) socket.close(NORMAL_CLOSURE);
      connection("closed");
    }

    connect();
    return {
      close: stop,
      get lastSeq() {
        return state.lastSeq;
      },
      get status() {
        return state.status;
      },
    };
  }

  /** Follow one prediction until its terminal status. */
  function subscribe(predictionId, options) {
    const id = encodeURIComponent(predictionId);
    return stream("/predictions/" + id + "/ws", "/predictions/" + id + "/events?limit=1", options, true);
  }

  /** Follow every prediction's events (admin token); only `onEvent` and connection callbacks apply. */
  function subscribeAll(options) {
    return stream("/events/ws", "/admin/predictions?limit=1", options, false);
  }

  // --- the output archive ----------------------------------------------------------------

  const ARCHIVE_FIRST_DELAY = 1000;
  const ARCHIVE_MAX_DELAY = 60000;
  const ARCHIVE_GIVE_UP = 2 * 3600 * 1000; // Relay itself stops retrying about an hour after completion

  /**
   * The stored copy of an archive item, as a URL that carries the token (for <img src>). `item.file`
   * is a path on Relay: with `base` (Relay's origin, for a page served elsewhere) the URL is absolute.
   */
  function fileUrl(item, token, base) {
    if (!item || item.status !== "stored" || typeof item.file !== "string") return null;
    const origin = base ? httpBase(base) : "";
    return origin + item.file + (token ? "?token=" + encodeURIComponent(token) : "");
  }

  /** The URL to show for an output: its stored copy once archived, the original until then. */
  function outputUrl(url, items, token, base) {
    const item = (items || []).find((candidate) => candidate.url === url);
    return fileUrl(item, token, base) || url;
  }

  /** One prediction's `archive` list (GET /predictions/{id}). */
  async function fetchArchive(predictionId, options) {
    const url = httpBase(options.base) + "/predictions/" + encodeURIComponent(predictionId);
    const response = await fetch(url, { headers: { Authorization: "Bearer " + options.token }, cache: "no-store" });
    if (!response.ok) throw Object.assign(new Error("HTTP " + response.status), { status: response.status });
    const body = await response.json();
    return Array.isArray(body.archive) ? body.archive : [];
  }

  /** Poll a prediction's archive (backing off) until no item is pending; `onArchive(items)` on each change. */
  function watchArchive(predictionId, options) {
    let timer = null;
    let stopped = false;
    let last = "";
    const started = Date.now();
    async function poll(delay) {
      let items = null;
      try {
        items = await fetchArchive(predictionId, options);
      } catch (error) {
        if (error.status === 401 || error.status === 403 || error.status === 404) return; // nothing to watch
      }
      if (stopped) return;
      if (items !== null) {
        const key = JSON.stringify(items);
        if (key !== last) {
          last = key;
          if (options.onArchive) options.onArchive(items);
        }
        if (!items.some((item) => item.status === "pending")) return;
      }
      if (Date.now() - started > ARCHIVE_GIVE_UP) return;
      timer = setTimeout(() => poll(Math.min(delay * 2, ARCHIVE_MAX_DELAY)), delay);
    }
    poll(ARCHIVE_FIRST_DELAY);
    return {
      close() {
        stopped = true;
        clearTimeout(timer);
      },
    };
  }

  root.Relay = {
    subscribe,
    subscribeAll,
    parseProgress,
    isTerminal,
    supersedes,
    watchArchive,
    fetchArchive,
    fileUrl,
    outputUrl,
    TERMINAL_STATUSES,
  };
})(typeof self !== "undefined" ? self : this);
