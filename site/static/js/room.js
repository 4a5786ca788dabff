// The live room: low-latency HTTP-FLV (mpegts.js) or the browser's own LL-HLS player, live and
// offline without reloads, chat, the pinned product, stock and add-to-cart.  One websocket
// brings every room event.
(function () {
  "use strict";
  const room = document.querySelector(".room");
  if (!room) return;
  const slug = room.dataset.slug;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const video = document.getElementById("video");
  const offline = document.getElementById("offline");
  const badge = document.getElementById("live-badge");
  const unmute = document.getElementById("unmute");
  let playUrl = room.dataset.playUrl;  // HTTP-FLV (mpegts.js)
  let hlsUrl = room.dataset.hlsUrl;  // LL-HLS playlist, for browsers that play HLS themselves
  let live = room.dataset.live === "true";
  let player = null;  // the mpegts.js player while HTTP-FLV plays
  let mode = null;  // "flv" | "hls" | null: what the <video> is playing now
  let flvFailed = false;  // HTTP-FLV failed to start in this show: use HLS where it can
  let retryTimer = null;
  let retryDelay = 1000;
  let me = null;
  let isHost = false;

  // ---- player ---------------------------------------------------------------------------
  // HTTP-FLV through mpegts.js wherever Media Source Extensions exist: about half a second
  // behind the host.  mpegts.js 1.8 uses ManagedMediaSource where MediaSource is missing
  // (iOS 17.1+), so that counts.  Elsewhere (older iPhones, browsers without MSE) the
  // browser's own HLS player reads the node's LL-HLS playlist.
  function canPlayFlv() {
    return !!(window.mpegts && mpegts.getFeatureList().mseLivePlayback);
  }

  function canPlayHls() {
    const answer = video.canPlayType("application/vnd.apple.mpegurl");
    return !!hlsUrl && (answer === "probably" || answer === "maybe");
  }

  function destroyPlayer() {
    if (player) {
      try { player.pause(); player.unload(); player.detachMediaElement(); player.destroy(); } catch (e) { /* already gone */ }
      player = null;
    }
    if (mode === "hls") {
      video.pause();
      video.removeAttribute("src");
      video.load();  // drops the playlist's connection; no source, so no error event
    }
    mode = null;
    delete room.dataset.player;
  }

  function scheduleRetry() {
    clearTimeout(retryTimer);
    if (!live) return;
    retryTimer = setTimeout(startPlayer, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 8000);
  }

  function cannotPlay() {
    offline.hidden = false;
    offline.replaceChildren();
    const strong = document.createElement("strong"); strong.textContent = "This browser cannot play the live show";
    const hint = document.createElement("span"); hint.textContent = "Open this page in a recent Chrome, Edge, Firefox or Safari.";
    offline.append(strong, hint);
  }

  function play() {
    const started = video.play();
    if (started && started.catch) started.catch(function () { /* autoplay rules: muted video plays anyway */ });
  }

  function startPlayer() {
    destroyPlayer();
    if (!live) return;
    if (canPlayFlv() && !(flvFailed && canPlayHls())) startFlv();
    else if (canPlayHls()) startHls();
    else cannotPlay();
  }

  function startFlv() {
    if (!window.MediaSource && window.ManagedMediaSource) {
      // A ManagedMediaSource does not open while AirPlay could take the video over, and
      // iPhones play inline only when asked to.
      video.disableRemotePlayback = true;
      video.playsInline = true;
    }
    mode = "flv";
    room.dataset.player = "flv";
    let playing = false;
    player = mpegts.createPlayer(
      { type: "flv", isLive: true, url: playUrl, hasAudio: true, hasVideo: true, cors: true },
      {
        enableStashBuffer: false,        // hand data to the decoder at once
        // Joining mid-GOP puts up to a keyframe interval in the buffer: play slightly faster
        // until about half a second is left (smooth, no skipped frames)…
        liveSync: true,
        liveSyncMaxLatency: 0.9,
        liveSyncTargetLatency: 0.5,
        liveSyncPlaybackRate: 1.15,
        // …and jump to the live edge when far behind (after a stall or a background tab).
        liveBufferLatencyChasing: true,
        liveBufferLatencyMaxLatency: 1.3,
        liveBufferLatencyMinRemain: 0.5,
        lazyLoad: false,
        autoCleanupSourceBuffer: true,
      }
    );
    player.attachMediaElement(video);
    document.dispatchEvent(new CustomEvent("watchbuy:player", { detail: { player: player, video: video } }));
    player.on(mpegts.Events.ERROR, function () {
      destroyPlayer();
      // Never started (a proxy that buffers or blocks FLV, an MSE that refuses the codec):
      // a browser that plays HLS itself switches to it for this show.  After a start, an
      // error is the stream going away: try FLV again.
      if (!playing && canPlayHls()) { flvFailed = true; startPlayer(); } else scheduleRetry();
    });
    player.on(mpegts.Events.LOADING_COMPLETE, function () { destroyPlayer(); scheduleRetry(); });
    player.load();
    play();
    video.addEventListener("playing", function () { playing = true; retryDelay = 1000; }, { once: true });
  }

  function startHls() {
    mode = "hls";
    room.dataset.player = "hls";
    video.playsInline = true;
    video.src = hlsUrl;  // the browser follows the live playlist, parts and all, by itself
    play();
    video.addEventListener("playing", function () { retryDelay = 1000; }, { once: true });
  }

  // The native HLS player reports through the element: a playlist that fails (the node
  // restarted the stream) or ends (EXT-X-ENDLIST while the room is still live) starts over.
  function onNativeEnd() {
    if (mode !== "hls") return;
    destroyPlayer();
    scheduleRetry();
  }
  video.addEventListener("error", onNativeEnd);
  video.addEventListener("ended", onNativeEnd);

  function setLive(isLive, url, hls) {
    if (url) playUrl = url;
    if (hls) hlsUrl = hls;
    if (isLive && !live) flvFailed = false;  // a new show: HTTP-FLV gets another chance
    live = isLive;
    room.dataset.live = String(isLive);
    offline.hidden = isLive;
    badge.textContent = isLive ? "LIVE" : "OFFLINE";
    badge.classList.toggle("live", isLive);
    if (isLive) { retryDelay = 1000; startPlayer(); } else { clearTimeout(retryTimer); destroyPlayer(); }
  }

  if (video.muted) unmute.hidden = false;
  unmute.addEventListener("click", function () { video.muted = false; unmute.hidden = true; });

  // ---- products and cart -------------------------------------------------------------------
  function productHtml(p) {
    const el = document.createElement("article");
    el.className = "product";
    el.dataset.productId = p.id;
    if (p.image) { const img = document.createElement("img"); img.src = p.image; img.alt = ""; el.appendChild(img); }
    else { const d = document.createElement("div"); d.className = "noimage"; el.appendChild(d); }
    const body = document.createElement("div"); body.className = "product-body";
    const h = document.createElement("h3"); h.textContent = p.name; body.appendChild(h);
    const price = document.createElement("p"); price.className = "price"; price.textContent = p.price; body.appendChild(price);
    const stock = document.createElement("p"); stock.className = "stock"; stock.dataset.stock = ""; stock.textContent = p.stock + " in stock"; body.appendChild(stock);
    const b = document.createElement("button"); b.type = "button"; b.className = "add-to-cart"; b.dataset.add = p.id; b.textContent = "Add to cart"; b.disabled = p.stock < 1; body.appendChild(b);
    el.appendChild(body);
    return el;
  }

  // What the page shows now (server-rendered first), so that the state poll can repair events
  // missed while the websocket was down.
  let shown = { pinned: null, products: [] };
  try { shown = JSON.parse(document.getElementById("room-state").textContent); } catch (e) { /* no state */ }
  function canon(value) {  // JSON with sorted keys: the page's and the API's key orders differ
    return JSON.stringify(value === undefined ? null : value, function (k, x) {
      if (!x || typeof x !== "object" || Array.isArray(x)) return x;
      return Object.keys(x).sort().reduce(function (o, key) { o[key] = x[key]; return o; }, {});
    });
  }

  function showProducts(products) {
    shown.products = products;
    const list = document.getElementById("product-list");
    list.replaceChildren();
    products.forEach(function (p) { const li = document.createElement("li"); li.appendChild(productHtml(p)); list.appendChild(li); });
    const none = document.getElementById("no-products");
    if (none) none.hidden = products.length > 0;
  }

  // One product's stock (the checkout rush sends these, coalesced, instead of whole lists).
  function showStock(id, stock) {
    [shown.pinned].concat(shown.products).forEach(function (p) { if (p && p.id === id) p.stock = stock; });
    document.querySelectorAll('[data-product-id="' + id + '"]').forEach(function (el) {
      const text = el.querySelector(".stock"); if (text) text.textContent = stock + " in stock";
      const button = el.querySelector(".add-to-cart"); if (button) button.disabled = stock < 1;
    });
  }

  function showPinned(p) {
    shown.pinned = p || null;
    const box = document.getElementById("pinned");
    box.replaceChildren();
    if (p) box.appendChild(productHtml(p));
    box.hidden = !p;
  }

  // Another script (cues.js: the pin at its moment in the video) says which card to show.
  document.addEventListener("watchbuy:show-pin", function (event) { showPinned(event.detail); });

  const cartStatus = document.getElementById("cart-status");
  document.addEventListener("click", async function (event) {
    const button = event.target.closest("[data-add]");
    if (!button) return;
    if (room.dataset.loggedIn !== "true") { location.href = "/login?next=/room/" + slug; return; }
    button.disabled = true;
    const body = new URLSearchParams({ product_id: button.dataset.add, quantity: "1" });
    try {
      const response = await fetch("/cart/add", {
        method: "POST", body: body, credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf, "Accept": "application/json" },
      });
      const result = await response.json();
      cartStatus.hidden = false;
      cartStatus.textContent = result.ok ? "Added to your cart. " : result.error;
      if (result.ok) { const a = document.createElement("a"); a.href = "/cart"; a.textContent = "Go to cart →"; cartStatus.appendChild(a); }
    } catch (e) {
      cartStatus.hidden = false;
      cartStatus.textContent = "Could not reach the shop. Try again.";
    } finally {
      button.disabled = false;
    }
  });

  // ---- chat and room events ------------------------------------------------------------------
  const messages = document.getElementById("messages");
  const chatError = document.getElementById("chat-error");

  function addMessage(m) {
    const li = document.createElement("li");
    li.dataset.messageId = m.id;
    const name = document.createElement("strong"); name.textContent = m.name; li.appendChild(name);
    // The server's flag, not the name, says who the host is: a viewer cannot earn the badge.
    if (m.is_host) { const badge = document.createElement("span"); badge.className = "host-badge"; badge.textContent = "Host"; li.appendChild(badge); }
    const text = document.createElement("span"); text.textContent = " " + m.text; li.appendChild(text);  // text, never HTML
    if (isHost && m.user_id !== me) {
      const del = document.createElement("button"); del.className = "link small"; del.textContent = "delete";
      del.onclick = function () { send({ type: "delete", id: m.id }); };
      const mute = document.createElement("button"); mute.className = "link small"; mute.textContent = "mute";
      mute.onclick = function () { send({ type: "mute", user_id: m.user_id }); };
      li.append(" ", del, " ", mute);
    }
    messages.appendChild(li);
    while (messages.children.length > 200) messages.removeChild(messages.firstChild);
    messages.scrollTop = messages.scrollHeight;
  }

  let socket = null;
  function send(data) { if (socket && socket.readyState === 1) socket.send(JSON.stringify(data)); }
  window.WatchBuyRoom = { slug: slug, csrf: csrf, send: send };

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + "/ws/room/" + encodeURIComponent(slug));
    socket.onmessage = function (event) {
      const data = JSON.parse(event.data);
      document.dispatchEvent(new CustomEvent("watchbuy:room-event", { detail: data }));
      switch (data.type) {
        case "hello":
          me = data.user_id; isHost = data.is_host;
          if (room.dataset.socket) refresh();  // a reconnect: catch up on what was missed
          room.dataset.socket = "open";
          messages.replaceChildren();
          data.messages.forEach(addMessage);
          break;
        case "chat": addMessage(data); break;
        case "deleted": {
          const li = messages.querySelector('[data-message-id="' + data.id + '"]');
          if (li) li.remove();
          break;
        }
        case "muted": if (data.user_id === me) { chatError.hidden = false; chatError.textContent = "The host has muted you."; } break;
        case "error": chatError.hidden = false; chatError.textContent = data.error; break;
        case "live": setLive(true, data.play_url, data.hls_url); break;
        case "offline": setLive(false); break;
        case "pinned": showPinned(data.product); break;
        case "products": showProducts(data.products); break;
        case "stock": showStock(data.product_id, data.stock); break;
      }
    };
    socket.onclose = function (event) {
      room.dataset.socket = "closed";
      // 4429 too many sockets, 1008 too many frames: come back slowly; otherwise soon (4401,
      // the session ended: the page reconnects as a visitor).
      setTimeout(connect, event.code === 4429 || event.code === 1008 ? 30000 : 2000);
    };
  }
  connect();

  const form = document.getElementById("chat-form");
  if (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      const input = document.getElementById("chat-input");
      const text = input.value.trim();
      if (!text) return;
      chatError.hidden = true;
      send({ type: "chat", text: text });
      input.value = "";
    });
  }

  // Viewer counts come from the media node; the room state is also the fallback for events
  // missed while the websocket was reconnecting.
  async function refresh() {
    try {
      const response = await fetch("/api/rooms/" + encodeURIComponent(slug), { credentials: "same-origin" });
      if (!response.ok) return;
      const state = await response.json();
      document.getElementById("viewer-count").textContent = state.viewers;
      if (state.live !== live) setLive(state.live, state.play_url, state.hls_url);
      if (canon(state.pinned) !== canon(shown.pinned)) showPinned(state.pinned);
      if (canon(state.products) !== canon(shown.products)) showProducts(state.products);
    } catch (e) { /* try again on the next tick */ }
  }
  setInterval(refresh, 5000);

  // Keep latency low after tab switches: jump to the live edge when far behind.
  setInterval(function () {
    if (mode !== "flv" || video.paused || !video.buffered.length) return;
    const end = video.buffered.end(video.buffered.length - 1);
    if (end - video.currentTime > 2.5) video.currentTime = end - 0.3;
  }, 1000);

  if (live) startPlayer();
})();
