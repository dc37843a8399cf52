// The explorer page's behaviour. It asks explore.py's JSON API and draws the answers; it computes no
// probability, loss or attention weight itself: those come from the project's Python code.
// Read it top to bottom: state and helpers, start-up, then one section per panel.

"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  info: null,       // GET /api/info: the checkpoints, the settings' ranges, the loss curve
  ckpt: 0,          // index of the checkpoint every panel uses
  ids: null,        // the text as token ids, once the server has tokenized it (or a click appended one)
  settings: {},     // sampling settings from the sliders
  next: null,       // the last /api/next answer
  generation: null, // AbortController of a running generation
  version: 0,       // bumped whenever the text changes; answers for an older text are dropped
  messages: [],     // the chat panel's conversation so far: [{role, content}, ...]
};

// ------------------------------------------------------------------------------------------------
// Talking to the server
// ------------------------------------------------------------------------------------------------

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error);
  const timing = response.headers.get("Server-Timing");
  if (timing) showStatus(`${path}: ${timing.split("dur=")[1]} ms on the server`);
  return answer;
}

// The text as the API takes it: the token ids when we have them (clicks append ids), else the raw text.
function textInput() {
  return state.ids ? {ids: state.ids} : {text: $("prompt").value};
}

function showStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

function fail(error) {
  showStatus(error.message, true);
}

// A token as text you can see: spaces as middle dots, line breaks as arrows.
function visible(piece) {
  return piece.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192") || "\u2205";
}

function percent(p) {
  return p === 0 ? "0" : p >= 0.1 ? `${(100 * p).toFixed(1)}%` : `${(100 * p).toPrecision(2)}%`;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function checkpoint(index = state.ckpt) {
  return state.info.checkpoints[index];
}

// ------------------------------------------------------------------------------------------------
// Start-up and the shared text
// ------------------------------------------------------------------------------------------------

async function start() {
  state.info = await api("/api/info");
  state.ckpt = state.info.main;
  for (const c of state.info.checkpoints) {
    const label = `${c.name} (${c.kind}, step ${c.step})`;
    $("ckpt").append(new Option(label, c.index, false, c.index === state.ckpt));
    $("compare").append(new Option(label, c.index));
  }
  $("compare").value = state.info.checkpoints.length > 1 ? (state.ckpt === 0 ? 1 : 0) : state.ckpt;
  buildSliders();
  $("ckpt").addEventListener("change", () => {
    state.ckpt = Number($("ckpt").value);
    if (Number($("compare").value) === state.ckpt && state.info.checkpoints.length > 1) {
      $("compare").value = state.ckpt === 0 ? 1 : 0;  // comparing a checkpoint with itself shows nothing
    }
    showCheckpoint();
    clearChat();  // another model, another conversation
    textChanged();
  });
  $("prompt").addEventListener("input", debounce(textChanged, 250));
  $("greedy").addEventListener("click", () => appendToken(state.next && state.next.greedy));
  $("sample").addEventListener("click", () => {
    appendToken(state.next && state.next.sampled);
    $("seed").value = Number($("seed").value) + 1;  // the next draw uses the next seed: reproducible, not repetitive
  });
  $("seed").addEventListener("change", refreshNext);
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => state.generation && state.generation.abort());
  for (const [id, refresh] of [["tokens-panel", refreshTokens], ["attention-panel", refreshAttention],
                                ["run-panel", refreshCompare]]) {
    $(id).addEventListener("toggle", () => { if ($(id).open) refresh().catch(fail); });
  }
  $("layer").addEventListener("change", refreshAttention);
  $("head").addEventListener("change", refreshAttention);
  $("compare").addEventListener("change", refreshCompare);
  $("chat-form").addEventListener("submit", (event) => { event.preventDefault(); ask(); });
  $("chat-clear").addEventListener("click", clearChat);
  $("wrap-chat").addEventListener("click", wrapInChatTemplate);
  showCheckpoint();
  await refreshAll();
}

