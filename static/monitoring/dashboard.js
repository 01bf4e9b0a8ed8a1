// Draws the monitoring dashboards' charts from the JSON embedded in the page.
// Each <canvas data-chart="..." data-source="id"> names its kind and data.
(function () {
  "use strict";

  const STATUS_COLOURS = {
    connected: "#1a7f37",
    slow: "#bf8700",
    disconnected: "#cf222e",
  };
  const PALETTE = [
    "#0969da", "#8250df", "#1a7f37", "#bf3989", "#bc4c00",
    "#0a7480", "#6e7781", "#953800", "#4d2d00",
  ];
  const colour = (i) => PALETTE[i % PALETTE.length];

  const base = () => ({
    responsive: true,
    maintainAspectRatio: false,
    animation: false,
    interaction: { mode: "index", intersect: false },
    plugins: { legend: { position: "bottom" } },
  });

  const builders = {
    latency(data) {
      return {
        type: "line",
        data: {
          labels: data.labels,
          datasets: data.latency.map((series, i) => ({
            label: series.label,
            data: series.data,
            borderColor: colour(i),
            backgroundColor: colour(i),
            spanGaps: true,
            pointRadius: data.labels.length > 100 ? 0 : 2,
            borderWidth: 2,
          })),
        },
        options: { ...base(), scales: { y: { beginAtZero: true, title: { display: true, text: "ms" } } } },
      };
    },
    outcomes(data) {
      return {
        type: "bar",
        data: {
          labels: data.labels,
          datasets: Object.entries(data.outcomes).map(([status, counts]) => ({
            label: status,
            data: counts,
            backgroundColor: STATUS_COLOURS[status],
            stack: "probes",
          })),
        },
        options: {
          ...base(),
          scales: {
            x: { stacked: true },
            // Probes are counted: whole numbers only on the axis.
            y: { stacked: true, beginAtZero: true, ticks: { precision: 0 }, title: { display: true, text: "probes" } },
          },
        },
      };
    },
    requests(data) {
      const usage = data.requests;
      // Over ~48 buckets (the default 7 days is 168 hours) bars shrink to
      // 1-px slivers: draw lines instead, with the area under them filled.
      const line = usage.labels.length > 48;
      const series = (label, values, colourHex) => ({
        label,
        data: values,
        backgroundColor: line ? `${colourHex}33` : colourHex,
        borderColor: colourHex,
        ...(line ? { fill: "origin", pointRadius: 0, borderWidth: 1.5, tension: 0.2 } : {}),
      });
      return {
        type: line ? "line" : "bar",
        data: {
          labels: usage.labels,
          datasets: [
            series("requests", usage.requests, "#0969da"),
            series("errors", usage.errors, "#cf222e"),
          ],
        },
        options: {
          ...base(),
          scales: {
            x: { ticks: { autoSkip: true, maxRotation: 0, maxTicksLimit: 8 } },
            y: { beginAtZero: true, ticks: { precision: 0 } },
          },
        },
      };
    },
    tokens(data, canvas) {
      const tokens = data.tokens[canvas.dataset.key];
      return {
        type: "bar",
        data: {
          labels: tokens.labels,
          datasets: Object.entries(tokens.series).map(([name, values], i) => ({
            label: name,
            data: values,
            backgroundColor: colour(i),
            stack: "tokens",
          })),
        },
        options: {
          ...base(),
          scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, title: { display: true, text: "tokens" } } },
        },
      };
    },
    budgets(data) {
      const rows = data.budgets;
      return {
        type: "bar",
        data: {
          labels: rows.map((b) => b.label),
          datasets: [
            {
              label: "used % of limit",
              data: rows.map((b) => b.percent),
              backgroundColor: rows.map((b) =>
                b.percent >= 100 ? STATUS_COLOURS.disconnected
                  : b.percent >= b.warning_percent ? STATUS_COLOURS.slow
                    : STATUS_COLOURS.connected),
            },
          ],
        },
        options: {
          ...base(),
          indexAxis: "y",
          plugins: {
            legend: { display: false },
            tooltip: {
              callbacks: {
                label: (ctx) => {
                  const b = rows[ctx.dataIndex];
                  return `${b.used.toLocaleString()} of ${b.limit.toLocaleString()} tokens (${b.percent} %)`;
                },
              },
            },
          },
          scales: { x: { beginAtZero: true, suggestedMax: 100, title: { display: true, text: "% of limit" } } },
        },
      };
    },
  };

  function draw() {
    if (typeof window.Chart === "undefined") return;
    // Text in the page's own colour, so labels stay readable in dark themes;
    // a page may name a grid colour that works on both.
    const styles = getComputedStyle(document.body);
    window.Chart.defaults.color = styles.color;
    const grid = styles.getPropertyValue("--chart-grid").trim();
    if (grid) window.Chart.defaults.borderColor = grid;
    const cache = {};
    document.querySelectorAll("canvas[data-chart]").forEach((canvas) => {
      const source = canvas.dataset.source;
      if (!(source in cache)) {
        const script = document.getElementById(source);
        cache[source] = script ? JSON.parse(script.textContent) : null;
      }
      const build = builders[canvas.dataset.chart];
      if (!cache[source] || !build) return;
      const chart = new window.Chart(canvas, build(cache[source], canvas));
      canvas.dataset.drawn = String(chart.data.datasets.length);
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
