// The playground page: chat, model picker and settings, retrieval try-outs and the live server view.

import { ApiError, call, events, getJson, onAuthRequired, postJson, setApiKey } from "./api.js";
import { LiveStats, drawChart, parsePrometheus } from "./metrics.js";

const $ = (id) => document.getElementById(id);
const ENCODER_TASKS = new Set(["embedding", "ranking"]);
const POLL_MS = 1000;
const CHART_POINTS = 60;

const state = {
  history: [], // the conversation sent with each turn: {role, content}
  controller: null, // the AbortController of the reply being streamed
  authBlocked: false, // a 401 was seen: wait for a key before polling again
  live: new LiveStats(CHART_POINTS),
};

// -- API key ----------------------------------------------------------------------------------------------------

function askForKey(reason) {
  state.authBlocked = true;
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason || "This server needs an API key.";
  $("api-key").value = "";
  if (!dialog.open) dialog.showModal();
  $("api-key").focus();
}

onAuthRequired((message) => askForKey(`The server refused the request: ${message}`));

$("key-button").addEventListener("click", () => askForKey("Enter the API key for this server."));
$("key-dialog").addEventListener("close", () => {
  if ($("key-dialog").returnValue !== "save") return;
  const key = $("api-key").value.trim();
  setApiKey(key);
  $("api-key").value = "";
  state.authBlocked = false;
  loadModels();
});

// -- models -----------------------------------------------------------------------------------------------------

function describe(card) {
  let text = card.id;
  if (card.parent) text += ` (adapter of ${card.parent})`;
  else if (card.task === "completion") text += " (base model)";
  return text;
}

function fill(select, cards) {
  const previous = select.value;
  select.replaceChildren(
    ...cards.map((card) => {
      const option = document.createElement("option");
      option.value = card.id;
      option.textContent = describe(card);
      return option;
    }),
  );
  if (cards.some((card) => card.id === previous)) select.value = previous;
  select.disabled = cards.length === 0;
}

async function loadModels() {
  let cards;
  try {
    cards = (await getJson("/v1/models")).data;
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showState(`cannot list models: ${error.message}`, "bad");
    return;
  }
  fill($("model"), cards.filter((card) => !ENCODER_TASKS.has(card.task)));
  const embedders = cards.filter((card) => card.task === "embedding");
  // Ranking works with a cross-encoder or, by cosine similarity, with an embedding model.
  const rankers = cards.filter((card) => ENCODER_TASKS.has(card.task));
  fill($("embed-model"), embedders);
  fill($("rank-model"), rankers);
  $("retrieval-none").hidden = rankers.length > 0;
  $("embed-form").hidden = embedders.length === 0;
  $("rank-form").hidden = rankers.length === 0;
  document.body.dataset.models = String(cards.length);
}

// -- chat -------------------------------------------------------------------------------------------------------

function numberOf(id) {
  const input = $(id);
  const value = input.valueAsNumber;
  return Number.isFinite(value) ? value : undefined;
}

function bubble(role, label) {
  const item = document.createElement("article");
  item.className = `message ${role}`;
  const head = document.createElement("h3");
  head.className = "who";
  head.textContent = label;
  const text = document.createElement("div");
  text.className = "text";
  const meta = document.createElement("p");
  meta.className = "meta";
  item.append(head, text, meta);
  $("messages").append(item);
  return { item, text, meta };
}

function scrollDown() {
  const log = $("messages");
  log.scrollTop = log.scrollHeight;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("model").disabled = busy;
}

function replyStats({ usage, chunks, started, first, last, finish }) {
  const parts = [];
  const completion = usage ? usage.completion_tokens : chunks;
  if (usage) parts.push(`${usage.prompt_tokens} prompt tokens`);
  parts.push(`${usage ? "" : "≈"}${completion} completion tokens`);
  if (first !== null && last !== null && completion > 1 && last > first) {
    // Decode speed: tokens after the first over the time they took.
    parts.push(`${(((completion - 1) * 1000) / (last - first)).toFixed(1)} tok/s`);
  }
  if (first !== null) parts.push(`first token ${Math.round(first - started)} ms`);
  if (finish) parts.push(finish === "stopped" ? "stopped" : `finish: ${finish}`);
  return parts.join(" · ");
}

