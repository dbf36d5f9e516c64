// The live view: Prometheus text from /v1/metrics, turned into rates, and a small canvas chart of them.

/** Parses the Prometheus text exposition format into Map(name -> [{labels, value}]). */
export function parsePrometheus(text) {
  const samples = new Map();
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    let name;
    let labels = {};
    let rest;
    const brace = line.indexOf("{");
    const space = line.indexOf(" ");
    if (brace >= 0 && (space < 0 || brace < space)) {
      name = line.slice(0, brace);
      const parsed = parseLabels(line, brace + 1);
      labels = parsed.labels;
      rest = line.slice(parsed.end + 1).trim();
    } else {
      name = line.slice(0, space);
      rest = line.slice(space + 1).trim();
    }
    const value = parseValue(rest.split(/\s+/)[0]);
    if (!samples.has(name)) samples.set(name, []);
    samples.get(name).push({ labels, value });
  }
  return samples;
}

function parseValue(text) {
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}

// Reads `a="x",b="y\"z"}` from `start`; returns the labels and the index of the closing brace.
function parseLabels(line, start) {
  const labels = {};
  let i = start;
  while (i < line.length && line[i] !== "}") {
    const eq = line.indexOf("=", i);
    const key = line.slice(i, eq).trim().replace(/^,/, "").trim();
    i = eq + 2; // past ="
    let value = "";
    while (i < line.length && line[i] !== '"') {
      if (line[i] === "\\" && i + 1 < line.length) {
        const next = line[i + 1];
        value += next === "n" ? "\n" : next;
        i += 2;
      } else {
        value += line[i];
        i += 1;
      }
    }
    labels[key] = value;
    i += 1; // past the closing quote
    if (line[i] === ",") i += 1;
  }
  return { labels, end: i };
}

/** The sum of a metric's samples over every model. */
export function total(samples, name) {
  return (samples.get(name) || []).reduce((sum, s) => sum + s.value, 0);
}

/** Turns successive scrapes into the figures the live view shows. */
export class LiveStats {
  constructor(capacity = 60) {
    this.capacity = capacity;
    this.previous = null;
    this.history = [];
    this.lastTtft = null;
  }

  /** Adds one scrape taken at `now` (ms); returns {running, waiting, toks, ttft}. */
  add(samples, now) {
    const point = {
      at: now,
      running: total(samples, "num_requests_running"),
      waiting: total(samples, "num_requests_waiting"),
      tokens: total(samples, "generation_tokens_total"),
      ttftSum: total(samples, "time_to_first_token_seconds_sum"),
      ttftCount: total(samples, "time_to_first_token_seconds_count"),
      toks: 0,
    };
    const before = this.previous;
    if (before) {
      const seconds = (now - before.at) / 1000;
      // A restarted server's counters start again from zero: no negative rates.
      point.toks = seconds > 0 ? Math.max(0, point.tokens - before.tokens) / seconds : 0;
      const firsts = point.ttftCount - before.ttftCount;
      if (firsts > 0) this.lastTtft = (point.ttftSum - before.ttftSum) / firsts;
    } else if (point.ttftCount > 0) {
      this.lastTtft = point.ttftSum / point.ttftCount;
    }
    this.previous = point;
    this.history.push(point);
    if (this.history.length > this.capacity) this.history.shift();
    return { running: point.running, waiting: point.waiting, toks: point.toks, ttft: this.lastTtft };
  }
}

function cssVar(element, name, fallback) {
  const value = getComputedStyle(element).getPropertyValue(name).trim();
  return value || fallback;
}

/** Draws tokens/s (line, left scale) and running requests (steps, right scale) of `history` on `canvas`. */
export function drawChart(canvas, history, capacity) {
  const ratio = window.devicePixelRatio || 1;
  const cssWidth = canvas.clientWidth || canvas.width;
  const cssHeight = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(cssWidth * ratio) || canvas.height !== Math.round(cssHeight * ratio)) {
    canvas.width = Math.round(cssWidth * ratio);
    canvas.height = Math.round(cssHeight * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  const ink = cssVar(canvas, "--chart-ink", "#333");
  const grid = cssVar(canvas, "--chart-grid", "#ddd");
  const toksColour = cssVar(canvas, "--chart-toks", "#0b5cad");
  const runningColour = cssVar(canvas, "--chart-running", "#a0341b");
  const left = 36;
  const right = 24;
  const top = 8;
  const bottom = 18;
  const w = cssWidth - left - right;
  const h = cssHeight - top - bottom;
  ctx.clearRect(0, 0, cssWidth, cssHeight);

  const maxToks = niceCeiling(Math.max(1, ...history.map((p) => p.toks)));
  const maxRunning = Math.max(1, ...history.map((p) => p.running));
  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  ctx.strokeStyle = grid;
  ctx.fillStyle = ink;
  for (let i = 0; i <= 2; i += 1) {
    const y = top + (h * i) / 2;
    ctx.beginPath();
    ctx.moveTo(left, y + 0.5);
    ctx.lineTo(left + w, y + 0.5);
    ctx.stroke();
    ctx.textAlign = "right";
    const toks = (maxToks * (2 - i)) / 2;
    ctx.fillText(Number.isInteger(toks) ? String(toks) : toks.toFixed(1), left - 4, y + 4);
    const running = (maxRunning * (2 - i)) / 2;
    if (Number.isInteger(running)) {
      ctx.textAlign = "left";
      ctx.fillText(String(running), left + w + 4, y + 4);
    }
  }
  ctx.textAlign = "center";
  ctx.fillText(`last ${capacity} s`, left + w / 2, cssHeight - 4);

  const x = (i) => left + (w * (capacity - history.length + i)) / Math.max(capacity - 1, 1);
  // Running requests: a step line.
  ctx.strokeStyle = runningColour;
  ctx.lineWidth = 2;
  ctx.beginPath();
  history.forEach((p, i) => {
    const y = top + h - (h * p.running) / maxRunning;
    if (i === 0) ctx.moveTo(x(i), y);
    else {
      ctx.lineTo(x(i), top + h - (h * history[i - 1].running) / maxRunning);
      ctx.lineTo(x(i), y);
    }
  });
  ctx.stroke();
  // Tokens per second: a line.
  ctx.strokeStyle = toksColour;
  ctx.beginPath();
  history.forEach((p, i) => {
    const y = top + h - (h * p.toks) / maxToks;
    if (i === 0) ctx.moveTo(x(i), y);
    else ctx.lineTo(x(i), y);
  });
  ctx.stroke();
}

function niceCeiling(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}
