// The chat page: conversation list, message list, composer and the websocket
// protocol of chat/PROTOCOL.md. Plain ES modules, no build step.

import { Attachments, imagesElement } from "./attachments.js";
import { copyText } from "./markdown.js";
import { setupShortcuts } from "./shortcuts.js";
import { SettingsPanel } from "./settings.js";
import { Sidebar } from "./sidebar.js";
import { ChatSocket } from "./socket.js";
import { addVersions, dropBranchOf, focusSwitched } from "./versions.js";
import {
  answerElement,
  editorElement,
  formatNumber,
  updateAnswer,
  userMessageElement,
} from "./view.js";

const config = JSON.parse(document.getElementById("chat-config").textContent);
const $ = (id) => document.getElementById(id);
const ui = {
  chat: $("chat"),
  messages: $("messages"),
  empty: $("empty-state"),
  input: $("input"),
  composer: $("composer"),
  send: $("send"),
  stop: $("stop"),
  model: $("model"),
  title: $("conversation-title"),
  banner: $("banner"),
  status: $("status"),
  gauge: $("gauge"),
  budget: $("budget"),
  rateLimit: $("rate-limit"),
  charCount: $("char-count"),
  openSidebar: $("open-sidebar"),
  closeSidebar: $("close-sidebar"),
  scrim: $("scrim"),
  newChat: $("new-chat"),
};

const state = {
  conversationId: config.conversation_id,
  conversation: null,
  messages: [],
  // The answer streaming in the shown conversation:
  // {conversationId, userMessageId, seq, text, meta, waiting, element};
  // `waiting` is the server's status line while no text flows, else null.
  live: null,
  pendingSend: null,
  // The last edit sent: {id, content}, reopened in its editor if refused.
  pendingEdit: null,
  // A send pressed while the socket was not open yet: sent once it opens.
  queuedFrame: null,
  renderQueued: false,
  retryTimer: null,
  budget: config.budget,
  // Older messages the server still has for this conversation ("history").
  more: false,
  loadingHistory: false,
  // The beginnings of texts too long for one frame, by conversation and
  // message id ("start" for the answer so far), waiting for their frame.
  chunks: new Map(),
  // The version asked for with "switch": {id, step}, focused once shown.
  pendingSwitch: null,
};

const socket = new ChatSocket(config.socket_path);
const settingsPanel = new SettingsPanel({
  config,
  modelSelect: ui.model,
  send: (frame) => sendFrame(frame),
  conversationId: () => state.conversationId,
  announce: (text) => announce(text),
});
const sidebar = new Sidebar({
  url: config.urls.conversations,
  exportUrl: config.urls.export,
  onOpen: (id) => openConversation(id, { push: true }),
  onDeleted: (id) => {
    if (id === state.conversationId) newChat({ push: true });
  },
  onRenamed: (conversation) => {
    if (conversation.id === state.conversationId) setTitle(conversation.title);
  },
  onError: (message) => showBanner(message),
});
// Images waiting in the composer (attachments.js); set up once the page is.
let images = null;

// --- Small helpers -------------------------------------------------------------

function announce(text) {
  ui.status.textContent = "";
  // A change after a tick makes screen readers read the same text twice.
  setTimeout(() => (ui.status.textContent = text), 50);
}

let bannerTimer = null;
function showBanner(text, { sticky = false } = {}) {
  ui.banner.textContent = text;
  ui.banner.hidden = false;
  clearTimeout(bannerTimer);
  if (!sticky) bannerTimer = setTimeout(hideBanner, 8000);
}

function hideBanner() {
  ui.banner.hidden = true;
  ui.banner.textContent = "";
}

function setTitle(title) {
  ui.title.textContent = title || "New chat";
  document.title = `${title || "New chat"} · llmsite`;
}

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 120;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function isStreamingHere() {
  return state.live !== null && state.live.conversationId === state.conversationId;
}

