// Notifications in the header: the unread count and each new notification arrive over
// Server-Sent Events (/notifications/events), which the browser reconnects by itself.
(function () {
  "use strict";
  const badge = document.getElementById("notify-badge");
  if (!badge || !window.EventSource) return;
  let unread = 0;

  function show() {
    badge.textContent = unread > 99 ? "99+" : String(unread);
    badge.hidden = unread === 0;
    badge.setAttribute("aria-label", unread + " unread notifications");
  }

  function toast(note) {
    const box = document.createElement("a");
    box.className = "notify-toast";
    box.href = note.url;
    box.textContent = note.text;  // text, never HTML: titles are the host's free text
    document.body.appendChild(box);
    setTimeout(function () { box.remove(); }, 8000);
  }

  const source = new EventSource("/notifications/events");
  source.onmessage = function (event) {
    let data;
    try { data = JSON.parse(event.data); } catch (err) { return; }
    if (data.type === "unread") {
      unread = data.count;  // sent first on every (re)connection: the truth from the database
    } else if (data.type === "notification") {
      unread += 1;
      toast(data.notification);
      document.dispatchEvent(new CustomEvent("watchbuy:notification", { detail: data.notification }));
    }
    show();
  };
})();
