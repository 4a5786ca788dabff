// The live room: low-latency HTTP-FLV (mpegts.js) or the browser's own LL-HLS player, live and
// offline without reloads, chat, the pinned product, stock, hearts, the viewer count, the
// "just bought" ticker, add-to-cart and the start of buy-now (buy.js shows the sheet).  One
// websocket brings every room event.
//
// The contract with the other scripts of the room (they never reach into this file):
//   - every websocket message is re-sent as document "watchbuy:room-event" (detail: the data);
//   - a new mpegts.js player is announced as document "watchbuy:player" ({player, video});
//   - document "watchbuy:show-pin" (detail: a product card or null) shows that pinned card;
//   - window.WatchBuyRoom = {slug, csrf, send(obj), now(), product(id), cartCount(n)}.
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
  const viewersBox = document.getElementById("viewers");
  const viewerCount = document.getElementById("viewer-count");
  const loggedIn = room.dataset.loggedIn === "true";
  const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");
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
  let clockOffset = 0;  // server clock minus this browser's clock, in ms
  let clockRtt = Infinity;  // the round trip the offset was measured over (the best one wins)

  // The layout's own measure of the top bar (phones give the video the rest of the screen).
  const topbar = document.querySelector(".topbar");
  function measureTopbar() {
    if (topbar) document.documentElement.style.setProperty("--topbar-h", topbar.offsetHeight + "px");
  }
  measureTopbar();
  window.addEventListener("resize", measureTopbar);

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
    unmute.hidden = true;
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
    document.dispatchEvent(new CustomEvent("watchbuy:player", { detail: { player: player, video: video } }));
    player.attachMediaElement(video);
    player.on(mpegts.Events.ERROR, function () {
      destroyPlayer();
      // Never started (a proxy that buffers or blocks FLV, an MSE that refuses the codec):
      // a browser that plays HLS itself switches to it for this show.  After a start, an
      // error is the stream going away: try FLV again.
      if (!playing && canPlayHls()) { flvFailed = true; startPlayer(); } else scheduleRetry();
    });
    player.on(mpegts.Events.LOADING_COMPLETE, function () { destroyPlayer(); scheduleRetry(); });
    // The stream's own size (onMetaData) shapes the layout before the first frame decodes.
    player.on(mpegts.Events.MEDIA_INFO, function (info) {
      if (info && info.width && info.height) setAspect(info.width, info.height);
    });
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

  // The layout follows the stream's real shape: "portrait" streams cover a phone's screen and
  // get a tall player on desktop; the element's resize event follows a host who turns the phone.
  function setAspect(width, height) {
    if (!width || !height) return;
    room.style.setProperty("--ar", String(width / height));
    room.dataset.orientation = height > width ? "portrait" : "landscape";
  }
  video.addEventListener("loadedmetadata", function () { setAspect(video.videoWidth, video.videoHeight); });
  video.addEventListener("resize", function () { setAspect(video.videoWidth, video.videoHeight); });

  function showUnmute() {
    // Never over the offline or ended card: only while the show plays, muted.
    unmute.hidden = !(live && video.muted && offline.hidden);
  }

  function setLive(isLive, url, hls) {
    if (url) playUrl = url;
    if (hls) hlsUrl = hls;
    if (isLive && !live) flvFailed = false;  // a new show: HTTP-FLV gets another chance
    live = isLive;
    room.dataset.live = String(isLive);
    offline.hidden = isLive;
    badge.textContent = isLive ? "LIVE" : "OFFLINE";
    badge.classList.toggle("live", isLive);
    // The count is of people watching the show: none once it ended.
    viewersBox.hidden = !isLive;
    showUnmute();
    if (isLive) { retryDelay = 1000; startPlayer(); } else { clearTimeout(retryTimer); destroyPlayer(); }
  }

  showUnmute();
  unmute.addEventListener("click", function () { video.muted = false; unmute.hidden = true; play(); });
  video.addEventListener("volumechange", showUnmute);

  // ---- the clock ------------------------------------------------------------------------
  // Countdowns (flash sales) run on the server's clock: the offset is measured over the
  // websocket ({"type": "time"}), keeping the measurement with the shortest round trip.
  function serverMs(value) {
    if (typeof value === "number") return value < 1e11 ? value * 1000 : value;  // seconds or ms
    if (typeof value === "string") { const t = Date.parse(value); return isNaN(t) ? null : t; }
    return null;
  }
  let timeAsked = 0;
  function askTime() { timeAsked = Date.now(); send({ type: "time" }); }
  function onTime(serverTime) {
    const t = serverMs(serverTime);
    if (t === null || !timeAsked) return;
    const now = Date.now(), rtt = now - timeAsked;
    if (rtt <= clockRtt) { clockRtt = rtt; clockOffset = t - (timeAsked + now) / 2; }
    timeAsked = 0;
  }
  function now() { return Date.now() + clockOffset; }

  // ---- products, stock, sales and the cart ------------------------------------------------
  // "Only N left" at or under the site's threshold (WATCHBUY_LOW_STOCK_THRESHOLD, as the server
  // renders the cards; the cards' own "low_stock" is a yes/no for the stock they were sent with)
  const LOW_STOCK = Number(room.dataset.lowStock || 5);
  const sales = {};  // product id -> the running flash sale (from hello and "sale" events)

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;  // text, never HTML
    return node;
  }

  function stockLine(box, p) {
    box.replaceChildren();
    if (p.stock < 1) box.append(el("span", "badge soldout", "Sold out"));
    else if (p.stock <= LOW_STOCK) box.append(el("span", "low", "Only " + p.stock + " left"));
    else box.append(document.createTextNode(p.stock + " in stock"));
    if (p.sold) box.append(" ", el("span", "sold", "· " + p.sold + " sold"));
  }

  function saleOf(p) { return sales[p.id] || p.sale || null; }

  function priceLine(box, p) {
    box.replaceChildren();
    const sale = saleOf(p);
    const salePrice = sale ? sale.sale_price : p.sale_price;
    if (salePrice) {
      // the server's card says "price" = what it costs now: the regular one is regular_price
      box.append(el("span", "sale-price", salePrice), " ", el("s", "was", p.regular_price || p.price));
      if (sale && sale.ends_at) {
        const tag = el("span", "sale-badge", "Flash sale");
        const clock = el("span", "countdown"); clock.dataset.endsAt = String(serverMs(sale.ends_at));
        tag.append(" ", clock);
        box.append(" ", tag);
      }
    } else {
      box.textContent = p.price;
    }
  }

  // The same parts as templates/_product.html.
  function productCard(p) {
    const card = el("article", "product");
    card.dataset.productId = p.id;
    if (p.image) { const img = el("img"); img.src = p.image; img.alt = p.name; img.loading = "lazy"; card.append(img); }
    else { const d = el("div", "noimage"); d.setAttribute("role", "img"); d.setAttribute("aria-label", p.name); card.append(d); }
    const body = el("div", "product-body");
    body.append(el("h3", "", p.name));
    if (p.description) body.append(el("p", "description", p.description));
    const price = el("p", "price"); priceLine(price, p); body.append(price);
    const stock = el("p", "stock"); stock.dataset.stock = ""; stockLine(stock, p); body.append(stock);
    const actions = el("div", "product-actions");
    const buy = el("button", "buy-now", "Buy now"); buy.type = "button"; buy.dataset.buy = p.id; buy.disabled = p.stock < 1;
    const add = el("button", "add-to-cart secondary", "Add to cart"); add.type = "button"; add.dataset.add = p.id; add.disabled = p.stock < 1;
    const feedback = el("span", "feedback"); feedback.setAttribute("role", "status"); feedback.setAttribute("aria-live", "polite");
    actions.append(buy, add, feedback);
    body.append(actions);
    card.append(body);
    card.classList.toggle("sold-out", p.stock < 1);
    return card;
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

  function findProduct(id) {
    id = Number(id);
    return [shown.pinned].concat(shown.products).find(function (p) { return p && p.id === id; }) || null;
  }

  function showProducts(products) {
    shown.products = products;
    const list = document.getElementById("product-list");
    list.replaceChildren();
    products.forEach(function (p) { const li = el("li"); li.append(productCard(p)); list.append(li); });
    document.getElementById("no-products").hidden = products.length > 0;
    document.getElementById("product-count").textContent = products.length;
  }

  // Re-draws a product's cards in place (stock, sold, sale), keeping any "Added" note.
  function redraw(id) {
    const p = findProduct(id);
    if (!p) return;
    document.querySelectorAll('.product[data-product-id="' + p.id + '"]').forEach(function (card) {
      const stock = card.querySelector(".stock"); if (stock) stockLine(stock, p);
      const price = card.querySelector(".price"); if (price) priceLine(price, p);
      card.querySelectorAll("[data-add],[data-buy]").forEach(function (b) { b.disabled = p.stock < 1; });
      card.classList.toggle("sold-out", p.stock < 1);
    });
    tick();
  }

  // One product's stock (the checkout rush sends these, coalesced, instead of whole lists).
  function showStock(id, stock, sold) {
    [shown.pinned].concat(shown.products).forEach(function (p) {
      if (p && p.id === id) { p.stock = stock; if (typeof sold === "number") p.sold = sold; }
    });
    redraw(id);
  }

  function showPinned(p) {
    shown.pinned = p || null;
    const box = document.getElementById("pinned");
    box.replaceChildren();
    if (p) box.append(productCard(p));
    box.hidden = !p;
    tick();
  }
  document.addEventListener("watchbuy:show-pin", function (event) { showPinned(event.detail || null); });

  // Flash-sale countdowns, on the server's clock.
  function tick() {
    document.querySelectorAll(".countdown[data-ends-at]").forEach(function (node) {
      const left = Math.max(0, Math.round((Number(node.dataset.endsAt) - now()) / 1000));
      node.textContent = Math.floor(left / 60) + ":" + String(left % 60).padStart(2, "0");
    });
  }
  setInterval(tick, 1000);

  function onSale(sale) {
    if (!sale || !sale.product_id) return;
    sales[sale.product_id] = sale;
    redraw(sale.product_id);
  }
  function onSaleEnded(data) {
    delete sales[data.product_id];
    [shown.pinned].concat(shown.products).forEach(function (p) {
      if (p && p.id === data.product_id) {
        delete p.sale; delete p.sale_price;
        if (p.regular_price) p.price = p.regular_price;  // the card's "price" was the sale's
      }
    });
    redraw(data.product_id);
  }

  // The header's cart badge.
  const cartBadge = document.getElementById("cart-count");
  function cartCount(n) {
    if (!cartBadge || typeof n !== "number") return;
    cartBadge.textContent = n;
    cartBadge.hidden = n < 1;
  }

  // A note beside the control that was pressed: "Added", or the error in the error style.
  function feedback(button, text, isError) {
    const box = button.parentElement.querySelector(".feedback");
    if (!box) return;
    box.textContent = text;
    box.classList.toggle("error", !!isError);
    box.classList.toggle("ok", !isError);
    clearTimeout(box.clearTimer);
    if (!isError) box.clearTimer = setTimeout(function () { box.textContent = ""; }, 4000);
  }

  async function addToCart(button, id) {
    button.disabled = true;
    const body = new URLSearchParams({ product_id: String(id), quantity: "1" });
    try {
      const response = await fetch("/cart/add", {
        method: "POST", body: body, credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf, "Accept": "application/json" },
      });
      const result = await response.json().catch(function () { return {}; });
      if (response.ok && result.ok) {
        feedback(button, "Added ✓");
        if (typeof result.cart_count === "number") cartCount(result.cart_count);
        else if (cartBadge) cartCount(Number(cartBadge.textContent || 0) + 1);
      } else {
        feedback(button, result.error || "Could not add this. Try again.", true);
      }
    } catch (e) {
      feedback(button, "Could not reach the shop. Try again.", true);
    } finally {
      const p = findProduct(id);
      button.disabled = !!p && p.stock < 1;
    }
  }

  function buyNow(button, id) {
    const product = findProduct(id);
    document.dispatchEvent(new CustomEvent("watchbuy:buy", { detail: { product: product, id: Number(id), opener: button } }));
  }

  document.addEventListener("click", function (event) {
    const add = event.target.closest("[data-add]");
    const buy = event.target.closest("[data-buy]");
    if (!add && !buy) return;
    const id = (add || buy).dataset.add || (add || buy).dataset.buy;
    if (!loggedIn) { window.WatchBuyResume.loginFirst(add ? "add" : "buy", id); return; }  // buy.js
    if (add) addToCart(add, id); else buyNow(buy, id);
  });

  // Back from signing up or logging in: do what was begun, once (the address loses it), on a
  // button the shopper can see: the pinned card's, else the product list's (opened on phones).
  function resumeAction() {
    const begun = loggedIn ? window.WatchBuyResume.take() : null;  // buy.js: once, if begun here
    if (!begun) return;
    const action = begun.action, id = begun.id;
    const selector = '[data-' + action + '="' + CSS.escape(id) + '"]';
    let button = document.querySelector("#pinned " + selector);
    if (!button) {
      button = document.querySelector("#product-list " + selector);
      if (button && action === "add" && phoneSheet.matches) openProducts.click();
    }
    if (!button) return;
    if (action === "add") addToCart(button, id); else buyNow(button, id);
  }

  // ---- the product sheet (phones) ---------------------------------------------------------
  const productsPanel = document.getElementById("products");
  const openProducts = document.getElementById("open-products");
  const phoneSheet = window.matchMedia("(max-width: 600px) and (orientation: portrait)");
  productsPanel.dataset.sheetKeep = "true";  // a panel beside the video on wider screens
  openProducts.addEventListener("click", function () {
    if (window.WatchBuySheet.isOpen(productsPanel)) { window.WatchBuySheet.hide(productsPanel); return; }
    openProducts.setAttribute("aria-expanded", "true");
    if (phoneSheet.matches) {
      window.WatchBuySheet.show(productsPanel, openProducts, function () { openProducts.setAttribute("aria-expanded", "false"); });
    } else {
      productsPanel.scrollIntoView({ behavior: reducedMotion.matches ? "auto" : "smooth", block: "start" });
      productsPanel.focus({ preventScroll: true });
      openProducts.setAttribute("aria-expanded", "false");
    }
  });

  // After every script of the room has started listening (the page has loaded).
  window.addEventListener("load", resumeAction);

  // ---- share --------------------------------------------------------------------------------
  const shareStatus = document.getElementById("share-status");
  document.getElementById("share").addEventListener("click", async function () {
    const url = location.origin + "/room/" + slug;
    const title = room.dataset.title || document.title;
    if (navigator.share) {
      try { await navigator.share({ title: title, text: "Watch " + title + " live", url: url }); return; }
      catch (e) { if (e && e.name === "AbortError") return; /* else fall back to copying */ }
    }
    let copied = false;
    try { await navigator.clipboard.writeText(url); copied = true; } catch (e) { /* no clipboard: show it */ }
    shareStatus.hidden = false;
    shareStatus.textContent = copied ? "Link copied" : url;
    shareStatus.classList.toggle("error", false);
    clearTimeout(shareStatus.clearTimer);
    shareStatus.clearTimer = setTimeout(function () { shareStatus.hidden = true; }, copied ? 2500 : 10000);
  });

  // ---- hearts -------------------------------------------------------------------------------
  // Taps are counted here and sent at most once a second as {"type": "heart", "count": n}
  // (n ≤ 10, the server's batch limit): the socket's frame budget stays for chat.  The room
  // hears them back aggregated by the server, a few "hearts" events a second at most.
  const HEART_BATCH = 10;
  const heartsFloat = document.getElementById("hearts-float");
  const heartsCount = document.getElementById("hearts-count");
  let pendingHearts = 0;
  let heartsTotal = 0;
  function floatHeart(own) {
    if (reducedMotion.matches || heartsFloat.childElementCount > 24) return;
    const h = el("span", own ? "float-heart own" : "float-heart", "♥");
    h.style.setProperty("--drift", (Math.random() * 40 - 20).toFixed(0) + "px");
    h.addEventListener("animationend", function () { h.remove(); });
    heartsFloat.append(h);
  }
  document.getElementById("heart").addEventListener("click", function () {
    pendingHearts += 1;
    floatHeart(true);
  });
  setInterval(function () {
    if (!pendingHearts) return;
    const batch = Math.min(pendingHearts, HEART_BATCH);
    send({ type: "heart", count: batch });
    // A burst carries over to the next seconds, up to a few batches; beyond that a tap only
    // shows here (the server would drop it anyway: heart_rate per shopper).
    pendingHearts = Math.min(pendingHearts - batch, 3 * HEART_BATCH);
  }, 1000);
  function onHearts(count) {
    heartsTotal += count;
    heartsCount.textContent = heartsTotal > 999 ? Math.floor(heartsTotal / 1000) + "k" : heartsTotal;
    for (let i = 0; i < Math.min(count, 6); i++) setTimeout(floatHeart, i * 120);
  }

  // ---- "just bought" -------------------------------------------------------------------------
  const ticker = document.getElementById("ticker");
  function onBought(data) {
    ticker.textContent = (data.first_name || "Someone") + " just bought " + (data.product_name || "this");
    ticker.hidden = false;
    clearTimeout(ticker.clearTimer);
    ticker.clearTimer = setTimeout(function () { ticker.hidden = true; }, 5000);
  }

  // ---- chat and room events ------------------------------------------------------------------
  const messages = document.getElementById("messages");
  const chatError = document.getElementById("chat-error");

  function addMessage(m) {
    const li = document.createElement("li");
    li.dataset.messageId = m.id;
    const name = document.createElement("strong"); name.textContent = m.name; li.appendChild(name);
    // The server's flag, not the name, says who the host is: a viewer cannot earn the badge.
    if (m.is_host) { const hostBadge = document.createElement("span"); hostBadge.className = "host-badge"; hostBadge.textContent = "Host"; li.appendChild(hostBadge); }
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

  function showViewers(count) {
    if (typeof count === "number") viewerCount.textContent = count;
  }

  let socket = null;
  function send(data) { if (socket && socket.readyState === 1) socket.send(JSON.stringify(data)); }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + "/ws/room/" + encodeURIComponent(slug));
    socket.onopen = askTime;
    socket.onmessage = function (event) {
      const data = JSON.parse(event.data);
      document.dispatchEvent(new CustomEvent("watchbuy:room-event", { detail: data }));
      switch (data.type) {
        case "hello":
          me = data.user_id; isHost = data.is_host;
          // Catch up on what this socket was not there to hear: events between the page's
          // render (a kept page can be 2 s old) and the subscription, or while reconnecting.
          refresh();
          room.dataset.socket = "open";
          messages.replaceChildren();
          data.messages.forEach(addMessage);
          showViewers(data.viewers);
          (data.sales || []).forEach(onSale);
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
        case "ended": setLive(false); break;
        case "pinned": showPinned(data.product); break;
        case "products": showProducts(data.products); break;
        case "stock": showStock(data.product_id, data.stock, data.sold); break;
        case "sale": onSale(data.sale); break;
        case "sale_ended": onSaleEnded(data); break;
        case "bought": onBought(data); break;
        case "hearts": onHearts(data.count); break;
        case "viewers": showViewers(data.count); break;
        case "time": onTime(data.server_time); break;
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
  setInterval(askTime, 60000);  // clocks drift; a phone may sleep

  window.WatchBuyRoom = { slug: slug, csrf: csrf, send: send, now: now, product: findProduct, cartCount: cartCount };

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

  // The room state is the fallback for events missed while the websocket was reconnecting
  // (viewer counts come over the socket).  While the socket is open every change arrives on
  // it, so the state is read only once a minute as a safety net: a show's crowd polling every
  // 5 s would be 1000 requests/s for 5000 viewers, all asking what the socket already said.
  let refreshedAt = 0;
  async function refresh() {
    refreshedAt = Date.now();
    try {
      const response = await fetch("/api/rooms/" + encodeURIComponent(slug), { credentials: "same-origin" });
      if (!response.ok) return;
      const state = await response.json();
      if (state.live !== live) setLive(state.live, state.play_url, state.hls_url);
      if (canon(state.pinned) !== canon(shown.pinned)) showPinned(state.pinned);
      if (canon(state.products) !== canon(shown.products)) showProducts(state.products);
    } catch (e) { /* try again on the next tick */ }
  }
  setInterval(function () {
    const open = socket && socket.readyState === 1;
    if (!open || Date.now() - refreshedAt >= 60000) refresh();
  }, 5000);

  // Keep latency low after tab switches: jump to the live edge when far behind.
  setInterval(function () {
    if (mode !== "flv" || video.paused || !video.buffered.length) return;
    const end = video.buffered.end(video.buffered.length - 1);
    if (end - video.currentTime > 2.5) video.currentTime = end - 0.3;
  }, 1000);

  if (live) startPlayer();
})();