function debounce(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

// The user edited the text (or picked another checkpoint): forget the ids, let the server tokenize again.
function textChanged() {
  state.ids = null;
  refreshAll();
}

async function refreshAll() {
  state.version += 1;
  await refreshNext();
  refreshPanels();
}

function refreshPanels() {
  if ($("tokens-panel").open) refreshTokens().catch(fail);
  if ($("attention-panel").open) refreshAttention().catch(fail);
  if ($("run-panel").open) refreshCompare().catch(fail);
}

// Adopt the server's view of the text: its token ids, and (after a click) the text they decode to.
function adopt(answer) {
  state.ids = answer.ids;
  if ($("prompt").value !== answer.text && document.activeElement !== $("prompt")) $("prompt").value = answer.text;
  const limit = checkpoint().model_config.max_seq_len;
  $("prompt-info").textContent = `${answer.ids.length} tokens of the model's context of ${limit}`;
}

// ------------------------------------------------------------------------------------------------
// 1. Next token
// ------------------------------------------------------------------------------------------------

const SETTING_NAMES = {
  repetition_penalty: "repetition penalty", temperature: "temperature", top_k: "top-k", top_p: "top-p", min_p: "min-p"};

function buildSliders() {
  for (const [key, range] of Object.entries(state.info.settings)) {
    state.settings[key] = range.off;
    const row = element("label", "slider");
    const input = Object.assign(element("input"), {type: "range", min: range.low, max: range.high, step: range.step,
                                                   value: range.off, id: `slider-${key}`});
    const output = element("output");
    const show = () => {
      const value = Number(input.value);
      const off = value === range.off || (key === "top_k" && value === 0);
      output.textContent = key === "temperature" && value === 0 ? "0 greedy" : off ? `${value} off` : String(value);
    };
    input.addEventListener("input", () => { state.settings[key] = Number(input.value); show(); refreshNext(); });
    show();
    row.append(element("span", "", SETTING_NAMES[key]), input, output);
    $("sliders").append(row);
  }
}

let nextRequest = 0;  // only the newest slider position's answer is drawn

async function refreshNext() {
  const mine = ++nextRequest;
  try {
    const answer = await api("/api/next", {ckpt: state.ckpt, ...textInput(), settings: state.settings,
                                           seed: Number($("seed").value) || 0, top: 20});
    if (mine !== nextRequest) return;
    state.next = answer;
    adopt(answer);
    drawStages(answer.stages);
    drawBars($("bars"), answer, true);
    $("bars").classList.remove("stale");
  } catch (error) {
    $("bars").classList.add("stale");  // the bars are for an earlier text: say so by fading them
    fail(error);
  }
}

function drawStages(stages) {
  const list = $("stages");
  list.replaceChildren();
  stages.forEach((stage, i) => {
    const key = Object.keys(SETTING_NAMES)[i - 1];
    const off = i > 0 && state.settings[key] === state.info.settings[key].off;
    const item = element("li", off ? "off" : "");
    item.append(element("b", "", (i ? "\u2192 " : "") + stage.stage + (off ? " (off)" : "")));
    item.append(`${stage.alive.toLocaleString()} tokens`, element("br"));
    if (i > 0) item.append(`kept ${percent(stage.kept)}`, element("br"));
    item.append(`entropy ${stage.entropy_bits.toFixed(2)} bits`);
    list.append(item);
  });
}

// Bars for an /api/next answer. detailed: the stage that removed a token and the click-to-append buttons.
function drawBars(box, answer, detailed) {
  const rows = answer.tokens;
  const last = rows[0].p.length - 1;
  const stageIndex = (name) => answer.stages.findIndex((stage) => stage.stage === name);
  // a removed token is drawn at the probability it had just before the filter that removed it
  const shown = (row) => row.removed_by ? row.p[stageIndex(row.removed_by) - 1] : row.p[last];
  const scale = Math.max(...rows.map((row) => Math.max(shown(row), row.p[0]))) || 1;
  box.replaceChildren();
  for (const row of rows) {
    const line = element("div", "bar-row" + (row.removed_by ? " removed" : ""));
    const label = visible(row.piece) + (row.id === answer.greedy ? " \u2605" : "") + (row.id === answer.sampled ? " \u25cf" : "");
    const piece = element(detailed ? "button" : "span", "piece", label);
    piece.title = `token id ${row.id}; probability after each stage: ` +
      row.p.map((p, i) => `${answer.stages[i].stage} ${percent(p)}`).join(", ");
    if (detailed) piece.addEventListener("click", () => appendToken(row.id));
    const bar = element("span", "bar");
    const fill = element("span", "fill");
    fill.style.width = `${(100 * shown(row)) / scale}%`;
    const tick = element("span", "tick");
    tick.style.left = `${(100 * row.p[0]) / scale}%`;
    bar.append(fill, tick);
    line.append(piece, bar, element("span", "num", percent(row.p[last])));
    if (detailed) line.append(element("span", "why", row.removed_by ? `cut by ${row.removed_by}` : ""));
    box.append(line);
  }
}

// The text as one user message through the chat template: the server renders and tokenizes it, and the
// box then shows the rendered text (what the model reads), as token ids every panel uses from here on.
async function wrapInChatTemplate() {
  try {
    const answer = await api("/api/next", {ckpt: state.ckpt, text: $("prompt").value, chat: true, top: 1});
    $("prompt").value = answer.text;
    state.ids = answer.ids;
    refreshAll();
  } catch (error) {
    fail(error);
  }
}

function appendToken(id) {
  if (id === null || id === undefined || !state.ids) return;
  state.ids = [...state.ids, id];
  refreshAll();
}

async function generate() {
  if (!state.ids) return;
  const room = checkpoint().model_config.max_seq_len - state.ids.length;
  const count = Math.min(Number($("count").value) || 1, room, state.info.max_new_tokens);
  if (count < 1) return fail(new Error("the text already fills the model's context: shorten it first"));
  state.generation = new AbortController();
  setGenerating(true);
  const prompt = $("prompt");
  let received = 0;
  try {
    await stream({ckpt: state.ckpt, ids: state.ids, settings: state.settings, seed: Number($("seed").value) || 0,
                  max_new_tokens: count}, (line) => {
      if (line.id !== undefined) { state.ids.push(line.id); received += 1; }
      prompt.value += line.text;
      if (line.done) $("generate-info").textContent = `${line.tokens} tokens in ${line.seconds} s, stopped: ${line.reason}`;
    }, state.generation.signal);
  } catch (error) {
    if (error.name !== "AbortError") fail(error);
    else $("generate-info").textContent = `stopped by you after ${received} tokens`;
  }
  setGenerating(false);
  refreshAll();
}

function setGenerating(on) {
  $("stop").disabled = !on;
  for (const id of ["generate", "greedy", "sample"]) $(id).disabled = on;
  $("prompt").readOnly = on;
}

// POST /api/generate and call onLine with each JSON line as it arrives.
async function stream(body, onLine, signal) {
  const response = await fetch("/api/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                                 body: JSON.stringify(body), signal});
  if (!response.ok) throw new Error((await response.json()).error);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    pending += decoder.decode(value, {stream: true});
    const lines = pending.split("\n");
    pending = lines.pop();
    for (const line of lines) if (line) onLine(JSON.parse(line));
  }
}

// ------------------------------------------------------------------------------------------------
// 2. Tokens and surprise
// ------------------------------------------------------------------------------------------------

async function refreshTokens() {
  const version = state.version;
  const answer = await api("/api/tokens", {ckpt: state.ckpt, ...textInput()});
  if (version !== state.version) return;
  const ceiling = Math.log2(checkpoint().model_config.vocab_size);  // as surprised as a uniform guess
  const view = $("token-view");
  view.replaceChildren();
  const all = [...answer.tokens, {...answer.end, isEnd: true}];
  all.forEach((token, i) => {
    const box = element("span", "token" + (token.nll === null ? " unscored" : ""));
    box.append(element("span", "text", token.isEnd ? "\u27e8end\u27e9" : visible(token.piece)),
               element("span", "id", String(token.id)));
    if (token.nll !== null) {
      const strength = Math.min(token.bits / ceiling, 1);
      box.style.background = `rgba(205, 60, 40, ${(0.08 + 0.8 * strength).toFixed(3)})`;
    }
    const where = token.isEnd ? "end of text (EOS, counted as 1 byte)" : `token ${i}: ${JSON.stringify(token.piece)}`;
    const bytes = token.isEnd ? "" : `, bytes [${token.bytes}]`;
    const surprise = token.nll === null ? "no context before it: not scored"
      : `surprise ${token.nll.toFixed(3)} nats = ${token.bits.toFixed(2)} bits (p = ${percent(token.p)})`;
    box.addEventListener("mouseenter", () => { $("token-detail").textContent = `${where}, id ${token.id}${bytes}: ${surprise}`; });
    view.append(box);
  });
  $("token-totals").textContent = `${answer.scored} tokens scored, ${answer.bytes} bytes, ${answer.bits.toFixed(1)} bits in ` +
    `all: ${answer.bpb.toFixed(4)} bits per byte. Loss ${answer.loss.toFixed(4)} nats per token, perplexity ` +
    `${answer.ppl.toFixed(1)}. (White = no surprise; full red = ${ceiling.toFixed(1)} bits, a uniform guess over the vocabulary.)`;
}

// ------------------------------------------------------------------------------------------------
// 3. Attention
// ------------------------------------------------------------------------------------------------

async function refreshAttention() {
  const version = state.version;
  const answer = await api("/api/attention", {ckpt: state.ckpt, ...textInput(),
                                              layer: Number($("layer").value) || 0, head: Number($("head").value) || 0});
  if (version !== state.version) return;
  fillSelect($("layer"), answer.n_layers, answer.layer);
  fillSelect($("head"), answer.n_heads, answer.head);
  const groups = answer.n_heads / answer.n_kv_heads;
  $("attention-about").textContent = `query head ${answer.head} reads key/value head ${answer.kv_head}` +
    (groups > 1 ? ` (grouped-query attention: ${groups} query heads share each K/V head)` : "") +
    (answer.swa_window ? `; sliding window of ${answer.swa_window}: each query sees its last ${answer.swa_window} keys` : "");
  drawHeatmap(answer);
}

function fillSelect(select, count, value) {
  if (select.options.length !== count) {
    select.replaceChildren(...Array.from({length: count}, (_, i) => new Option(String(i), i)));
  }
  select.value = value;
}

function drawHeatmap(answer) {
  const weights = answer.weights;
  const n = weights.length;
  const cell = Math.max(2, Math.min(28, Math.floor(560 / n)));
  const margin = cell >= 10 ? 90 : 0;  // room for the token labels when the cells are big enough to name
  const canvas = $("heatmap");
  canvas.width = canvas.height = margin + n * cell;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const w = weights[i][j];
      const shade = Math.sqrt(w);
      ctx.fillStyle = w === 0 ? "#e4e7ea"
        : `rgb(${Math.round(255 - 215 * shade)}, ${Math.round(255 - 170 * shade)}, ${Math.round(255 - 80 * shade)})`;
      ctx.fillRect(margin + j * cell, margin + i * cell, cell, cell);
    }
  }
  if (margin) {
    ctx.fillStyle = "#1d2329";
    ctx.font = `${Math.min(12, cell - 2)}px ui-monospace, monospace`;
    ctx.textBaseline = "middle";
    answer.pieces.forEach((piece, i) => {
      const label = visible(piece).slice(0, 10);
      ctx.textAlign = "right";
      ctx.fillText(label, margin - 4, margin + i * cell + cell / 2);  // queries down the left
      ctx.save();
      ctx.translate(margin + i * cell + cell / 2, margin - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(label, 0, 0);  // keys along the top
      ctx.restore();
    });
  }
  const outline = $("heatmap-row");
  canvas.onmousemove = (event) => {
    const box = canvas.getBoundingClientRect();
    const i = Math.floor((event.clientY - box.top - margin) / cell);
    const j = Math.floor((event.clientX - box.left - margin) / cell);
    if (i < 0 || i >= n) { outline.style.display = "none"; return; }
    Object.assign(outline.style, {display: "block", left: `${margin - 2}px`, top: `${margin + i * cell - 2}px`,
                                  width: `${n * cell}px`, height: `${cell}px`});
    const row = weights[i].map((w, k) => [w, k]).filter(([w]) => w > 0).sort((a, b) => b[0] - a[0]).slice(0, 6);
    const cellText = j >= 0 && j < n ? `; key ${j} ${JSON.stringify(answer.pieces[j])}: ${weights[i][j].toFixed(4)}` : "";
    $("attention-detail").textContent = `query ${i} ${JSON.stringify(answer.pieces[i])}${cellText}. Largest weights: ` +
      row.map(([w, k]) => `${JSON.stringify(answer.pieces[k])}@${k} ${w.toFixed(3)}`).join(", ");
  };
  canvas.onmouseleave = () => { outline.style.display = "none"; };
}