async function sendMessage(text) {
  const model = $("model").value;
  if (!model) return;
  const system = $("system").value.trim();
  state.history.push({ role: "user", content: text });
  bubble("user", "You").text.textContent = text;
  const reply = bubble("assistant", model);
  reply.item.setAttribute("aria-busy", "true");
  scrollDown();

  const body = {
    model,
    messages: system ? [{ role: "system", content: system }, ...state.history] : [...state.history],
    stream: true,
    stream_options: { include_usage: true },
  };
  const temperature = numberOf("temperature");
  const topP = numberOf("top-p");
  const maxTokens = numberOf("max-tokens");
  if (temperature !== undefined) body.temperature = temperature;
  if (topP !== undefined) body.top_p = topP;
  if (maxTokens !== undefined) body.max_tokens = maxTokens;

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const run = { usage: null, chunks: 0, started: performance.now(), first: null, last: null, finish: null };
  let content = "";
  try {
    const response = await call("/v1/chat/completions", { method: "POST", body, signal: controller.signal });
    for await (const event of events(response)) {
      if (event.error) throw new ApiError(event.error.code || 500, event.error.message);
      if (event.usage) run.usage = event.usage;
      for (const choice of event.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          const now = performance.now();
          if (run.first === null) run.first = now;
          run.last = now;
          run.chunks += 1;
          content += piece;
          reply.text.textContent = content;
          scrollDown();
        }
        if (choice.finish_reason) run.finish = choice.finish_reason;
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      run.finish = "stopped";
    } else {
      reply.item.classList.add("error");
      reply.text.textContent = content || "";
      const problem = document.createElement("p");
      problem.className = "problem";
      problem.setAttribute("role", "alert");
      problem.textContent = `Error: ${error.message}`;
      reply.item.insertBefore(problem, reply.meta);
    }
  } finally {
    state.controller = null;
    setBusy(false);
    reply.item.removeAttribute("aria-busy");
    reply.item.dataset.finish = run.finish || "error";
    if (content) state.history.push({ role: "assistant", content });
    reply.meta.textContent = replyStats(run);
    scrollDown();
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  sendMessage(text);
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

// Aborting the fetch closes the connection: the server frees the sequence at its next step.
$("stop").addEventListener("click", () => state.controller && state.controller.abort());

$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  $("prompt").focus();
});

// -- embeddings and ranking -------------------------------------------------------------------------------------

function cosine(a, b) {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i += 1) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / (Math.sqrt(na) * Math.sqrt(nb) || 1);
}

$("embed-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = $("similarity");
  out.textContent = "…";
  try {
    const result = await postJson("/v1/embeddings", {
      model: $("embed-model").value,
      input: [$("text-a").value, $("text-b").value],
    });
    const [a, b] = result.data.sort((x, y) => x.index - y.index).map((d) => d.embedding);
    const similarity = cosine(a, b);
    out.dataset.value = String(similarity);
    out.textContent = `Cosine similarity ${similarity.toFixed(3)} (${a.length} dimensions, ${result.usage.prompt_tokens} tokens)`;
  } catch (error) {
    out.textContent = `Error: ${error.message}`;
  }
});

$("rank-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const list = $("rankings");
  const passages = $("passages")
    .value.split("\n")
    .map((line) => line.trim())
    .filter(Boolean);
  list.replaceChildren();
  try {
    const result = await postJson("/v1/ranking", {
      model: $("rank-model").value,
      query: { text: $("query").value },
      passages: passages.map((text) => ({ text })),
    });
    list.replaceChildren(
      ...result.rankings.map((ranking) => {
        const item = document.createElement("li");
        item.textContent = `${passages[ranking.index]} `;
        const score = document.createElement("span");
        score.className = "score";
        score.textContent = `(logit ${ranking.logit.toFixed(2)})`;
        item.append(score);
        return item;
      }),
    );
  } catch (error) {
    const item = document.createElement("li");
    item.textContent = `Error: ${error.message}`;
    list.replaceChildren(item);
  }
});

// -- live view --------------------------------------------------------------------------------------------------

function showState(text, kind) {
  const badge = $("server-state");
  badge.textContent = text;
  badge.dataset.kind = kind;
}

async function pollHealth() {
  try {
    const response = await fetch("/v1/health/ready", { cache: "no-store", credentials: "omit" });
    if (response.ok) showState("ready", "good");
    else showState((await response.json()).error.message, "warn");
  } catch (_) {
    showState("server unreachable", "bad");
  }
}

function formatRate(value) {
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

async function pollMetrics() {
  if (state.authBlocked || document.hidden) return;
  let text;
  try {
    text = await (await call("/v1/metrics")).text();
  } catch (_) {
    return;
  }
  const figures = state.live.add(parsePrometheus(text), performance.now());
  $("stat-running").textContent = String(figures.running);
  $("stat-waiting").textContent = String(figures.waiting);
  $("stat-toks").textContent = formatRate(figures.toks);
  $("stat-ttft").textContent = figures.ttft === null ? "–" : `${Math.round(figures.ttft * 1000)} ms`;
  const chart = $("chart");
  drawChart(chart, state.live.history, CHART_POINTS);
  chart.dataset.points = String(state.live.history.length);
}

let polling = false;
async function tick() {
  if (polling) return; // a slow scrape must not pile up behind itself
  polling = true;
  try {
    await Promise.all([pollHealth(), pollMetrics()]);
  } finally {
    polling = false;
  }
}

loadModels();
tick();
setInterval(tick, POLL_MS);