function updateControls() {
  const streaming = isStreamingHere();
  ui.stop.hidden = !streaming;
  ui.send.hidden = streaming;
  // A blank message is never sent: Send stays disabled until there is text.
  const blank = !ui.input.value.trim();
  const imagesWait = images ? images.blocker() : "";
  ui.send.disabled = !ui.model.value || state.pendingSend !== null || blank || imagesWait !== "";
  ui.send.title = blank ? "Type a message to send" : imagesWait;
  const length = ui.input.value.length;
  const max = config.max_message_chars;
  ui.charCount.textContent =
    length > max * 0.8 ? `${formatNumber(length)} / ${formatNumber(max)} characters` : "";
  ui.charCount.classList.toggle("error", length > max);
}

function autoGrow() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

// --- Budget and context gauge -------------------------------------------------------

function showBudget(budget) {
  if (!budget) return;
  if (budget.remaining === null || budget.remaining === undefined) {
    ui.budget.textContent =
      budget.used_today !== undefined
        ? `${formatNumber(budget.used_today)} tokens used today · no budget limit`
        : "No budget limit";
    ui.budget.classList.remove("warning");
    return;
  }
  const resets = budget.resets_at
    ? ` (resets ${new Date(budget.resets_at).toISOString().slice(11, 16)} UTC)`
    : "";
  ui.budget.textContent = `${formatNumber(budget.remaining)} tokens left${
    budget.period === "daily" || !budget.period ? " today" : ` this ${budget.period.replace("ly", "")}`
  }${resets}`;
  ui.budget.classList.toggle("warning", budget.limit && budget.remaining < budget.limit * 0.2);
}

function applyBudget(frame) {
  // The page's budget is read once; each answer says what is left after it.
  if (!("budget_remaining" in frame)) return;
  const budget = { ...state.budget, remaining: frame.budget_remaining };
  if (frame.usage && budget.used_today !== undefined) {
    budget.used_today += frame.usage.prompt_tokens + frame.usage.completion_tokens;
  }
  state.budget = budget;
  showBudget(budget);
}

// A per-minute limit shows only once it is near: a note to slow down, not a meter.
function nearLimit(states, kind) {
  const near = (states || []).filter(
    (s) => s.kind === kind && (s.remaining <= 2 || s.remaining <= s.limit * 0.2),
  );
  return near.length ? near.reduce((a, b) => (b.remaining < a.remaining ? b : a)) : null;
}

function showRateLimits(states) {
  const requests = nearLimit(states, "requests");
  const tokens = nearLimit(states, "tokens");
  const parts = [];
  if (requests) {
    const noun = requests.remaining === 1 ? "request" : "requests";
    parts.push(`${formatNumber(requests.remaining)} ${noun} left this minute`);
  }
  if (tokens) parts.push(`${formatNumber(tokens.remaining)} tokens left this minute`);
  ui.rateLimit.textContent = parts.join(" · ");
  ui.rateLimit.hidden = parts.length === 0;
}

function applyRateLimits(frame) {
  if (Array.isArray(frame.rate_limits)) showRateLimits(frame.rate_limits);
}

function showContext(status) {
  if (!status) {
    ui.gauge.hidden = true;
    return;
  }
  const percent = Math.min(100, Math.round(status.percent));
  const shown = status.percent > 0 && status.percent < 1 ? "<1" : String(percent);
  ui.gauge.hidden = false;
  const track = ui.gauge.querySelector(".gauge-track");
  track.setAttribute("aria-valuenow", String(percent));
  ui.gauge.querySelector(".gauge-bar").style.width = `${percent}%`;
  ui.gauge.classList.toggle("warning", Boolean(status.warning));
  let text = `Context: ${formatNumber(status.tokens)} of ${formatNumber(status.limit)} tokens (${shown} %)`;
  if (status.warning) text += " — nearly full";
  if (status.dropped_count) {
    text += ` · ${status.dropped_count} older message${status.dropped_count === 1 ? "" : "s"} left out`;
  }
  ui.gauge.querySelector(".gauge-text").textContent = text;
  const dropped = new Set(status.dropped_ids || []);
  for (const article of ui.messages.querySelectorAll("article[data-id]")) {
    article.classList.toggle("out-of-context", dropped.has(Number(article.dataset.id)));
  }
}

