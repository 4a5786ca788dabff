// Stream health for the host: the studio and the room's host panel both poll GET
// /studio/health and show it here, one renderer for both.  window.WatchBuyHealth.watch(box,
// onReport) polls every few seconds (the site caches the node's stats for 2 s) and calls
// onReport(report) after each answer, so a page can update its LIVE badge and preview too.
(function () {
  "use strict";
  const POLL_MS = 2000;

  function kbps(n) { return n.toLocaleString("en-US") + " kbps"; }

  const CODECS = { avc: "H.264", hevc: "HEVC", av1: "AV1", vp9: "VP9", aac: "AAC", mp3: "MP3", opus: "Opus" };
  function codec(name) { return CODECS[name] || name; }

  function facts(r) {
    const list = [];
    if (r.width && r.height) list.push(["Resolution", r.width + "×" + r.height]);
    if (r.fps) list.push(["Frame rate", Math.round(r.fps) + " fps"]);
    list.push(["Bitrate", kbps(r.bitrate_kbps) + " (video " + kbps(r.video_kbps) + ", audio " + kbps(r.audio_kbps) + ")"]);
    if (r.keyframe_interval) list.push(["Keyframes", "every " + r.keyframe_interval + " s"]);
    const codecs = [r.video_codec, r.has_audio ? r.audio_codec : null].filter(Boolean).map(codec);
    if (codecs.length) list.push(["Codecs", codecs.join(" + ")]);
    list.push(["Sound", r.has_audio ? "yes" : "none"]);
    return list;
  }

  function render(box, r) {
    box.replaceChildren();
    box.dataset.receiving = String(!!r.receiving);
    const head = document.createElement("p");
    head.className = "health-head";
    head.textContent = r.receiving ? "Your stream is arriving" : "No stream is arriving yet";
    box.appendChild(head);
    if (r.receiving) {
      const dl = document.createElement("dl");
      dl.className = "health-facts";
      facts(r).forEach(function (pair) {
        const dt = document.createElement("dt"); dt.textContent = pair[0];
        const dd = document.createElement("dd"); dd.textContent = pair[1];
        dl.append(dt, dd);
      });
      box.appendChild(dl);
    }
    if (r.warnings && r.warnings.length) {
      const ul = document.createElement("ul");
      ul.className = "health-warnings";
      r.warnings.forEach(function (w) { const li = document.createElement("li"); li.textContent = w; ul.appendChild(li); });
      box.appendChild(ul);
    }
  }

  function watch(box, onReport) {
    async function poll() {
      try {
        const response = await fetch("/studio/health", { credentials: "same-origin", headers: { "Accept": "application/json" } });
        if (response.ok) {
          const report = await response.json();
          if (box) render(box, report);
          if (onReport) onReport(report);
        }
      } catch (e) { /* the next poll tries again */ }
      setTimeout(poll, POLL_MS);
    }
    poll();
  }

  window.WatchBuyHealth = { watch: watch, render: render };
})();
