/*
 * mapper's browser snippet: mapper.track(event, data) sends one event to
 * the mapper service this script was loaded from.
 *
 * It never reads or writes the visitor cookie (the server sets it, and it
 * is HttpOnly), and it holds no email, AC hash or key: who the visitor is
 * is decided on the server.
 */
(function () {
  "use strict";

  var script = document.currentScript;
  var endpoint = new URL("track", script ? script.src : location.href).href;

  function newEventId() {
    // The id lets the server drop a resent copy of the same event.
    if (window.crypto && crypto.randomUUID) {
      return crypto.randomUUID();
    }
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.prototype.map
      .call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); })
      .join("");
  }

  function track(event, data) {
    var body = JSON.stringify({ event: event, data: data, id: newEventId() });

    // text/plain keeps the request simple: no CORS preflight, and the
    // beacon survives the page being closed.
    var blob = new Blob([body], { type: "text/plain;charset=UTF-8" });
    if (navigator.sendBeacon && navigator.sendBeacon(endpoint, blob)) {
      return Promise.resolve(true);
    }

    return fetch(endpoint, {
      method: "POST",
      body: body,
      headers: { "Content-Type": "text/plain;charset=UTF-8" },
      credentials: "include",
      keepalive: true,
      mode: "cors",
    }).then(
      function (response) { return response.status === 202; },
      function () { return false; }
    );
  }

  window.mapper = { track: track };
})();