function latestContext() {
  for (let i = state.messages.length - 1; i >= 0; i--) {
    const meta = state.messages[i].meta;
    if (meta && meta.context) return meta.context;
  }
  return null;
}

// --- Drawing the conversation ---------------------------------------------------------

function messageElement(message) {
  const article = message.role === "user" ? userMessageElement(message) : answerElement(message);
  if (message.role === "user" && message.attachments && message.attachments.length) {
    article.querySelector(".bubble").after(imagesElement(message.attachments));
  }
  addVersions(article, message, { disabled: isStreamingHere() });
  return article;
}

function earlierButton() {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "load-earlier";
  button.textContent = state.loadingHistory ? "Loading…" : "Load earlier messages";
  button.disabled = state.loadingHistory;
  button.addEventListener("click", requestHistory);
  return button;
}

function requestHistory() {
  const first = state.messages[0];
  if (!state.more || state.loadingHistory || !first || !state.conversationId) return;
  if (socket.send({ type: "history", conversation_id: state.conversationId, before: first.id })) {
    state.loadingHistory = true;
  }
}

function renderConversation({ keepScroll = false } = {}) {
  // Older messages go in above: keep what the reader looks at where it is.
  const fromBottom = ui.messages.scrollHeight - ui.messages.scrollTop;
  for (const node of [...ui.messages.children]) if (node !== ui.empty) node.remove();
  for (const message of state.messages) {
    if (message.role === "system") continue;
    ui.messages.append(messageElement(message));
  }
  if (isStreamingHere()) {
    state.live.element = answerElement(liveMessage(), { live: true });
    ui.messages.append(state.live.element);
  }
  ui.empty.hidden = ui.messages.children.length > 1;
  if (state.more) ui.messages.prepend(earlierButton());
  showContext(isStreamingHere() && state.live.meta.context ? state.live.meta.context : latestContext());
  markRetryCountdown();
  updateControls();
  if (keepScroll) ui.messages.scrollTop = ui.messages.scrollHeight - fromBottom;
  else scrollToBottom();
}

function queueLiveRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(() => {
    state.renderQueued = false;
    if (!isStreamingHere() || !state.live.element) return;
    const stick = nearBottom();
    updateAnswer(state.live.element, liveMessage(), { live: true, textOnly: true });
    if (stick) scrollToBottom();
  });
}

function liveMessage() {
  const live = state.live;
  return { content: live.text, meta: live.meta, waiting: live.waiting };
}

function redrawLive() {
  if (!isStreamingHere() || !state.live.element) return;
  updateAnswer(state.live.element, liveMessage(), { live: true });
}

function markRetryCountdown() {
  clearInterval(state.retryTimer);
  const last = state.messages[state.messages.length - 1];
  const error = last && last.meta && last.meta.error;
  if (!error || !error.retry_after || isStreamingHere()) return;
  // A budget refusal waits for the period to reset, unless the budget has
  // room again (raised since): the page's budget says so.
  const budget = state.budget;
  if (error.code === "budget_exhausted" && budget && budget.remaining !== 0) return;
  const article = ui.messages.querySelector(`article[data-id="${last.id}"]`);
  const button = article && article.querySelector(".regenerate");
  if (!button) return;
  const until = new Date(last.created_at).getTime() + error.retry_after * 1000;
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    if (left > 0) {
      button.textContent = `Retry in ${left} s`;
    } else {
      button.textContent = "Retry";
      clearInterval(state.retryTimer);
    }
  };
  tick();
  state.retryTimer = setInterval(tick, 1000);
}

// --- Navigation -----------------------------------------------------------------

