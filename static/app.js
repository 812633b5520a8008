// The Cortex chat page: sends the conversation to POST /api/chat and renders the SSE reply as it streams
// (data: {"event": "thinking_chunk"|"answer_chunk"|"error"|"done", "data": ...}).
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), empty: $("empty-state"), form: $("chat-form"), input: $("input"), send: $("send"),
  stop: $("stop"), newChat: $("new-chat"), thinking: $("thinking-toggle"), settingsToggle: $("settings-toggle"),
  settings: $("settings"), temperature: $("temperature"), temperatureValue: $("temperature-value"), topP: $("top-p"),
  topPValue: $("top-p-value"), budgetEnable: $("budget-enable"), budget: $("budget"), budgetValue: $("budget-value"),
  modelName: $("model-name"), modelSize: $("model-size"),
};

const chat = {
  history: [],        // [{role, content[, think]}] of every turn shown; assistant content is the answer only
  follow: true,       // keep the newest text in view: true while the user is at the bottom of the messages
  thinking: true,
  controller: null,   // AbortController of the reply in progress
  session: 0,         // bumped by "New chat", so that a reply still finishing does not enter the new history
};

// --- settings: each slider is paired with a number box; values are clamped, bad input falls back to a default ---

function pairControls(slider, box, fallback) {
  const clamp = (raw) => {
    const value = Number.parseFloat(raw);
    const min = Number(slider.min), max = Number(slider.max);
    return Number.isFinite(value) ? Math.min(max, Math.max(min, value)) : fallback();
  };
  slider.addEventListener("input", () => { box.value = slider.value; });
  box.addEventListener("change", () => { slider.value = box.value = String(clamp(box.value)); });
  return () => clamp(slider.value);
}

const temperature = pairControls(els.temperature, els.temperatureValue, () => 1);
const topP = pairControls(els.topP, els.topPValue, () => 0.95);
const budget = pairControls(els.budget, els.budgetValue, () => 512);

function setThinking(on) {
  chat.thinking = on;
  els.thinking.setAttribute("aria-pressed", String(on));
  els.thinking.title = `Thinking mode (思考模式): ${on ? "on" : "off"}`;
  els.budgetEnable.disabled = !on;
}

els.thinking.addEventListener("click", () => setThinking(!chat.thinking));
els.settingsToggle.addEventListener("click", () => {
  els.settings.hidden = !els.settings.hidden;
  els.settingsToggle.setAttribute("aria-expanded", String(!els.settings.hidden));
});
els.budgetEnable.addEventListener("change", () => {
  els.budget.disabled = els.budgetValue.disabled = !els.budgetEnable.checked;
});

// 603149568 -> "0.6B", 386080 -> "0.4M", 99360 -> "99K"
function shortCount(n) {
  const [unit, suffix] = n >= 1e8 ? [1e9, "B"] : n >= 1e5 ? [1e6, "M"] : [1e3, "K"];
  const value = n / unit;
  return (value < 10 ? value.toFixed(1).replace(/\.0$/, "") : String(Math.round(value))) + suffix;
}

// The served model's name and size; the budget slider's upper end follows its context
fetch("/health").then((r) => r.json()).then((info) => {
  els.modelName.textContent = info.model;
  els.modelSize.textContent = `${shortCount(info.parameters)}-parameter model ` +
    `(${shortCount(info.active_parameters)} active per token)`;
  const max = Math.min(2048, info.max_context);
  const value = String(Math.min(Number(els.budgetValue.value) || 512, max));
  for (const el of [els.budget, els.budgetValue]) { el.max = String(max); el.value = value; }
}).catch(() => { els.modelName.textContent = "(server unreachable)"; });

// --- messages ---

function scrollToEnd() {
  els.messages.scrollTop = els.messages.scrollHeight;
}

// Streaming text follows only while the user is at the bottom: scrolling up stops it, scrolling back down resumes it
els.messages.addEventListener("scroll", () => {
  const { scrollTop, scrollHeight, clientHeight } = els.messages;
  chat.follow = scrollHeight - scrollTop - clientHeight < 24;
});

