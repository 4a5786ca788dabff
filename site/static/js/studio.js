// The studio: copy and reveal fields (the stream key stays hidden on screen by default), the
// product cards' actions as fetches (no reload, no jump back to the top), the LIVE badge, the
// stream health and a small preview player, live.  Forms with data-confirm ask first; the text
// is data, never inline script (product names are the host's free text).  Without scripts every
// form still posts and the server redirects back.
(function () {
  "use strict";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const status = document.getElementById("studio-status");

  document.addEventListener("submit", function (event) {
    const message = event.target.dataset && event.target.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });

  document.addEventListener("click", function (event) {
    const copy = event.target.closest("[data-copy]");
    if (copy) {
      const field = document.getElementById(copy.dataset.copy);
      const done = function () {
        const label = copy.textContent;
        copy.textContent = "Copied";
        setTimeout(function () { copy.textContent = label; }, 1500);
      };
      // The Clipboard API needs a secure context (https or localhost); over plain http on a LAN
      // address fall back to selecting the text and the old copy command.
      const fallback = function () {
        const type = field.type;
        if (type === "password") field.type = "text";
        field.select();
        const ok = document.execCommand && document.execCommand("copy");
        field.type = type;
        if (ok) done();
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(done, fallback);
      } else {
        fallback();
      }
    }
    const reveal = event.target.closest("[data-reveal]");
    if (reveal) {
      const field = document.getElementById(reveal.dataset.reveal);
      const hidden = field.type === "password";
      field.type = hidden ? "text" : "password";
      reveal.textContent = hidden ? "Hide" : "Show";
    }
  });

  // ---- product cards ---------------------------------------------------------------------
  function say(text) { status.hidden = !text; status.textContent = text || ""; }

  // The server's answer to every card action is the host's whole product state: apply it to
  // every card, so the page never disagrees with what the room shows.
  function applyState(state) {
    const byId = {};
    state.products.forEach(function (p) { byId[p.id] = p; });
    document.querySelectorAll(".studio-product").forEach(function (card) {
      const p = byId[card.dataset.productId];
      if (!p) { card.remove(); return; }
      const pinned = state.pinned_product_id === p.id;
      card.classList.toggle("pinned", pinned);
      card.classList.toggle("hidden-product", !p.shown);
      card.querySelector("[data-pinned-badge]").hidden = !pinned;
      card.querySelector("[data-hidden-badge]").hidden = p.shown;
      const pin = card.querySelector('[data-action="pin"]');
      pin.querySelector('[name="product_id"]').value = pinned ? "" : p.id;
      const pinButton = pin.querySelector("button");
      pinButton.textContent = pinned ? "Unpin" : "Pin";
      pinButton.disabled = !p.shown;
      const shown = card.querySelector('[data-action="shown"]');
      shown.querySelector('[name="shown"]').value = p.shown ? "0" : "1";
      shown.querySelector("button").textContent = p.shown ? "Hide" : "Show";
      const stock = card.querySelector('[data-action="stock"]');
      stock.querySelector('[name="stock_was"]').value = p.stock;
      const input = stock.querySelector('[name="stock"]');
      if (document.activeElement !== input) input.value = p.stock;
    });
  }

  const DONE = {
    pin: function (r) { return r.pinned ? "Pinned " + r.pinned.name + ": viewers see it now." : "Unpinned."; },
    shown: function () { return "Saved: the room shows your products as listed here."; },
    stock: function () { return "Stock saved."; },
    delete: function () { return "Product deleted."; },
  };

  document.addEventListener("submit", async function (event) {
    const form = event.target;
    const action = form.dataset && form.dataset.action;
    if (!action || event.defaultPrevented) return;
    event.preventDefault();
    const error = form.querySelector("[data-error]");
    if (error) error.hidden = true;
    const buttons = form.querySelectorAll("button");
    buttons.forEach(function (b) { b.disabled = true; });
    try {
      const response = await fetch(form.action, {
        method: "POST", body: new URLSearchParams(new FormData(form)), credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf, "Accept": "application/json" },
      });
      const result = await response.json();
      if (result.state) applyState(result.state);
      if (!response.ok) {
        if (error) { error.hidden = false; error.textContent = result.error; } else say(result.error);
        return;
      }
      applyState(result);
      say(DONE[action](result));
    } catch (e) {
      say("Could not reach the site. Check your connection and try again.");
    } finally {
      buttons.forEach(function (b) { b.disabled = false; });
      // a hidden product cannot be pinned: applyState's verdict stands over the re-enable
      document.querySelectorAll(".studio-product.hidden-product [data-pin]").forEach(function (b) { b.disabled = true; });
    }
  });

  // ---- going live: badge, waiting → live, preview, health -----------------------------------
  const settings = document.getElementById("stream-settings");
  const badge = document.getElementById("studio-live");
  const streamState = document.getElementById("stream-state");
  const line = document.getElementById("stream-line");
  const preview = document.getElementById("preview");
  let player = null;

  function startPreview() {
    if (player || preview.getAttribute("src")) return;
    if (!window.mpegts || !mpegts.getFeatureList().mseLivePlayback) {
      // no Media Source (older iPhones): the browser's own player reads the LL-HLS playlist
      const hls = settings.dataset.hlsUrl;
      if (hls && preview.canPlayType("application/vnd.apple.mpegurl")) {
        preview.src = hls; preview.hidden = false; preview.play().catch(function () { /* muted */ });
      }
      return;
    }
    player = mpegts.createPlayer(
      { type: "flv", isLive: true, url: settings.dataset.playUrl, hasAudio: true, hasVideo: true, cors: true },
      { enableStashBuffer: false, liveBufferLatencyChasing: true, lazyLoad: false, autoCleanupSourceBuffer: true });
    player.attachMediaElement(preview);
    player.on(mpegts.Events.ERROR, stopPreview);  // the next poll that sees the stream retries
    player.load();
    const started = preview.play();
    if (started && started.catch) started.catch(function () { /* muted: plays anyway */ });
    preview.hidden = false;
  }

  function stopPreview() {
    if (player) {
      try { player.pause(); player.unload(); player.detachMediaElement(); player.destroy(); } catch (e) { /* gone */ }
      player = null;
    }
    if (preview.getAttribute("src")) { preview.removeAttribute("src"); preview.load(); }
    preview.hidden = true;
  }

  if (settings) {
    window.WatchBuyHealth.watch(document.getElementById("stream-health"), function (report) {
      const live = report.live && report.receiving;
      badge.textContent = report.live ? "LIVE" : "OFFLINE";
      badge.classList.toggle("live", report.live);
      streamState.dataset.state = live ? "live" : "waiting";
      line.textContent = live ? "You're live" : "Waiting for your stream…";
      if (live) startPreview(); else stopPreview();
    });
  }
})();