// ------------------------------------------------------------------------------------------------
// 4. The run
// ------------------------------------------------------------------------------------------------

function showCheckpoint() {
  const c = checkpoint();
  const mc = c.model_config;
  $("facts").textContent = `${c.kind}, step ${c.step}, ${Number(c.n_params).toLocaleString()} parameters`;
  const training = (c.config && c.config.training) || {};
  const rows = [
    ["file", c.name], ["kind", c.kind], ["step", c.step], ["epoch", c.epoch], ["tokens seen", c.tokens_seen],
    ["train loss", c.train_loss], ["val loss", c.val_loss], ["parameters", c.n_params], ["tokenizer", c.tokenizer],
    ["model", Object.entries(mc).map(([k, v]) => `${k}=${v}`).join(", ")],
    ["training", ["lr", "max_steps", "seq_len", "micro_batch_size", "grad_accum_steps", "precision"]
      .filter((k) => k in training).map((k) => `${k}=${training[k]}`).join(", ")],
  ];
  $("facts-table").replaceChildren(...rows.map(([name, value]) => {
    const tr = element("tr");
    const shown = typeof value === "number" && !Number.isInteger(value) ? value.toFixed(4)
      : typeof value === "number" ? value.toLocaleString() : String(value ?? "-");
    tr.append(element("td", "", name), element("td", "", shown));
    return tr;
  }));
  drawLossCurve();
  $("chat-note").textContent = c.chat_template
    ? "The conversation goes through the checkpoint's chat template (chat.py), as infer.py --interactive sends " +
      "it; each reply is streamed token by token with the sampling settings of panel 1 and ends at the " +
      "template's end-of-turn token."
    : "This checkpoint has no chat template: the conversation goes through the instruction template " +
      "(chat.format_instruction), which it never saw, so expect it to continue the text rather than answer. " +
      "Pick an SFT checkpoint (finetune.py writes them) or an imported instruct model to chat.";
}