function openConversation(id, { push = false } = {}) {
  closeSidebar();
  if (push) history.pushState({ id }, "", `/chat/c/${id}/`);
  if (state.conversationId !== id) {
    state.messages = [];
    state.more = false;
    if (state.live && state.live.conversationId !== id) state.live.element = null;
  }
  state.conversationId = id;
  sidebar.select(id);
  renderConversation();
  ui.messages.setAttribute("aria-busy", "true");
  socket.send({ type: "open", conversation_id: id });
}

function newChat({ push = false } = {}) {
  closeSidebar();
  if (push) history.pushState({ id: null }, "", config.urls.page);
  state.conversationId = null;
  state.conversation = null;
  state.messages = [];
  sidebar.select(null);
  settingsPanel.reset();
  setTitle("");
  renderConversation();
  ui.input.focus();
}

function openSidebar() {
  ui.chat.classList.add("sidebar-open");
  ui.scrim.hidden = false;
  ui.openSidebar.setAttribute("aria-expanded", "true");
  document.getElementById("search").focus();
}

function closeSidebar() {
  if (!ui.chat.classList.contains("sidebar-open")) return;
  ui.chat.classList.remove("sidebar-open");
  ui.scrim.hidden = true;
  ui.openSidebar.setAttribute("aria-expanded", "false");
}

// --- Sending --------------------------------------------------------------------

function sendFrame(frame) {
  if (socket.send(frame)) return true;
  showBanner("Not connected to the server; reconnecting. Your text is still here.");
  return false;
}

function submit() {
  const content = ui.input.value;
  if (!content.trim() || isStreamingHere() || state.pendingSend !== null) return;
  if (content.length > config.max_message_chars) {
    showBanner(
      `Your message is ${formatNumber(content.length)} characters long; the limit is ${formatNumber(config.max_message_chars)}.`,
    );
    return;
  }
  if (images.blocker()) {
    showBanner(images.blocker());
    return;
  }
  const frame = {
    type: "send",
    conversation_id: state.conversationId,
    content,
    model: ui.model.value,
  };
  if (images.ids().length) frame.attachments = images.ids();
  if (!state.conversationId) frame.settings = settingsPanel.forNewChat();
  if (!socket.connected) {
    // Right after the page loads, or while reconnecting: send it on open.
    state.queuedFrame = frame;
    state.pendingSend = content;
    showBanner("Connecting… your message will be sent as soon as the connection is up.");
    updateControls();
    return;
  }
  if (sendFrame(frame)) {
    state.pendingSend = content;
    updateControls();
  }
}

function stop() {
  if (isStreamingHere()) sendFrame({ type: "stop", conversation_id: state.conversationId });
}

function regenerate() {
  if (isStreamingHere() || !state.conversationId) return;
  sendFrame({ type: "regenerate", conversation_id: state.conversationId, model: ui.model.value });
}

function switchVersion(button) {
  if (isStreamingHere() || !state.conversationId) return;
  const id = Number(button.dataset.target);
  if (socket.send({ type: "switch", conversation_id: state.conversationId, message_id: id })) {
    state.pendingSwitch = { id, step: button.dataset.step };
  }
}

function startEdit(article) {
  const id = Number(article.dataset.id);
  const message = state.messages.find((m) => m.id === id);
  if (!message || article.querySelector(".editor")) return;
  const bubble = article.querySelector(".bubble");
  const editor = editorElement(message.content);
  bubble.hidden = true;
  article.querySelector(".msg-actions").hidden = true;
  article.insertBefore(editor, bubble);
  const area = editor.querySelector("textarea");
  area.focus();
  const close = () => {
    editor.remove();
    bubble.hidden = false;
    article.querySelector(".msg-actions").hidden = false;
  };
  editor.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!area.value.trim() || isStreamingHere()) return;
    if (sendFrame({ type: "edit", message_id: id, content: area.value, model: ui.model.value })) {
      state.pendingEdit = { id, content: area.value };
      close();
    }
  });
  editor.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      close();
    } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      editor.requestSubmit();
    }
  });
  editor.querySelector('[data-action="cancel-edit"]').addEventListener("click", close);
}

