// Small line and dot plots on a canvas, over the conversation's time (seconds).

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(1) : v.toPrecision(2));

// spec: {series: [{label, color, points: [[t, y]], dots}], hline: {y, label}, marks: [t],
//        range: [t0, t1] (default: the points'), pairs: [[t, y0, y1]] (a segment each)}
export function drawPlot(canvas, spec) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 320;
  const height = canvas.clientHeight || 110;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const left = 38;
  const right = 6;
  const top = 16;
  const bottom = 16;
  const all = spec.series.flatMap((s) => s.points);
  g.font = "10px system-ui, sans-serif";
  g.fillStyle = "#778";
  if (all.length === 0) {
    g.fillText(spec.empty || "nothing yet", left, top + 20);
    return;
  }
  let t0 = spec.range ? spec.range[0] : Math.min(...all.map((p) => p[0]));
  let t1 = spec.range ? spec.range[1] : Math.max(...all.map((p) => p[0]));
  if (t1 - t0 < 1) t1 = t0 + 1;
  let ymax = Math.max(...all.map((p) => p[1]), spec.hline ? spec.hline.y * 1.1 : 0);
  const ymin = Math.min(0, ...all.map((p) => p[1]));
  ymax = niceMax(ymax);
  const x = (t) => left + ((t - t0) / (t1 - t0)) * (width - left - right);
  const y = (v) => top + (1 - (v - ymin) / (ymax - ymin || 1)) * (height - top - bottom);
  g.strokeStyle = "#ccd";
  g.beginPath();
  g.moveTo(left, top);
  g.lineTo(left, height - bottom);
  g.lineTo(width - right, height - bottom);
  g.stroke();
  g.fillText(fmt(ymax), 2, top + 4);
  g.fillText(fmt(ymin), 2, height - bottom);
  g.fillText(`${t0.toFixed(0)} s`, left, height - 3);
  const tEnd = `${t1.toFixed(0)} s`;
  g.fillText(tEnd, width - right - g.measureText(tEnd).width, height - 3);
  for (const t of spec.marks || []) {
    if (t < t0 || t > t1) continue;
    g.strokeStyle = "#b9b";
    g.setLineDash([3, 3]);
    g.beginPath();
    g.moveTo(x(t), top);
    g.lineTo(x(t), height - bottom);
    g.stroke();
    g.setLineDash([]);
  }
  if (spec.hline) {
    g.strokeStyle = "#d55";
    g.setLineDash([4, 2]);
    g.beginPath();
    g.moveTo(left, y(spec.hline.y));
    g.lineTo(width - right, y(spec.hline.y));
    g.stroke();
    g.setLineDash([]);
    g.fillStyle = "#d55";
    g.fillText(spec.hline.label, width - right - g.measureText(spec.hline.label).width, y(spec.hline.y) - 3);
  }
  g.strokeStyle = "#bbb";
  for (const [t, a, b] of spec.pairs || []) {
    g.beginPath();
    g.moveTo(x(t), y(a));
    g.lineTo(x(t), y(b));
    g.stroke();
  }
  let legend = left + 4;
  for (const s of spec.series) {
    g.strokeStyle = s.color;
    g.fillStyle = s.color;
    if (s.dots) {
      for (const [t, v] of s.points) {
        g.beginPath();
        g.arc(x(t), y(v), 2.5, 0, 2 * Math.PI);
        g.fill();
      }
    } else {
      g.beginPath();
      s.points.forEach(([t, v], i) => (i ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))));
      g.stroke();
    }
    g.fillText(s.label, legend, 10);
    legend += g.measureText(s.label).width + 12;
  }
}
