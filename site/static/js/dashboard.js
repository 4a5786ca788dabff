// Ops dashboard: network in/out per media node as live line charts (Chart.js), fed by SSE.
// Every rate arrives in kb/s (site/dashboard.py converts once): shown as it is, so a node's
// line and its chart always show the same numbers.
(function () {
  "use strict";
  const charts = {};
  const nodesBox = document.getElementById("nodes");

  function nodeCard(node) {
    let card = nodesBox.querySelector('[data-node="' + CSS.escape(node.node_id) + '"]');
    if (!card) {
      card = document.createElement("section");
      card.className = "card node";
      card.dataset.node = node.node_id;
      const h = document.createElement("h3"); h.textContent = node.node_id; card.appendChild(h);
      const p = document.createElement("p"); p.className = "muted";
      p.innerHTML = '<span data-field="publishers"></span> publishing · <span data-field="viewers"></span> watching' +
        ' · <span data-field="traffic"></span>';
      card.appendChild(p);
      const nic = document.createElement("p"); nic.className = "muted small"; nic.dataset.field = "nic";
      card.appendChild(nic);
      const box = document.createElement("div"); box.className = "chart-box";
      box.appendChild(document.createElement("canvas"));
      card.appendChild(box);
      nodesBox.appendChild(card);
    }
    return card;
  }

  function chartFor(card) {
    const id = card.dataset.node;
    if (!charts[id]) {
      charts[id] = new Chart(card.querySelector("canvas"), {
        type: "line",
        data: { labels: [], datasets: [
          // "in" grows with hosts, "out" with viewers; out is dashed and drawn on top, so equal
          // values (one viewer of one stream) still show both lines.
          { label: "network in (kb/s)", data: [], borderColor: "#e8384f", backgroundColor: "rgba(232,56,79,.12)", fill: true, tension: .25, pointRadius: 0, borderWidth: 2, order: 1 },
          { label: "network out (kb/s)", data: [], borderColor: "#2f6fdf", backgroundColor: "rgba(47,111,223,.08)", fill: true, tension: .25, pointRadius: 0, borderWidth: 2, borderDash: [6, 4], order: 0 },
        ] },
        options: { animation: false, responsive: true, maintainAspectRatio: false,
          interaction: { mode: "index", intersect: false },
          scales: {
            x: { ticks: { maxRotation: 0, autoSkip: true, maxTicksLimit: 6 } },
            y: { beginAtZero: true, title: { display: true, text: "kb/s" } },
          },
          plugins: { legend: { position: "bottom" } } },
      });
    }
    return charts[id];
  }

  function render(snapshot) {
    document.getElementById("total-viewers").textContent = snapshot.viewers;
    document.getElementById("total-streams").textContent = snapshot.streams.length;
    document.getElementById("orders-paid").textContent = snapshot.orders.paid || 0;
    document.getElementById("orders-pending").textContent = snapshot.orders.pending || 0;
    document.getElementById("revenue").textContent = (snapshot.revenue || []).join(", ") || "0";
    document.getElementById("test-orders-paid").textContent = (snapshot.test_orders || {}).paid || 0;
    document.getElementById("updated").textContent = "updated " + new Date(snapshot.at * 1000).toLocaleTimeString();
    snapshot.nodes.forEach(function (node) {
      const card = nodeCard(node);
      card.querySelector('[data-field="publishers"]').textContent = node.publishers;
      card.querySelector('[data-field="viewers"]').textContent = node.viewers;
      // the engine's traffic: the same numbers as the chart's last point
      card.querySelector('[data-field="traffic"]').textContent =
        "in " + node.in_kbps + " kb/s · out " + node.out_kbps + " kb/s";
      const nic = card.querySelector('[data-field="nic"]');
      if (nic) {
        // the status agent's view of the machine's interfaces (what the balancer compares)
        nic.textContent = node.nic_in_kbps == null ? "no status agent" :
          "machine interfaces in " + node.nic_in_kbps + " / out " + node.nic_out_kbps + " kb/s" +
          (node.cpu_load == null ? "" : " · CPU " + Math.round(node.cpu_load * 100) + "%");
      }
      const chart = chartFor(card);
      chart.data.labels = node.series.map(function (p) { return new Date(p[0] * 1000).toLocaleTimeString(); });
      chart.data.datasets[0].data = node.series.map(function (p) { return p[1]; });
      chart.data.datasets[1].data = node.series.map(function (p) { return p[2]; });
      chart.update();
    });
    const body = document.querySelector("#streams tbody");
    body.replaceChildren();
    snapshot.streams.forEach(function (s) {
      const tr = document.createElement("tr");
      [s.name, s.node_id, (s.video_codec || "") + " " + (s.width || "") + "×" + (s.height || ""),
       s.bitrate_kbps + " kb/s", s.viewers, Math.round(s.uptime || 0) + " s",
       s.orders, (s.revenue || []).join(", ") || "0"].forEach(function (v) {
        const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    window.dashboardUpdates = (window.dashboardUpdates || 0) + 1;
  }

  const source = new EventSource("/dashboard/events");
  source.onmessage = function (event) { render(JSON.parse(event.data)); };
})();
