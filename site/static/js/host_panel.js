// The host's panel in their own room: pin and unpin, show and hide, stock, flash sales, chat
// moderation and stream health.  Every action is a fetch (Accept: application/json) to the
// studio's routes; viewers hear the change over the room websocket, and so does this page
// (room.js shows the pinned card and the stock from the same events).  Moderation goes over
// the room websocket itself (window.WatchBuyRoom.send), which checks the sender is the host.
(function () {
  "use strict";
  const panel = document.getElementById("host-panel");
  if (!panel) return;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const list = document.getElementById("host-products");
  const status = document.getElementById("host-status");
  const liveBadge = document.getElementById("host-live");
  const flash = document.getElementById("flash-form");
  const flashError = document.getElementById("flash-error");
  const chat = document.getElementById("host-chat");
  let state = null;
  let me = null;

  // ---- where the panel is ------------------------------------------------------------------
  // A column beside the chat on wide screens; a sheet elsewhere, opened by the rail's "Host"
  // button (sheet.js keeps focus inside it, Escape and × close it, focus goes back).
  // (the button comes after this script in the page: one listener on the document finds it)
  const column = window.matchMedia("(min-width: 1100px)");
  panel.dataset.sheetKeep = "true";  // sheet.js: closing leaves the column in place
  document.addEventListener("click", function (event) {
    const opener = event.target.closest("#open-host");
    if (!opener) return;
    if (window.WatchBuySheet.isOpen(panel)) { window.WatchBuySheet.hide(panel); return; }
    if (column.matches) { panel.focus({ preventScroll: true }); return; }
    opener.setAttribute("aria-expanded", "true");
    window.WatchBuySheet.show(panel, opener, function () { opener.setAttribute("aria-expanded", "false"); });
  });

  function say(text) { status.hidden = !text; status.textContent = text || ""; }

  async function post(url, fields) {
    const response = await fetch(url, {
      method: "POST", body: new URLSearchParams(fields), credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, "Accept": "application/json" },
    });
    let body = {};
    try { body = await response.json(); } catch (e) { /* not JSON: status alone */ }
    return { ok: response.ok, status: response.status, body: body };
  }

  function button(text, className, onClick) {
    const b = document.createElement("button");
    b.type = "button"; b.className = className; b.textContent = text;
    b.addEventListener("click", onClick);
    return b;
  }

  // ---- products ----------------------------------------------------------------------------
  function render() {
    list.replaceChildren();
    if (!state.products.length) {
      const li = document.createElement("li"); li.className = "muted";
      li.textContent = "No products yet: add them in the studio."; list.appendChild(li);
    }
    state.products.forEach(function (p) {
      const pinned = state.pinned_product_id === p.id;
      const li = document.createElement("li");
      li.className = "host-product" + (pinned ? " pinned" : "") + (p.shown ? "" : " hidden-product");
      li.dataset.productId = p.id;
      const name = document.createElement("strong"); name.textContent = p.name;
      const meta = document.createElement("span"); meta.className = "muted small";
      meta.textContent = p.price + (p.shown ? "" : " · hidden");
      const head = document.createElement("div"); head.className = "host-product-head"; head.append(name, meta);
      const pin = button(pinned ? "Unpin" : "Pin", "small", function () { act("pin", "/studio/pin", { product_id: pinned ? "" : p.id }); });
      pin.dataset.hostPin = p.id; pin.disabled = !p.shown;
      const show = button(p.shown ? "Hide" : "Show", "secondary small", function () {
        act("shown", "/studio/products/" + p.id + "/shown", { shown: p.shown ? "0" : "1" });
      });
      show.dataset.hostShown = p.id;
      const sale = button("Flash sale", "secondary small", function () { openFlash(p); });
      sale.disabled = !p.shown;
      const stock = document.createElement("form"); stock.className = "host-stock";
      const input = document.createElement("input");
      input.name = "stock"; input.value = p.stock; input.inputMode = "numeric"; input.size = 4;
      input.setAttribute("aria-label", "Stock of " + p.name);
      const set = document.createElement("button"); set.type = "submit"; set.className = "secondary small"; set.textContent = "Set stock";
      const error = document.createElement("span"); error.className = "errors-inline"; error.hidden = true;
      stock.append(input, set, error);
      stock.addEventListener("submit", function (event) {
        event.preventDefault();
        act("stock", "/studio/products/" + p.id + "/stock", { stock: input.value.trim(), stock_was: p.stock }, error);
      });
      const actions = document.createElement("div"); actions.className = "host-actions"; actions.append(pin, show, sale);
      li.append(head, actions, stock);
      list.appendChild(li);
    });
  }

  async function act(kind, url, fields, errorBox) {
    say("");
    try {
      const r = await post(url, fields);
      if (r.body.state) { state = r.body.state; render(); }
      if (!r.ok) {
        const text = r.body.error || "That did not work (" + r.status + ").";
        if (errorBox) { errorBox.hidden = false; errorBox.textContent = text; } else say(text);
        return;
      }
      state = r.body; render();
      say(kind === "pin" ? (r.body.pinned ? "Pinned " + r.body.pinned.name + "." : "Unpinned.")
        : kind === "stock" ? "Stock saved." : "Saved.");
    } catch (e) {
      say("Could not reach the site. Check your connection and try again.");
    }
  }

  async function load() {
    try {
      const response = await fetch("/studio/state", { credentials: "same-origin", headers: { "Accept": "application/json" } });
      if (response.ok) { state = await response.json(); render(); }
    } catch (e) { /* the next room event tries again */ }
  }

  // ---- flash sale (POST /studio/flash) --------------------------------------------------------
  function openFlash(p) {
    flash.hidden = false;
    flashError.hidden = true;
    flash.elements.product_id.value = p.id;
    document.getElementById("flash-product-name").textContent = p.name;
    flash.elements.sale_price.focus({ preventScroll: true });
  }
  document.getElementById("flash-cancel").addEventListener("click", function () { flash.hidden = true; });
  flash.addEventListener("submit", async function (event) {
    event.preventDefault();
    flashError.hidden = true;
    flash.querySelectorAll("[aria-invalid]").forEach(function (i) { i.removeAttribute("aria-invalid"); });
    const f = flash.elements;
    const minutes = parseFloat(f.duration_minutes.value);
    if (!(minutes > 0)) { flashError.hidden = false; flashError.textContent = "Give the sale a length in minutes, e.g. 5."; return; }
    const fields = { product_id: f.product_id.value, duration_seconds: String(Math.round(minutes * 60)) };
    ["sale_price", "quantity", "per_shopper_limit"].forEach(function (name) {
      if (f[name].value.trim()) fields[name] = f[name].value.trim();
    });
    try {
      const r = await post("/studio/flash", fields);
      if (r.ok) { flash.hidden = true; say("Flash sale started: viewers see it now."); return; }
      flashError.hidden = false;
      const bad = r.body.field && flash.elements[r.body.field === "duration_seconds" ? "duration_minutes" : r.body.field];
      if (bad && bad.setAttribute) { bad.setAttribute("aria-invalid", "true"); bad.focus(); }
      // An unknown route answers 404 "Not Found"; the flash-sale route itself names its errors.
      flashError.textContent = r.status === 404 && r.body.error === "Not Found"
        ? "Flash sales are not available on this site yet."
        : (r.body.error || "The sale did not start (" + r.status + ").");
    } catch (e) {
      flashError.hidden = false; flashError.textContent = "Could not reach the site. Try again.";
    }
  });

  // ---- chat moderation ------------------------------------------------------------------------
  function addMessage(m) {
    const li = document.createElement("li");
    li.dataset.messageId = m.id;
    const who = document.createElement("strong"); who.textContent = m.name;
    const text = document.createElement("span"); text.textContent = " " + m.text;
    li.append(who, text);
    if (m.user_id !== me && !m.is_host) {
      li.append(" ",
        button("Delete", "link small danger", function () { window.WatchBuyRoom.send({ type: "delete", id: m.id }); }),
        " ",
        button("Mute", "link small", function () {
          window.WatchBuyRoom.send({ type: "mute", user_id: m.user_id });
          say(m.name + " is muted.");
        }));
    }
    chat.appendChild(li);
    while (chat.children.length > 50) chat.removeChild(chat.firstChild);
    chat.scrollTop = chat.scrollHeight;
  }

  let reload = null;
  document.addEventListener("watchbuy:room-event", function (event) {
    const data = event.detail;
    switch (data.type) {
      case "hello": me = data.user_id; chat.replaceChildren(); (data.messages || []).forEach(addMessage); break;
      case "chat": addMessage(data); break;
      case "deleted": { const li = chat.querySelector('[data-message-id="' + data.id + '"]'); if (li) li.remove(); break; }
      case "stock": {
        // sales during the show: this product's figure only, never a re-render that would
        // take the host's half-typed stock away (a rush sends a few of these a second)
        const p = state && state.products.find(function (x) { return x.id === data.product_id; });
        if (!p) break;
        p.stock = data.stock;
        const input = list.querySelector('[data-product-id="' + p.id + '"] input[name="stock"]');
        if (input && document.activeElement !== input) input.value = data.stock;
        break;
      }
      case "pinned":
        if (state) { state.pinned_product_id = data.product ? data.product.id : null; render(); }
        break;
      case "products":
        // the host's other page (the studio) changed the list: catch up once, not per event
        if (!reload) reload = setTimeout(function () { reload = null; load(); }, 300);
        break;
    }
  });

  window.WatchBuyHealth.watch(document.getElementById("host-health"), function (report) {
    liveBadge.textContent = report.live ? "LIVE" : "OFFLINE";
    liveBadge.classList.toggle("live", report.live);
  });
  load();
})();
