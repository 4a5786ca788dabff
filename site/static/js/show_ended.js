// The end of a show in the room: the "ended" room event (sent after the host's grace period)
// shows the "show has ended" card with the next show and the replay ("replay" adds the link,
// there and in the offline card, when the recording is ready later); "live" hides it (the host
// is back, or the next show started).  Listens to room.js's watchbuy:room-event only.
(function () {
  "use strict";
  const card = document.getElementById("show-ended");
  if (!card) return;
  const nextBar = document.getElementById("next-show");
  const next = document.getElementById("show-ended-next");
  const replay = document.getElementById("show-ended-replay");
  const remind = document.getElementById("show-ended-remind");
  const followLive = document.getElementById("follow-live");
  function showFollow(on) { if (followLive) followLive.hidden = !on; }

  function when(seconds) {
    return new Date(seconds * 1000).toLocaleString([], {
      weekday: "short", month: "short", day: "numeric", hour: "numeric", minute: "2-digit" });
  }

  function ended(data) {
    const show = data.next_show;
    next.hidden = !show;
    if (remind) remind.hidden = !show;
    if (show) {
      next.querySelector("[data-field=title]").textContent = show.title;
      next.querySelector("[data-field=when]").textContent = when(show.scheduled_at);
      if (remind) remind.action = "/shows/" + encodeURIComponent(show.id) + "/remind";
    }
    replay.hidden = !data.replay_url;
    replayReady(data);
    if (nextBar) nextBar.hidden = true;  // the card says it all
    // nobody is watching a show that ended (room.js may also get a "viewers" event)
    const count = document.getElementById("viewer-count");
    if (count) count.textContent = "0";
    card.hidden = false;
  }

  // the recording is ready after the remux and upload, usually after "ended" went out
  const offlineReplay = document.getElementById("offline-replay");  // in the offline card
  function replayReady(data) {
    if (!data.replay_url) return;
    replay.href = data.replay_url;
    replay.hidden = false;
    if (offlineReplay) {
      offlineReplay.href = data.replay_url;
      offlineReplay.textContent = "Watch the replay";
      offlineReplay.hidden = false;
    }
  }

  document.addEventListener("watchbuy:room-event", function (event) {
    const data = event.detail || {};
    if (data.type === "ended") { showFollow(false); ended(data); }
    else if (data.type === "replay") replayReady(data);
    else if (data.type === "live") {
      card.hidden = true;
      if (nextBar) nextBar.hidden = true;
      showFollow(true);
    } else if (data.type === "offline") {
      showFollow(false);  // the next-show bar carries it while offline
      if (nextBar && card.hidden && nextBar.children.length) nextBar.hidden = false;
    }
  });
})();
