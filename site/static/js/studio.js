// Studio helpers: copy and reveal fields (the stream key stays hidden on screen by default).
document.addEventListener("click", function (event) {
  const copy = event.target.closest("[data-copy]");
  if (copy) {
    const field = document.getElementById(copy.dataset.copy);
    navigator.clipboard.writeText(field.value).then(function () {
      const label = copy.textContent;
      copy.textContent = "Copied";
      setTimeout(function () { copy.textContent = label; }, 1500);
    });
  }
  const reveal = event.target.closest("[data-reveal]");
  if (reveal) {
    const field = document.getElementById(reveal.dataset.reveal);
    const hidden = field.type === "password";
    field.type = hidden ? "text" : "password";
    reveal.textContent = hidden ? "Hide" : "Show";
  }
});