// --- Frames from the server -----------------------------------------------------------

const handlers = {
  opened(frame) {
    if (frame.conversation.id !== state.conversationId) return;
    ui.messages.removeAttribute("aria-busy");
    state.conversation = frame.conversation;
    state.messages = frame.messages;
    state.more = frame.more;
    state.loadingHistory = false;
    if (state.live && state.live.conversationId === state.conversationId) state.live = null;
    setTitle(frame.conversation.title);
    if (config.models.includes(frame.conversation.model)) ui.model.value = frame.conversation.model;
    settingsPanel.showConversation(frame.conversation);
    sidebar.upsert(frame.conversation, { place: "keep" });
    renderConversation();
    focusSwitched(ui.messages, state.pendingSwitch);
    state.pendingSwitch = null;
  },

  history(frame) {
    if (frame.conversation_id !== state.conversationId) return;
    state.loadingHistory = false;
    const known = new Set(state.messages.map((m) => m.id));
    state.messages = [...frame.messages.filter((m) => !known.has(m.id)), ...state.messages];
    state.more = frame.more;
    renderConversation({ keepScroll: true });
  },

  chunk(frame) {
    const key = chunkKey(frame.conversation_id, frame.message_id);
    state.chunks.set(key, (state.chunks.get(key) || "") + frame.text);
  },

  start(frame) {
    const id = frame.conversation_id;
    state.pendingEdit = null;
    sidebar.upsert(frame.conversation);
    sidebar.setRunning(id, true);
    const mine = state.pendingSend !== null && state.conversationId === null;
    if (mine) {
      state.conversationId = id;
      history.replaceState({ id }, "", `/chat/c/${id}/`);
      sidebar.select(id);
    }
    if (state.pendingSend !== null && (mine || id === state.conversationId)) {
      state.pendingSend = null;
      ui.input.value = "";
      images.clear();
      autoGrow();
      updateControls();
    }
    if (id !== state.conversationId) return;
    state.conversation = frame.conversation;
    setTitle(frame.conversation.title);
    // Everything after the question being answered is replaced by this answer.
    const question = frame.user_message;
    const index = state.messages.findIndex((m) => m.id === question.id);
    if (index >= 0) state.messages.splice(index, state.messages.length - index, question);
    else {
      dropBranchOf(state.messages, question);
      state.messages.push(question);
    }
    state.live = {
      conversationId: id,
      userMessageId: question.id,
      seq: frame.seq,
      text: frame.text,
      meta: { endpoint: frame.endpoint, context: frame.context, hops: frame.hops, cached: frame.cached },
      // Joining mid-wait (a reload, a second tab): the line shown right now.
      waiting: frame.status ? frame.status.text : null,
      element: null,
    };
    renderConversation();
    announce("Writing an answer…");
  },

  delta(frame) {
    const live = state.live;
    if (!live || live.conversationId !== frame.conversation_id) return;
    if (frame.seq <= live.seq) return;
    if (frame.seq !== live.seq + 1) {
      // A frame went missing: ask for the answer so far again.
      socket.send({ type: "open", conversation_id: frame.conversation_id });
      return;
    }
    live.seq = frame.seq;
    live.text += frame.text;
    if (live.waiting !== null) {
      // Text flows again (after a mid-answer failover): the line goes.
      live.waiting = null;
      redrawLive();
    }
    queueLiveRender();
  },

  context(frame) {
    const live = state.live;
    if (!live || live.conversationId !== frame.conversation_id) return;
    live.meta.endpoint = frame.endpoint;
    live.meta.cached = frame.cached;
    live.meta.context = frame.status;
    // An endpoint answers: its first text follows at once.
    live.waiting = null;
    showContext(frame.status);
    redrawLive();
  },

  status(frame) {
    const live = state.live;
    if (!live || live.conversationId !== frame.conversation_id) return;
    live.waiting = frame.text;
    redrawLive();
  },

  fallback(frame) {
    const live = state.live;
    if (!live || live.conversationId !== frame.conversation_id) return;
    live.meta.hops = [...(live.meta.hops || []), frame];
    redrawLive();
  },

  done(frame) {
    finishAnswer(frame);
    applyBudget(frame);
    applyRateLimits(frame);
    announce(frame.stopped ? "Answer stopped." : "Answer finished.");
  },

  error(frame) {
    applyRateLimits(frame);
    if (frame.conversation_id && frame.answer !== undefined) {
      // The end of an answer that failed: it is stored with its error.
      finishAnswer(frame);
      applyBudget(frame);
      announce(frame.message);
      return;
    }
    if (frame.request === "send" || frame.code === "busy") state.pendingSend = null;
    if (frame.request === "switch") state.pendingSwitch = null;
    if (frame.request === "settings") settingsPanel.failed(frame);
    if (frame.refused) restoreRefused(frame);
    if (frame.request === "history") {
      state.loadingHistory = false;
      if (frame.code === "not_found") state.more = false;
    }
    if (frame.request === "open" && frame.code === "not_found") {
      newChat({ push: true });
    }
    showBanner(frame.message);
    announce(frame.message);
    updateControls();
  },

  refresh(frame) {
    if (frame.conversation_id === state.conversationId) {
      socket.send({ type: "open", conversation_id: frame.conversation_id });
    }
  },

  settings(frame) {
    settingsPanel.saved(frame);
  },

  pong() {},
};