function drawLossCurve() {
  const svg = $("loss-curve");
  svg.replaceChildren();
  const losses = state.info.losses;
  const NS = "http://www.w3.org/2000/svg";
  const add = (tag, attributes, text) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  if (!losses || (!losses.train.length && !losses.val.length)) {
    add("text", {x: 20, y: 40}, "no metrics.csv beside this checkpoint");
    return;
  }
  const points = [...losses.train, ...losses.val];
  const steps = points.map((p) => p[0]).concat(state.info.checkpoints.map((c) => c.step || 0));
  const values = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(0, ...steps), Math.max(1, ...steps)];
  const [y0, y1] = [Math.min(...values) * 0.95, Math.max(...values) * 1.02];
  const box = {left: 48, right: 545, top: 12, bottom: 225};
  const X = (step) => box.left + ((step - x0) / (x1 - x0)) * (box.right - box.left);
  const Y = (loss) => box.bottom - ((loss - y0) / (y1 - y0 || 1)) * (box.bottom - box.top);
  for (let k = 0; k <= 4; k++) {
    const loss = y0 + ((y1 - y0) * k) / 4;
    add("line", {x1: box.left, x2: box.right, y1: Y(loss), y2: Y(loss), class: "grid"});
    add("text", {x: box.left - 6, y: Y(loss) + 4, "text-anchor": "end"}, loss.toFixed(2));
    const step = x0 + ((x1 - x0) * k) / 4;
    add("text", {x: X(step), y: box.bottom + 16, "text-anchor": "middle"}, String(Math.round(step)));
  }
  add("line", {x1: box.left, x2: box.right, y1: box.bottom, y2: box.bottom, class: "axis"});
  add("line", {x1: box.left, x2: box.left, y1: box.top, y2: box.bottom, class: "axis"});
  add("text", {x: (box.left + box.right) / 2, y: 256, "text-anchor": "middle"}, "optimizer step");
  add("text", {x: 12, y: 120, transform: "rotate(-90 12 120)", "text-anchor": "middle"}, "loss (nats/token)");
  for (const c of state.info.checkpoints) {
    if (c.step === null || c.step === undefined) continue;
    add("line", {x1: X(c.step), x2: X(c.step), y1: box.top, y2: box.bottom,
                 class: "marker" + (c.index === state.ckpt ? " current" : "")}).append(
      Object.assign(document.createElementNS(NS, "title"), {textContent: `${c.name}: step ${c.step}`}));
  }
  const line = (series, className) => add("polyline", {class: className,
                                                        points: series.map(([s, l]) => `${X(s)},${Y(l)}`).join(" ")});
  line(losses.train, "train");
  line(losses.val, "val");
  for (const [s, l] of losses.val) add("circle", {cx: X(s), cy: Y(l), r: 3, class: "val-dot"});
  add("text", {x: box.right - 4, y: box.top + 12, "text-anchor": "end", class: "legend"}, "blue: train   orange: validation");
}

