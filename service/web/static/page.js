/*
 * Helpers the dashboard (`/`, `/p/{id}`) and the batch pages (`/batches`, `/b/{id}`) share:
 * exposed as `RelayPage`, loaded before each page's own script.
 */
(function (root) {
  "use strict";

  const TOKEN_KEY = "relay.adminToken";
  const IMAGE = /\.(png|jpe?g|webp|gif|avif|svg)([?#]|$)/i;

  const $ = (id) => document.getElementById(id);

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    node.append(...children);
    return node;
  }

  /** The admin token: from #token=… (kept in sessionStorage, removed from the address bar). */
  function takeToken() {
    const given = new URLSearchParams(location.hash.slice(1)).get("token");
    if (given) {
      sessionStorage.setItem(TOKEN_KEY, given);
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  /** Every URL in a prediction's output (any nesting), in order. */
  function outputUrls(output) {
    const urls = [];
    (function walk(value) {
      if (typeof value === "string" && /^(https?:|data:image\/)/.test(value)) urls.push(value);
      else if (Array.isArray(value)) value.forEach(walk);
      else if (value && typeof value === "object") Object.values(value).forEach(walk);
    })(output);
    return urls;
  }

  function looksLikeImage(url) {
    return url.startsWith("data:image/") || IMAGE.test(new URL(url).pathname);
  }

  root.RelayPage = { TOKEN_KEY, $, el, takeToken, outputUrls, looksLikeImage };
})(window);