// Nothing was stored for a refused send, regenerate or edit: give the text
// back where it was typed, with the reason in the banner.
function restoreRefused(frame) {
  if (frame.request === "send") {
    ui.input.focus();
    autoGrow();
  } else if (frame.request === "edit" && state.pendingEdit) {
    const { id, content } = state.pendingEdit;
    const article = ui.messages.querySelector(`article.msg-user[data-id="${id}"]`);
    if (article) {
      startEdit(article);
      const area = article.querySelector(".editor textarea");
      if (area) area.value = content;
    }
  }
  state.pendingEdit = null;
}

function finishAnswer(frame) {
  const id = frame.conversation_id;
  sidebar.setRunning(id, false);
  if (frame.answer && frame.answer.id && id === state.conversationId) {
    const live = state.live;
    const questionId = live ? live.userMessageId : null;
    if (questionId !== null) {
      const index = state.messages.findIndex((m) => m.id === questionId);
      if (index >= 0) state.messages.splice(index + 1);
    }
    if (!state.messages.some((m) => m.id === frame.answer.id)) state.messages.push(frame.answer);
  }
  if (state.live && state.live.conversationId === id) state.live = null;
  if (id === state.conversationId) renderConversation();
  if (!frame.answer && frame.type === "error") showBanner(frame.message);
}

function chunkKey(conversationId, messageId) {
  return `${conversationId}:${messageId == null ? "start" : messageId}`;
}

/** The text a frame carries, with the chunks sent before it put in front. */
function withChunks(conversationId, messageId, text) {
  const key = chunkKey(conversationId, messageId);
  const head = state.chunks.get(key);
  if (head === undefined) return text;
  state.chunks.delete(key);
  return head + (text || "");
}

function absorbChunks(frame) {
  const id = frame.conversation_id;
  if (frame.type === "start") frame.text = withChunks(id, null, frame.text);
  for (const message of frame.messages || []) {
    message.content = withChunks(id, message.id, message.content);
  }
  if (frame.answer && frame.answer.id) {
    frame.answer.content = withChunks(id, frame.answer.id, frame.answer.content);
  }
}

socket.addEventListener("frame", (event) => {
  const frame = event.detail;
  if (frame.type !== "chunk") absorbChunks(frame);
  const handler = handlers[frame.type];
  if (handler) handler(frame);
});

socket.addEventListener("open", () => {
  hideBanner();
  // Chunks of a frame the old connection never finished are of no use.
  state.chunks.clear();
  state.loadingHistory = false;
  if (state.conversationId) {
    socket.send({ type: "open", conversation_id: state.conversationId });
  }
  if (state.queuedFrame !== null) {
    socket.send(state.queuedFrame);
    state.queuedFrame = null;
  }
  updateControls();
});

