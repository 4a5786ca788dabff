// Shows: start times in the shopper's own time zone, countdowns to upcoming shows, and the
// schedule form's time zone (the server gets the browser's offset at that local time).
(function () {
  "use strict";
  function pad(n) { return String(n).padStart(2, "0"); }

  function localText(date) {
    return date.toLocaleString([], { weekday: "short", month: "short", day: "numeric",
                                     hour: "numeric", minute: "2-digit" });
  }

  // "in 2 h 05 min", "in 4 min 10 s", "starting now"
  function countdownText(ms) {
    if (ms <= 0) return "starting now";
    const s = Math.floor(ms / 1000);
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
    const m = Math.floor(s % 3600 / 60), sec = s % 60;
    if (d > 0) return "in " + d + " d " + h + " h";
    if (h > 0) return "in " + h + " h " + pad(m) + " min";
    return "in " + m + " min " + pad(sec) + " s";
  }

  document.querySelectorAll("time.local-time").forEach(function (el) {
    const date = new Date(el.getAttribute("datetime"));
    if (!isNaN(date)) el.textContent = localText(date);
  });

  const counters = Array.prototype.slice.call(document.querySelectorAll("[data-countdown]"));
  function tick() {
    const now = Date.now();
    counters.forEach(function (el) {
      const at = Date.parse(el.dataset.countdown);
      if (!isNaN(at)) el.textContent = countdownText(at - now);
    });
  }
  if (counters.length) { tick(); setInterval(tick, 1000); }

  // the schedule form: the browser's offset from UTC at the chosen date and time (not today's:
  // a show after a daylight-saving change is an hour off with today's), and an edited show's
  // time in local time
  function offsetAt(text) {
    const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})/.exec(text || "");
    const at = m ? new Date(+m[1], +m[2] - 1, +m[3], +m[4], +m[5]) : new Date();
    return String((isNaN(at) ? new Date() : at).getTimezoneOffset());
  }
  function setOffset(form) {
    const offset = form.querySelector("input[name=tz_offset]");
    const starts = form.querySelector("input[type=datetime-local]");
    if (offset) offset.value = offsetAt(starts && starts.value);
  }
  document.querySelectorAll("input[name=tz_offset]").forEach(function (el) {
    if (el.form) setOffset(el.form);
  });
  document.addEventListener("input", function (event) {
    if (event.target.type === "datetime-local" && event.target.form) setOffset(event.target.form);
  });
  document.querySelectorAll("input[type=datetime-local][data-utc]").forEach(function (el) {
    const date = new Date(el.dataset.utc);
    if (isNaN(date) || el.value) return;
    el.value = date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) +
      "T" + pad(date.getHours()) + ":" + pad(date.getMinutes());
  });
  document.addEventListener("submit", function (event) {
    const message = event.target.dataset && event.target.dataset.confirm;
    if (message && !window.confirm(message)) { event.preventDefault(); return; }
    setOffset(event.target);  // the time as it is sent, however it was filled in
  });
})();
