// The replay page: the recorded show with its product timeline.  Each pin sits at its offset
// in the video (the node's media clock, stored with the pin); tapping one seeks there, and
// while the video plays (or after a seek) the card pinned at that moment is shown.  Buying is
// the room's: Buy now opens buy.js's sheet (its data-source="replay": the regular price, flash
// sales are the live room's), Add to cart goes to the cart; a visitor signs up or logs in first
// and comes back here with it begun (buy.js's WatchBuyResume, as in the room).
(function () {
  "use strict";
  const page = document.querySelector(".replay");
  if (!page) return;
  const video = document.getElementById("replay-video");
  const pinned = document.getElementById("pinned");
  const progress = document.getElementById("timeline-progress");
  const items = JSON.parse(document.getElementById("replay-timeline").textContent);
  const buttons = Array.from(document.querySelectorAll(".timeline-item"));
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const loggedIn = page.dataset.loggedIn === "true";
  const products = {};  // id -> the card's data, what buy.js's sheet shows and charges
  items.forEach(function (item) { if (item.product) products[item.product.id] = item.product; });
  let current = -1;

  // CSP allows no inline styles: the marks are placed from their data attributes here.
  document.querySelectorAll(".timeline-mark").forEach(function (mark) {
    mark.style.left = mark.dataset.percent + "%";
  });

  // The card of the moment is the list's own card (the server's _product.html), copied: every
  // product pinned in the show is in "Shop this replay".
  function card(p) {
    const listed = document.querySelector('.replay-products .product-grid [data-product-id="' + p.id + '"]');
    return listed ? listed.cloneNode(true) : null;
  }

  // The pin in effect at time t: the last one at or before it (a small tolerance, so a seek
  // to a pin's own offset lands on it even if the browser stops a frame short).
  function indexAt(t) {
    let found = -1;
    for (let i = 0; i < items.length; i++) {
      if (items[i].offset <= t + 0.05) found = i; else break;
    }
    return found;
  }

  function show(index) {
    if (index === current) return;
    current = index;
    const item = index >= 0 ? items[index] : null;
    const shown = item && item.product ? card(item.product) : null;
    pinned.replaceChildren();
    if (shown) pinned.appendChild(shown);
    pinned.hidden = !shown;
    page.dataset.shownIndex = String(index);
    buttons.forEach(function (b, i) { b.classList.toggle("active", i === index); b.setAttribute("aria-current", i === index ? "true" : "false"); });
  }

  function update() {
    show(indexAt(video.currentTime));
    if (progress && video.duration) progress.style.width = (100 * video.currentTime / video.duration) + "%";
  }
  ["timeupdate", "seeked", "loadedmetadata"].forEach(function (name) { video.addEventListener(name, update); });

  buttons.forEach(function (button) {
    button.addEventListener("click", function () {
      const index = Number(button.dataset.index);
      video.currentTime = items[index].offset;
      show(index);  // at once, not only when the seek completes
      const played = video.play();
      if (played && played.catch) played.catch(function () { /* autoplay refused: paused at the moment */ });
    });
  });

  const cartStatus = document.getElementById("cart-status");
  async function addToCart(button, id) {
    button.disabled = true;
    const body = new URLSearchParams({ product_id: String(id), quantity: "1", source: "replay" });
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
  }

  function buyNow(button, id) {
    document.dispatchEvent(new CustomEvent("watchbuy:buy", { detail: { product: products[id], id: Number(id), opener: button } }));
  }

  document.addEventListener("click", function (event) {
    const add = event.target.closest("[data-add]");
    const buy = event.target.closest("[data-buy]");
    if (!add && !buy) return;
    const id = (add || buy).dataset.add || (add || buy).dataset.buy;
    if (!loggedIn) { window.WatchBuyResume.loginFirst(add ? "add" : "buy", id); return; }
    if (add) addToCart(add, id); else buyNow(buy, id);
  });

  update();

  // Back from signing up or logging in: do what was begun, on the card of the moment's button
  // or else the list's (the sheet gives the focus back to it).
  const begun = loggedIn ? window.WatchBuyResume.take() : null;
  if (begun) {
    const selector = '[data-' + begun.action + '="' + CSS.escape(begun.id) + '"]';
    const button = document.querySelector("#pinned " + selector) ||
      document.querySelector(".replay-products .product-grid " + selector);
    if (button) { if (begun.action === "add") addToCart(button, begun.id); else buyNow(button, begun.id); }
  }
})();
