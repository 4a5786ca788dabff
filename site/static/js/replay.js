// The replay page: the recorded show with its product timeline.  Each pin sits at its offset
// in the video (the node's media clock, stored with the pin); tapping one seeks there, and
// while the video plays (or after a seek) the card pinned at that moment is shown.  Buying
// goes through the cart at the regular price (source=replay: live-only offers never apply).
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
  let current = -1;

  // CSP allows no inline styles: the marks are placed from their data attributes here.
  document.querySelectorAll(".timeline-mark").forEach(function (mark) {
    mark.style.left = mark.dataset.percent + "%";
  });

  function card(p) {
    const article = document.createElement("article");
    article.className = "product";
    article.dataset.productId = p.id;
    if (p.image) { const img = document.createElement("img"); img.src = p.image; img.alt = ""; article.appendChild(img); }
    else { const none = document.createElement("div"); none.className = "noimage"; article.appendChild(none); }
    const body = document.createElement("div"); body.className = "product-body";
    const name = document.createElement("h3"); name.textContent = p.name;
    const price = document.createElement("p"); price.className = "price"; price.textContent = p.price;
    const stock = document.createElement("p"); stock.className = "stock"; stock.textContent = p.stock + " in stock";
    const add = document.createElement("button"); add.type = "button"; add.className = "add-to-cart";
    add.dataset.add = p.id; add.textContent = "Add to cart"; add.disabled = p.stock < 1;
    body.append(name, price, stock, add);
    article.appendChild(body);
    return article;
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
    pinned.replaceChildren();
    if (item && item.product) pinned.appendChild(card(item.product));
    pinned.hidden = !(item && item.product);
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
  document.addEventListener("click", async function (event) {
    const button = event.target.closest("[data-add]");
    if (!button) return;
    if (page.dataset.loggedIn !== "true") { location.href = "/login?next=" + encodeURIComponent(location.pathname); return; }
    button.disabled = true;
    const body = new URLSearchParams({ product_id: button.dataset.add, quantity: "1", source: "replay" });
    try {
      const response = await fetch("/cart/add", {
        method: "POST", body: body, credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf, "Accept": "application/json" },
      });
      const result = await response.json();
      cartStatus.hidden = false;
      cartStatus.textContent = result.ok ? "Added to your cart at the regular price. " : result.error;
      if (result.ok) { const a = document.createElement("a"); a.href = "/cart"; a.textContent = "Go to cart →"; cartStatus.appendChild(a); }
    } catch (e) {
      cartStatus.hidden = false;
      cartStatus.textContent = "Could not reach the shop. Try again.";
    } finally {
      button.disabled = false;
    }
  });

  update();
})();
