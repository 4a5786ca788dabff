// Pins in band: the node puts each pin into the live stream as an onCuePoint script-data tag
// at the stream's media time (engine/cues.py).  mpegts.js hands script data to us as its
// "scriptdata_arrived" event when the bytes arrive, which is ahead of what the viewer sees by
// the player's buffer; the card is shown when playback reaches that point, so a viewer a few
// seconds behind sees it as the host shows the product, not before.
//
// The room's websocket "pinned" event stays the fallback (LL-HLS, which carries no cue here, or
// a node that could not take the cue).  Once in-band cues arrive, a websocket pin that carries
// "media_ms" waits for its cue: the card the viewer's video has reached stays up meanwhile, and
// should the cue never come (FALLBACK_MS), the websocket's card is shown.
//
// Talks to room.js only through the documented DOM events: "watchbuy:player" (the mpegts.js
// player and its <video>), "watchbuy:room-event" (each websocket message) and
// "watchbuy:show-pin" (which card room.js shows).
(function () {
  "use strict";
  const FALLBACK_MS = 8000;
  const cards = new Map();  // product id -> card, from the page and the websocket
  let video = null;
  let inBand = false;  // a cue arrived in this session: the stream carries them
  let shownCard = null;  // what the video has reached
  const queue = [];  // cues waiting for playback: {due (video seconds), productId, mediaMs}
  const waiting = new Map();  // media_ms -> fallback timer of a websocket pin waiting for its cue
  const seen = new Set();  // media_ms of cues shown

  const initial = document.getElementById("room-state");
  if (initial) {
    try {
      const data = JSON.parse(initial.textContent);
      (data.products || []).forEach(function (p) { cards.set(p.id, p); });
      if (data.pinned) { cards.set(data.pinned.id, data.pinned); shownCard = data.pinned; }
    } catch (e) { /* the room works without cues */ }
  }

  function showPin(card) {
    shownCard = card || null;
    document.dispatchEvent(new CustomEvent("watchbuy:show-pin", { detail: shownCard }));
  }

  // The latest media the player has buffered, in the video's own time: where a cue that just
  // arrived belongs (the node stamps it with the newest media it has, and it travels right
  // after that media).
  function bufferedEnd() {
    const ranges = video.buffered;
    return ranges.length ? ranges.end(ranges.length - 1) : video.currentTime;
  }

  function onScriptData(data) {
    const cue = data && data.onCuePoint;
    if (!cue || (cue.name !== "pin" && cue.name !== "unpin") || typeof cue.time !== "number") return;
    inBand = true;
    queue.push({
      due: bufferedEnd(),
      productId: cue.name === "pin" ? cue.product_id : null,
      mediaMs: Math.round(cue.time * 1000),
    });
    tick();
  }

  function tick() {
    if (!video) return;
    while (queue.length && video.currentTime >= queue[0].due - 0.02) {
      const cue = queue.shift();
      if (cue.productId !== null && !cards.has(cue.productId)) {
        queue.unshift(cue);  // the card comes with the websocket event: shown when it does
        break;
      }
      seen.add(cue.mediaMs);
      const timer = waiting.get(cue.mediaMs);
      if (timer) { clearTimeout(timer); waiting.delete(cue.mediaMs); }
      document.documentElement.dataset.lastCue = String(cue.mediaMs);
      showPin(cue.productId === null ? null : cards.get(cue.productId));
    }
  }

  document.addEventListener("watchbuy:player", function (event) {
    const detail = event.detail || {};
    if (!detail.player || !detail.video || typeof mpegts === "undefined") return;
    video = detail.video;
    queue.length = 0;
    detail.player.on(mpegts.Events.SCRIPTDATA_ARRIVED, onScriptData);
    video.addEventListener("timeupdate", tick);
  });

  document.addEventListener("watchbuy:room-event", function (event) {
    const data = event.detail || {};
    if (data.type === "products" && Array.isArray(data.products)) {
      data.products.forEach(function (p) { cards.set(p.id, p); });
      return;
    }
    if (data.type !== "pinned") return;
    if (data.product) cards.set(data.product.id, data.product);
    if (!inBand || typeof data.media_ms !== "number" || seen.has(data.media_ms)) {
      if (!seen.has(data.media_ms)) shownCard = data.product || null;  // room.js shows it
      tick();  // a cue that waited for this card
      return;
    }
    // room.js shows the websocket's card as this event is handled; put back what the video
    // has reached (a microtask: after room.js, before the page is painted) and let the cue
    // show the new card at its moment.
    const keep = shownCard;
    const mediaMs = data.media_ms;
    const product = data.product || null;
    queueMicrotask(function () { if (!seen.has(mediaMs)) showPin(keep); });
    waiting.set(mediaMs, setTimeout(function () {
      waiting.delete(mediaMs);
      if (!seen.has(mediaMs)) { seen.add(mediaMs); showPin(product); }
    }, FALLBACK_MS));
    tick();
  });
})();