socket.addEventListener("close", async (event) => {
  const { wasOpen, retryIn } = event.detail;
  // A queued message waits for the next connection; a sent one is answered
  // (or resumed) through "open" after reconnecting.
  if (state.queuedFrame === null) state.pendingSend = null;
  updateControls();
  if (wasOpen) {
    showBanner("Connection lost; reconnecting…", { sticky: true });
    return;
  }
  // A refused handshake looks like any failed connection: check the session.
  try {
    const response = await fetch(config.urls.conversations, { credentials: "same-origin" });
    if (response.status === 401) {
      location.assign(`/accounts/login/?next=${encodeURIComponent(location.pathname)}`);
      return;
    }
  } catch {
    // The server is unreachable; the banner says so.
  }
  showBanner(`Can't reach the chat server; retrying in ${Math.ceil(retryIn / 1000)} s.`, {
    sticky: true,
  });
});

// --- Wiring -------------------------------------------------------------------

function setupModels() {
  ui.model.replaceChildren();
  for (const name of config.models) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    ui.model.append(option);
  }
  if (config.models.length === 0) {
    const option = document.createElement("option");
    option.textContent = "No models configured";
    option.value = "";
    option.disabled = true;
    ui.model.append(option);
    showBanner("No model is configured yet. An administrator can add one in the admin.", {
      sticky: true,
    });
  } else {
    ui.model.value = config.default_model;
  }
  settingsPanel.labelModels();
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
ui.input.addEventListener("input", () => {
  autoGrow();
  updateControls();
});

ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", () => newChat({ push: true }));
ui.openSidebar.addEventListener("click", openSidebar);
ui.closeSidebar.addEventListener("click", closeSidebar);
ui.scrim.addEventListener("click", closeSidebar);

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    if (ui.chat.classList.contains("sidebar-open")) closeSidebar();
    else if (isStreamingHere()) stop();
  }
});

setupShortcuts({
  newChat: () => newChat({ push: true }),
  search: () => {
    if (getComputedStyle(ui.openSidebar).display !== "none") openSidebar();
    $("search").focus();
    $("search").select();
  },
  helpButton: $("shortcuts-help"),
  newChatButton: ui.newChat,
  searchInput: $("search"),
});

// Scrolling up to the top loads the earlier messages, like the button does.
ui.messages.addEventListener("scroll", () => {
  if (ui.messages.scrollTop < 80) requestHistory();
});

ui.messages.addEventListener("click", async (event) => {
  const target = event.target.closest("button[data-action]");
  if (!target) return;
  const article = target.closest("article");
  const action = target.dataset.action;
  if (action === "regenerate") regenerate();
  else if (action === "edit") startEdit(article);
  else if (action === "version") switchVersion(target);
  else if (action === "copy") {
    const message = state.messages.find((m) => m.id === Number(article.dataset.id));
    const ok = message && (await copyText(message.content));
    target.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => (target.textContent = "Copy"), 1500);
  }
});

window.addEventListener("popstate", () => {
  const match = location.pathname.match(/\/chat\/c\/([0-9a-f-]{36})\//);
  if (match) openConversation(match[1]);
  else newChat();
});

setupModels();
images = new Attachments({
  config,
  composer: ui.composer,
  input: ui.input,
  model: ui.model,
  before: ui.send,
  announce: (text, error = false) => {
    announce(text);
    if (error) showBanner(text);
  },
  onChange: updateControls,
});
images.markModels();
showBudget(config.budget);
showRateLimits(config.rate_limits);
setTitle("");
if (state.conversationId) {
  sidebar.select(state.conversationId);
  ui.messages.setAttribute("aria-busy", "true");
}
renderConversation();
sidebar.load();
socket.connect();
ui.input.focus();

// For the browser tests and for debugging from the console.
window.llmsiteChat = { socket, state };
