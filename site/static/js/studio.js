// Studio helpers: copy and reveal fields (the stream key stays hidden on screen by default).
// Forms with data-confirm ask first; the text is data, never inline script (product names are
// the host's free text).
document.addEventListener("submit", function (event) {
  const message = event.target.dataset && event.target.dataset.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});
document.addEventListener("click", function (event) {
  const copy = event.target.closest("[data-copy]");
  if (copy) {
    const field = document.getElementById(copy.dataset.copy);
    const done = function () {
      const label = copy.textContent;
      copy.textContent = "Copied";
      setTimeout(function () { copy.textContent = label; }, 1500);
    };
    // The Clipboard API needs a secure context (https or localhost); over plain http on a LAN
    // address fall back to selecting the text and the old copy command.
    const fallback = function () {
      const type = field.type;
      if (type === "password") field.type = "text";
      field.select();
      const ok = document.execCommand && document.execCommand("copy");
      field.type = type;
      if (ok) done();
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, fallback);
    } else {
      fallback();
    }
  }
  const reveal = event.target.closest("[data-reveal]");
  if (reveal) {
    const field = document.getElementById(reveal.dataset.reveal);
    const hidden = field.type === "password";
    field.type = hidden ? "text" : "password";
    reveal.textContent = hidden ? "Hide" : "Show";
  }
});
