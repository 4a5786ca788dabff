// Ops dashboard: network in/out per media node as live line charts (Chart.js), fed by SSE.
(function () {
  "use strict";
  const charts = {};
  const nodesBox = document.getElementById("nodes");

  function kbps(bytesPerSecond) { return Math.round(bytesPerSecond * 8 / 1000); }

  function nodeCard(node) {
    let card = nodesBox.querySelector('[data-node="' + CSS.escape(node.node_id) + '"]');
    if (!card) {
      card = document.createElement("section");
      card.className = "card node";
      card.dataset.node = node.node_id;
      const h = document.createElement("h3"); h.textContent = node.node_id; card.appendChild(h);
      const p = document.createElement("p"); p.className = "muted";
      p.innerHTML = '<span data-field="publishers"></span> publishing · <span data-field="viewers"></span> watching' +
        ' · <span data-field="net"></span>';
      card.appendChild(p);
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
      const net = card.querySelector('[data-field="net"]');
      if (net) {
        // the status agent's view of the machine's interfaces (what the balancer compares)
        net.textContent = node.net_rx == null ? "no status agent" :
          "interfaces in " + kbps(node.net_rx) + " / out " + kbps(node.net_tx) + " kb/s" +
          (node.cpu_load == null ? "" : " · CPU " + Math.round(node.cpu_load * 100) + "%");
      }
      const chart = chartFor(card);
      chart.data.labels = node.series.map(function (p) { return new Date(p[0] * 1000).toLocaleTimeString(); });
      chart.data.datasets[0].data = node.series.map(function (p) { return kbps(p[1]); });
      chart.data.datasets[1].data = node.series.map(function (p) { return kbps(p[2]); });
      chart.update();
    });
    const body = document.querySelector("#streams tbody");
    body.replaceChildren();
    snapshot.streams.forEach(function (s) {
      const tr = document.createElement("tr");
      [s.name, s.node_id, (s.video_codec || "") + " " + (s.width || "") + "×" + (s.height || ""),
       kbps(s.bitrate_in / 8) + " kb/s", s.viewers, Math.round(s.uptime || 0) + " s"].forEach(function (v) {
        const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    window.dashboardUpdates = (window.dashboardUpdates || 0) + 1;
  }

  const source = new EventSource("/dashboard/events");
  source.onmessage = function (event) { render(JSON.parse(event.data)); };
})();
