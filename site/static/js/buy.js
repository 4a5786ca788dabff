// Buy now: a confirm sheet in the room (never leaving it) with the total, the address and the
// payment, then a thank-you sheet.  The shop answers:
//   GET  /api/checkout-info -> {addresses: [...], saved_card: {brand, last4} | null, cart_count, test_mode}
//   POST /api/buy-now {product_id, address_id | address fields, card, expiry, cvc,
//                      expected_price_minor, source, request_key, retry} (JSON)
//        -> {ok, order: {id, total, items, address}, thank_you_url} | {redirect}
//           | {error, field, errors?: {field: text}} (4xx; field "address" = none given)
// A shop without these endpoints (404) gets a clear message and "Add to cart" instead.
// Listens to document "watchbuy:buy" ({product, id, opener}) from room.js and replay.js.  The
// sheet's data-source ("room", or "replay") goes with the purchase: a replay pays the regular
// price (flash sales are the live room's), so its sheet never shows a sale's.
// window.WatchBuyResume: a visitor's Add to cart / Buy now signs up or logs in first and comes
// back to this page with it begun (the room's and the replay's one mechanism).
(function () {
  "use strict";
  // The way back is this page with ?add=<id> or ?buy=<id>; take() acts on it once, and only
  // when this tab began it (a one-time sessionStorage flag): a link with ?add= from elsewhere
  // must not fill a logged-in shopper's cart without a click.
  window.WatchBuyResume = {
    loginFirst: function (action, id) {
      const back = location.pathname + "?" + action + "=" + encodeURIComponent(id);
      try { sessionStorage.setItem("watchbuy:resume", action + ":" + id); } catch (e) { /* private mode: not resumed */ }
      location.href = "/login?next=" + encodeURIComponent(back);
    },
    // {action: "add" | "buy", id} begun before the log-in, or null; the address loses it.
    take: function () {
      const params = new URLSearchParams(location.search);
      const action = params.has("add") ? "add" : params.has("buy") ? "buy" : null;
      if (!action) return null;
      const id = params.get(action);
      history.replaceState(null, "", location.pathname);
      let begun = null;
      try { begun = sessionStorage.getItem("watchbuy:resume"); sessionStorage.removeItem("watchbuy:resume"); } catch (e) { /* none */ }
      return begun === action + ":" + id ? { action: action, id: id } : null;
    },
  };

  const sheet = document.getElementById("buy-sheet");
  const body = document.getElementById("buy-body");
  const title = document.getElementById("buy-title");
  if (!sheet || !body) return;
  const source = sheet.dataset.source || "room";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const ADDRESS_FIELDS = [
    ["name", "Full name", "name", true], ["line1", "Address", "address-line1", true],
    ["line2", "Apartment, suite (optional)", "address-line2", false], ["city", "City", "address-level2", true],
    ["postal_code", "Postal code", "postal-code", true], ["region", "State or region (optional)", "address-level1", false],
    ["country", "Country (2 letters, e.g. US)", "country", true],
  ];
  const CARD_FIELDS = [
    ["card", "Card number", "cc-number", "numeric"], ["expiry", "Expiry (MM/YY)", "cc-exp", "numeric"],
    ["cvc", "CVC", "cc-csc", "numeric"],
  ];

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A labelled input with its own error line right under it (filled by showError).
  function field(name, label, autocomplete, required, inputmode) {
    const wrap = el("label", "field");
    wrap.append(document.createTextNode(label));
    const input = el("input");
    input.name = name; input.autocomplete = autocomplete; input.required = !!required;
    if (inputmode) input.inputMode = inputmode;
    const error = el("span", "field-error"); error.id = "buy-error-" + name; error.hidden = true;
    input.setAttribute("aria-describedby", error.id);
    wrap.append(input, error);
    return wrap;
  }

  function clearErrors() {
    body.querySelectorAll(".field-error").forEach(function (e) { e.hidden = true; e.textContent = ""; });
    body.querySelectorAll("[aria-invalid]").forEach(function (i) { i.removeAttribute("aria-invalid"); });
  }

  // The error beside the control it is about; the form's own line when no control matches.
  // "address" (no address given) and "address_id" both belong to the "Ship to" box.
  function showError(message, fieldName, focus) {
    const input = fieldName ? body.querySelector('[name="' + CSS.escape(fieldName) + '"]:not([disabled])') : null;
    let box = input ? document.getElementById("buy-error-" + fieldName) : null;
    if (!box && (fieldName === "address" || fieldName === "address_id")) box = document.getElementById("buy-error-address");
    if (!box) box = body.querySelector(".form-error");
    if (!box) return;
    box.textContent = message;
    box.hidden = false;
    if (input) input.setAttribute("aria-invalid", "true");
    if (focus === false) return;
    const target = input || (box.id === "buy-error-address" ? body.querySelector(".addresses input:not([disabled])") : null);
    if (target) target.focus();
  }

  // The server's answer: every field it names gets its line, the first one gets the focus.
  function showErrors(result) {
    const message = result.error || "The payment did not go through. Try again.";
    showError(message, result.field);
    Object.keys(result.errors || {}).forEach(function (name) {
      if (name !== result.field) showError(result.errors[name], name, false);
    });
  }

  // The running flash sales, from the room's events (the documented "watchbuy:room-event"):
  // the sheet shows the price the shop will charge now; the shop decides it on its clock.
  const sales = {};
  document.addEventListener("watchbuy:room-event", function (event) {
    const data = event.detail || {};
    if (data.type === "hello") {
      Object.keys(sales).forEach(function (k) { delete sales[k]; });
      (data.sales || []).forEach(function (sale) { sales[sale.product_id] = sale; });
    } else if (data.type === "sale" && data.sale) sales[data.sale.product_id] = data.sale;
    else if (data.type === "sale_ended" && sales[data.product_id] && sales[data.product_id].id === data.sale_id) delete sales[data.product_id];
  });
  function runningSale(product) {
    if (source === "replay") return null;  // the regular price: the shop ignores sales there too
    const sale = sales[product.id] || product.sale || null;
    const now = window.WatchBuyRoom && window.WatchBuyRoom.now ? window.WatchBuyRoom.now() : Date.now();
    const ends = sale && (sale.ends_at < 1e11 ? sale.ends_at * 1000 : sale.ends_at);
    return sale && sale.sale_price && (!ends || ends > now) ? sale : null;
  }
  function priceNow(product) {
    const sale = runningSale(product);
    return sale ? sale.sale_price : (product.regular_price || product.price);  // a card's "price" is the sale's while it runs
  }
  function priceMinorNow(product) {
    const sale = runningSale(product);
    if (sale) return sale.sale_price_minor;
    return typeof product.regular_price_minor === "number" ? product.regular_price_minor : product.price_minor;
  }

  function summary(product) {
    const box = el("div", "buy-product");
    if (product.image) { const img = el("img"); img.src = product.image; img.alt = product.name; box.append(img); }
    const text = el("div");
    text.append(el("strong", "", product.name));
    text.append(el("span", "muted", " · 1 × " + priceNow(product)));
    box.append(text);
    return box;
  }

  function unavailable(product, message) {
    body.replaceChildren(summary(product));
    const note = el("p", "notice-error", message);
    note.setAttribute("role", "alert");
    body.append(note);
    const actions = el("div", "product-actions");
    const add = el("button", "add-to-cart", "Add to cart instead"); add.type = "button"; add.dataset.add = product.id;
    actions.append(add, el("span", "feedback"));
    body.append(actions);
  }

  function busy(product) {
    body.replaceChildren(summary(product), el("p", "muted", "Loading your details…"));
  }

  function addressSection(addresses) {
    const set = el("fieldset", "choice addresses");
    set.append(el("legend", "", "Ship to"));
    const newForm = el("div", "new-address");
    ADDRESS_FIELDS.forEach(function (f) { newForm.append(field(f[0], f[1], f[2], f[3])); });
    if (addresses.length) {
      addresses.forEach(function (a, i) {
        const label = el("label", "radio");
        const radio = el("input"); radio.type = "radio"; radio.name = "address_id"; radio.value = a.id;
        radio.checked = a.is_default || (i === 0 && !addresses.some(function (x) { return x.is_default; }));
        label.append(radio, document.createTextNode(" " + addressLine(a)));
        set.append(label);
      });
      const label = el("label", "radio");
      const radio = el("input"); radio.type = "radio"; radio.name = "address_id"; radio.value = "new";
      label.append(radio, document.createTextNode(" A new address"));
      set.append(label);
      newForm.hidden = true;
      set.addEventListener("change", function () {
        const picked = set.querySelector('input[name="address_id"]:checked');
        newForm.hidden = !picked || picked.value !== "new";
        newForm.querySelectorAll("input").forEach(function (i) { i.disabled = newForm.hidden; });
      });
      newForm.querySelectorAll("input").forEach(function (i) { i.disabled = true; });
    }
    const error = el("span", "field-error"); error.id = "buy-error-address"; error.hidden = true;
    error.setAttribute("role", "alert");
    set.append(newForm, error);
    return set;
  }

  function paymentSection(info) {
    const set = el("fieldset", "choice payment");
    set.append(el("legend", "", "Pay with"));
    if (info.saved_card) {
      const brand = info.saved_card.brand || "card";  // Stripe's brands are lower case: "visa"
      set.append(el("p", "saved-card", brand.charAt(0).toUpperCase() + brand.slice(1) + " ending in " + info.saved_card.last4));
    } else {
      if (info.test_mode) set.append(el("p", "testmode", "Test mode: use 4242 4242 4242 4242, any future date and any CVC. No money moves."));
      const row = el("div", "card-row");
      CARD_FIELDS.forEach(function (f) { row.append(field(f[0], f[1], f[2], true, f[3])); });
      set.append(row);
    }
    return set;
  }

  function confirmForm(product, info) {
    title.textContent = "Buy now";
    const form = el("form", "buy-form");
    form.noValidate = true;  // the server checks every field and answers beside it
    form.append(summary(product));
    if (product.physical !== false) form.append(addressSection(info.addresses || []));
    form.append(paymentSection(info));
    const total = el("p", "total");
    total.append(el("span", "", "Total "), el("strong", "", priceNow(product)));
    form.append(total);
    const error = el("p", "form-error"); error.setAttribute("role", "alert"); error.hidden = true;
    form.append(error);
    const confirm = el("button", "confirm", "Confirm and pay"); confirm.type = "submit"; confirm.id = "buy-confirm";
    form.append(confirm);
    // one key per press: the order keeps it, so this sheet can never buy twice (sent again
    // after a lost answer, the shop answers with the order the first send made)
    const key = new Uint8Array(16);
    crypto.getRandomValues(key);
    form.dataset.key = Array.from(key, function (b) { return b.toString(16).padStart(2, "0"); }).join("");
    form.addEventListener("submit", function (event) { event.preventDefault(); submit(form, product, confirm); });
    body.replaceChildren(form);
    const first = form.querySelector("input:not([disabled])") || confirm;
    first.focus({ preventScroll: true });
  }

  function payload(form, product) {
    // the unit price the sheet showed: the server refuses (409, field "price") a different one
    // (or the new price the shop answered with, once the shopper confirms it)
    const agreed = form.dataset.expected ? Number(form.dataset.expected) : priceMinorNow(product);
    const data = { product_id: product.id, expected_price_minor: agreed, source: source,
                   request_key: form.dataset.key, retry: form.dataset.sent === "unanswered" };
    form.querySelectorAll("input").forEach(function (input) {
      if (input.disabled || !input.name) return;
      if (input.type === "radio") { if (input.checked && input.value !== "new") data[input.name] = Number(input.value); return; }
      if (input.value.trim()) data[input.name] = input.value.trim();
    });
    return data;
  }

  async function submit(form, product, button) {
    clearErrors();
    button.disabled = true;
    button.textContent = "Paying…";
    try {
      const body = JSON.stringify(payload(form, product));
      form.dataset.sent = "unanswered";  // until an answer comes: a later send is a retry
      const response = await fetch("/api/buy-now", {
        method: "POST", credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf, "Accept": "application/json", "Content-Type": "application/json" },
        body: body,
      });
      if (response.status < 500) form.dataset.sent = "answered";
      if (response.status === 404) { unavailable(product, "One-tap buying is not available on this site yet."); return; }
      const result = await response.json().catch(function () { return {}; });
      if (result.redirect) { location.assign(result.redirect); return; }  // e.g. Stripe's own page
      if (response.ok && result.ok) { thankYou(product, result); return; }
      if (response.status === 409 && result.field === "price" && typeof result.price_minor === "number") {
        // the price changed (a sale ended or sold out): show the new total; pressing again pays it
        form.dataset.expected = String(result.price_minor);
        const shown = form.querySelector(".total strong");
        if (shown && result.price) shown.textContent = result.price;
      }
      showErrors(result);
    } catch (e) {
      showError("Could not reach the shop. Check your connection and try again.");
    } finally {
      if (document.contains(button)) { button.disabled = false; button.textContent = "Confirm and pay"; }
    }
  }

  function addressLine(a) {
    return [a.name, a.line1, a.line2, a.city, a.postal_code, a.region, a.country].filter(Boolean).join(", ");
  }

  // The thank-you sheet from the shop's answer: what was bought at what price (a flash-sale
  // price shows as charged), the total and where it ships.
  function thankYou(product, result) {
    title.textContent = "Thank you!";
    const order = result.order || {};
    const box = el("div", "thank-you");
    box.append(el("p", "notice", "Your order is paid" + (order.id ? " (order #" + order.id + ")" : "") + "."));
    const items = el("ul", "order-items");
    (order.items || []).forEach(function (item) {
      items.append(el("li", "", item.quantity + " × " + item.name + " — " + item.unit_price));
    });
    if (items.children.length) box.append(items); else box.append(summary(product));
    if (order.total) box.append(el("p", "total", "Total " + order.total));
    if (order.address) box.append(el("p", "muted ship-to", "Ships to " + addressLine(order.address)));
    const actions = el("div", "product-actions");
    if (result.thank_you_url) { const a = el("a", "button secondary", "See your order"); a.href = result.thank_you_url; actions.append(a); }
    const back = el("button", "", "Keep watching"); back.type = "button"; back.dataset.closeSheet = "";
    actions.append(back);
    box.append(actions);
    body.replaceChildren(box);
    back.focus();
  }

  async function open(event) {
    const detail = event.detail || {};
    const product = detail.product || (window.WatchBuyRoom && window.WatchBuyRoom.product(detail.id));
    if (!product) return;
    title.textContent = "Buy now";
    busy(product);
    window.WatchBuySheet.show(sheet, detail.opener);
    try {
      const response = await fetch("/api/checkout-info", { credentials: "same-origin", headers: { "Accept": "application/json" } });
      if (response.status === 404) { unavailable(product, "One-tap buying is not available on this site yet."); return; }
      // a session that ran out: the shop answers with its log-in page (a redirect fetch follows)
      if (response.status === 401 || response.status === 403 || (response.redirected && new URL(response.url).pathname === "/login")) {
        window.WatchBuyResume.loginFirst("buy", product.id);
        return;
      }
      if (!response.ok) { unavailable(product, "The shop could not load your details. Try again in a moment."); return; }
      const info = await response.json();
      if (window.WatchBuyRoom && typeof info.cart_count === "number") window.WatchBuyRoom.cartCount(info.cart_count);
      confirmForm(product, info);
    } catch (e) {
      unavailable(product, "Could not reach the shop. Check your connection and try again.");
    }
  }
  document.addEventListener("watchbuy:buy", open);
})();
