// Two small charts drawn by hand on a canvas: no library, nothing loaded from elsewhere.

export const STATUS_COLORS = {
  STARTING: "#d69e2e",
  RUNNING: "#2f855a",
  PAUSED: "#3b6fd6",
  ERROR: "#c53030",
  MISSING: "#805ad5",
};

const AXIS = "#9aa5b1";
const GRID = "#e4e7eb";
const LABEL = "#52606d";
const FONT = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";

// A canvas sized to its box in device pixels; drawing is then in CSS pixels.
function prepare(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = FONT;
  return { ctx, width, height };
}

// 1, 2, 5, 10, 20, 50, ...: a round top for the y axis.
function niceMax(value) {
  if (value <= 4) return 4;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function frame(ctx, box, top, spanSeconds) {
  const { left, right, bottom, upper } = box;
  ctx.strokeStyle = GRID;
  ctx.fillStyle = LABEL;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 2; i += 1) {
    const y = Math.round(bottom - ((bottom - upper) * i) / 2) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(right, y);
    ctx.stroke();
    ctx.fillText(String(Math.round((top * i) / 2)), left - 6, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  ctx.fillStyle = AXIS;
  const minutes = spanSeconds / 60;
  ctx.fillText(minutes >= 1 ? `-${minutes} min` : `-${spanSeconds} s`, left + 18, bottom + 4);
  ctx.fillText("now", right - 10, bottom + 4);
}

// samples: [{t: ms, counts: {STATUS: n}}], oldest first; a stacked area over spanSeconds.
export function drawStatusChart(canvas, samples, spanSeconds, now) {
  const { ctx, width, height } = prepare(canvas);
  const box = { left: 34, right: width - 6, upper: 8, bottom: height - 18 };
  const totals = samples.map((s) => Object.values(s.counts).reduce((a, b) => a + b, 0));
  const top = niceMax(Math.max(0, ...totals));
  frame(ctx, box, top, spanSeconds);
  if (samples.length < 2) return;
  const x = (t) => box.right - ((now - t) / (spanSeconds * 1000)) * (box.right - box.left);
  const y = (v) => box.bottom - (v / top) * (box.bottom - box.upper);
  const base = samples.map(() => 0);
  for (const status of Object.keys(STATUS_COLORS)) {
    const upper = samples.map((s, i) => base[i] + (s.counts[status] || 0));
    if (upper.every((v, i) => v === base[i])) continue;
    ctx.beginPath();
    samples.forEach((s, i) => {
      const px = Math.max(box.left, x(s.t));
      if (i === 0) ctx.moveTo(px, y(upper[i]));
      else ctx.lineTo(px, y(upper[i]));
    });
    for (let i = samples.length - 1; i >= 0; i -= 1) {
      ctx.lineTo(Math.max(box.left, x(samples[i].t)), y(base[i]));
    }
    ctx.closePath();
    ctx.fillStyle = `${STATUS_COLORS[status]}cc`;
    ctx.fill();
    upper.forEach((v, i) => {
      base[i] = v;
    });
  }
}

// perSecond: counts of the last spanSeconds whole seconds, oldest first; bars.
export function drawRateChart(canvas, perSecond, spanSeconds) {
  const { ctx, width, height } = prepare(canvas);
  const box = { left: 34, right: width - 6, upper: 8, bottom: height - 18 };
  const top = niceMax(Math.max(0, ...perSecond));
  frame(ctx, box, top, spanSeconds);
  const slot = (box.right - box.left) / perSecond.length;
  ctx.fillStyle = "#3b6fd6";
  perSecond.forEach((count, i) => {
    if (!count) return;
    const h = (count / top) * (box.bottom - box.upper);
    ctx.fillRect(box.left + i * slot + 0.5, box.bottom - h, Math.max(1, slot - 1), h);
  });
}