async function refreshCompare() {
  const version = state.version;
  const other = Number($("compare").value);
  const bars = (index) => {
    // ids only mean the same thing under the same tokenizer; otherwise send the text
    const input = checkpoint(index).tokenizer === checkpoint().tokenizer ? textInput() : {text: $("prompt").value};
    return api("/api/next", {ckpt: index, ...input, settings: state.settings, seed: Number($("seed").value) || 0, top: 12});
  };
  const [a, b] = await Promise.all([bars(state.ckpt), bars(other)]);
  if (version !== state.version) return;
  for (const [side, index, answer] of [["a", state.ckpt, a], ["b", other, b]]) {
    const c = checkpoint(index);
    $(`compare-${side}-title`).textContent = `${c.name}: step ${c.step}, val loss ${c.val_loss === null ? "-" : c.val_loss.toFixed(3)}`;
    drawBars($(`compare-${side}`), answer, false);
  }
}

// ------------------------------------------------------------------------------------------------
// 5. Chat
// ------------------------------------------------------------------------------------------------

async function ask() {
  const question = $("chat-input").value.trim();
  if (!question) return;
  $("chat-input").value = "";
  const log = $("chat-log");
  const reply = element("div", "model", "");
  log.append(element("div", "you", question), reply);
  const messages = [...state.messages, {role: "user", content: question}];
  let answer = "";
  try {
    await stream({ckpt: state.ckpt, messages, settings: state.settings,
                  seed: Number($("seed").value) || 0, max_new_tokens: 200}, (line) => {
      reply.textContent += line.text;
      answer += line.text;
      if (line.done) reply.append(element("div", "hint", `(${line.tokens} tokens, ${line.seconds} s, stopped: ${line.reason})`));
    });
    state.messages = [...messages, {role: "assistant", content: answer}];  // remembered for the next question
  } catch (error) {
    fail(error);
  }
}

function clearChat() {
  state.messages = [];
  $("chat-log").replaceChildren();
}

start().catch(fail);