function addMessage(role) {
  els.empty.hidden = true;
  const row = document.createElement("div");
  row.className = `message ${role}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  row.appendChild(bubble);
  els.messages.appendChild(row);
  return bubble;
}

function addUserMessage(text) {
  const bubble = addMessage("user");
  bubble.textContent = text; // shown exactly as typed, never as markup
  chat.follow = true;
  scrollToEnd();
}

// One assistant reply: a collapsible thinking panel, the answer, a status line. Rendering is batched per frame.
class AssistantView {
  constructor(showThinking) {
    this.bubble = addMessage("assistant");
    this.thinkingText = "";
    this.answerText = "";
    if (showThinking) {
      this.panel = document.createElement("details");
      this.panel.className = "thinking";
      this.panel.open = true;
      this.panel.innerHTML = "<summary>Thinking (思考过程)</summary>";
      this.thinkingEl = document.createElement("div");
      this.thinkingEl.className = "thinking-text pending";
      this.panel.appendChild(this.thinkingEl);
      this.bubble.appendChild(this.panel);
    }
    this.answerEl = document.createElement("div");
    this.answerEl.className = "answer markdown pending";
    this.bubble.appendChild(this.answerEl);
    this.frame = 0;
  }

  addThinking(text) {
    if (!this.thinkingEl) return;
    this.thinkingText += text;
    this.schedule();
  }

  addAnswer(text) {
    if (this.thinkingEl && !this.answerText && this.panel.open) this.panel.open = false; // thought done: fold it away
    this.answerText += text;
    this.schedule();
  }

  schedule() {
    if (!this.frame) this.frame = requestAnimationFrame(() => this.render());
  }

  render() {
    this.frame = 0;
    if (this.thinkingEl) this.thinkingEl.textContent = this.thinkingText;
    this.answerEl.innerHTML = renderMarkdown(this.answerText);
    if (chat.follow) scrollToEnd();
  }

  // note: the status line; ending: why the reply ended ("stop", "length", "stopped"), to explain a missing answer
  finish(note, ending) {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.render();
    this.answerEl.classList.remove("pending");
    if (this.thinkingEl) this.thinkingEl.classList.remove("pending");
    if (ending && !this.answerText.trim()) this.explainNoAnswer(ending);
    if (note) {
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent = note;
      this.bubble.appendChild(meta);
    }
  }

  explainNoAnswer(ending) {
    const thought = this.thinkingText.trim() !== "";
    if (thought) this.panel.open = true;
    const why = { stopped: "Stopped", length: "The reply reached the length limit", stop: "The model ended its reply" };
    const where = thought ? " while thinking, before an answer (its thinking is above)" : " without any text";
    const el = document.createElement("p");
    el.className = "no-answer";
    el.textContent = `${why[ending] || why.stop}${where}.`;
    this.answerEl.replaceChildren(el);
  }

  error(message) {
    this.finish();
    if (this.panel && !this.thinkingText) this.panel.remove(); // nothing was thought: no empty panel above the error
    if (!this.answerText) this.answerEl.remove();
    const el = document.createElement("div");
    el.className = "error";
    el.textContent = message;
    this.bubble.appendChild(el);
  }
}

// --- sending and streaming ---

function parseEvents(buffer, onEvent) {
  // SSE: events end with a blank line; the payload is the data: line(s). Returns the unfinished tail.
  const parts = buffer.split("\n\n");
  const tail = parts.pop();
  for (const part of parts) {
    const data = part.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
    if (data) onEvent(JSON.parse(data));
  }
  return tail;
}

function setBusy(busy) {
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  els.send.disabled = busy || !els.input.value.trim();
}

async function send() {
  const text = els.input.value.trim();
  if (!text || chat.controller) return;
  els.input.value = "";
  autoGrow();
  addUserMessage(text);
  const view = new AssistantView(chat.thinking);
  const body = {
    history: [...chat.history, { role: "user", content: text }],
    thinking: chat.thinking,
    temperature: temperature(),
    top_p: topP(),
    think_budget_enable: chat.thinking && els.budgetEnable.checked,
    think_budget: budget(),
  };
  chat.controller = new AbortController();
  const session = chat.session;
  setBusy(true);
  let failed = false;
  let streaming = false; // the server answered: a failure from here on is the stream's, not the connection's
  try {
    const response = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: chat.controller.signal,
    });
    if (!response.ok) {
      const problem = await response.json().catch(() => ({ data: response.statusText }));
      view.error(problem.data || `request failed (${response.status})`);
      return;
    }
    streaming = true;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let note = "";
    let ending = "stop";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (event) => {
        if (event.event === "thinking_chunk") view.addThinking(event.data);
        else if (event.event === "answer_chunk") view.addAnswer(event.data);
        else if (event.event === "error") { view.error(event.data); failed = true; }
        else if (event.event === "done") {
          const u = event.data.usage;
          ending = event.data.finish_reason;
          const reason = ending === "length" ? " · stopped at the length limit" : "";
          note = `${u.completion_tokens} tokens (${u.completion_tokens_details.reasoning_tokens} thinking)${reason}`;
        }
      });
    }
    if (!failed) view.finish(note, ending);
  } catch (err) {
    if (err.name === "AbortError") view.finish("stopped", "stopped");
    else if (streaming) view.error(`The reply stream broke off or was malformed: ${err.message}`);
    else view.error("Could not reach the Cortex server (连接到AI服务器时出错)");
  } finally {
    chat.controller = null;
    setBusy(false);
    // Every turn on the page is history, answered or not. A reply with no answer keeps its thinking, so that the
    // model sees what it thought (past answers alone are sent without theirs, to save the context).
    if (session === chat.session) {
      const reply = { role: "assistant", content: view.answerText };
      if (!view.answerText.trim() && view.thinkingText.trim()) reply.think = view.thinkingText;
      chat.history.push({ role: "user", content: text }, reply);
    }
  }
}

function stop() {
  if (chat.controller) chat.controller.abort();
}

function newChat() {
  stop();
  chat.session += 1;
  chat.history = [];
  for (const el of [...els.messages.querySelectorAll(".message")]) el.remove();
  els.empty.hidden = false;
  els.input.focus();
}

function autoGrow() {
  els.input.style.height = "auto";
  els.input.style.height = `${Math.min(els.input.scrollHeight, 200)}px`;
  els.send.disabled = !els.input.value.trim() || Boolean(chat.controller);
}

els.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
els.input.addEventListener("input", autoGrow);
els.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
els.stop.addEventListener("click", stop);
els.newChat.addEventListener("click", newChat);
els.messages.addEventListener("click", (e) => {
  if (!e.target.classList.contains("copy-code")) return;
  const code = e.target.closest(".code-block").querySelector("code").textContent;
  navigator.clipboard.writeText(code).then(() => { e.target.textContent = "Copied"; }).catch(() => {});
});
setThinking(true);
