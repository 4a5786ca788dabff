// Bottom sheets and dialogs of the room (the product list on phones, the buy-now sheet): one
// opener for all, so that each keeps focus inside while open, closes on Escape, on the backdrop
// and on its [data-close-sheet] button, and gives focus back to the control that opened it.
(function () {
  "use strict";
  const backdrop = document.getElementById("sheet-backdrop");
  const FOCUSABLE = 'a[href], button:not([disabled]), input:not([disabled]):not([type="hidden"]), select:not([disabled]), textarea:not([disabled]), [tabindex]:not([tabindex="-1"])';
  const open = [];  // the stack of open sheets: {el, opener, onClose}

  function focusables(el) {
    return Array.prototype.filter.call(el.querySelectorAll(FOCUSABLE), function (node) {
      return node.offsetParent !== null || node === document.activeElement;
    });
  }

  function top() { return open.length ? open[open.length - 1] : null; }

  function show(el, opener, onClose) {
    if (open.some(function (s) { return s.el === el; })) return;
    open.push({ el: el, opener: opener || document.activeElement, onClose: onClose || null });
    el.hidden = false;
    el.classList.add("open");
    el.setAttribute("role", "dialog");
    el.setAttribute("aria-modal", "true");
    if (backdrop) backdrop.hidden = false;
    document.body.classList.add("sheet-open");
    // The first field or button inside, else the sheet itself (tabindex=-1).
    const first = focusables(el).filter(function (n) { return !n.hasAttribute("data-close-sheet"); })[0];
    (first || el).focus({ preventScroll: true });
  }

  function hide(el) {
    const index = open.findIndex(function (s) { return s.el === el; });
    if (index < 0) return;
    const sheet = open.splice(index, 1)[0];
    el.classList.remove("open");
    el.removeAttribute("aria-modal");
    if (el.dataset.sheetKeep === "true") el.removeAttribute("role");  // a panel on wide screens
    else el.hidden = true;
    if (!open.length) {
      if (backdrop) backdrop.hidden = true;
      document.body.classList.remove("sheet-open");
    }
    if (sheet.onClose) sheet.onClose();
    if (sheet.opener && document.contains(sheet.opener)) sheet.opener.focus({ preventScroll: true });
  }

  document.addEventListener("keydown", function (event) {
    const sheet = top();
    if (!sheet) return;
    if (event.key === "Escape") { event.preventDefault(); hide(sheet.el); return; }
    if (event.key !== "Tab") return;
    // Keep Tab inside the sheet: from the last control back to the first, and the reverse.
    const items = focusables(sheet.el);
    if (!items.length) { event.preventDefault(); return; }
    const first = items[0], last = items[items.length - 1];
    if (event.shiftKey && (document.activeElement === first || !sheet.el.contains(document.activeElement))) {
      event.preventDefault(); last.focus();
    } else if (!event.shiftKey && (document.activeElement === last || !sheet.el.contains(document.activeElement))) {
      event.preventDefault(); first.focus();
    }
  });

  document.addEventListener("click", function (event) {
    const closer = event.target.closest("[data-close-sheet]");
    if (closer) { const el = closer.closest(".open"); if (el) hide(el); return; }
    if (backdrop && event.target === backdrop && top()) hide(top().el);
  });

  window.WatchBuySheet = { show: show, hide: hide, isOpen: function (el) { return open.some(function (s) { return s.el === el; }); } };
})();
