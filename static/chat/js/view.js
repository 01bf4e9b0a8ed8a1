// Building message elements: bubbles, per-answer footers, fallback notices,
// errors. Model text only ever reaches the page through renderMarkdown().

import { renderMarkdown } from "./markdown.js";

const numbers = new Intl.NumberFormat();

export const formatNumber = (n) => numbers.format(n);

export function formatMs(ms) {
  if (ms === null || ms === undefined) return "";
  return ms >= 1000 ? `${(ms / 1000).toFixed(ms >= 10000 ? 0 : 1)} s` : `${Math.round(ms)} ms`;
}

const REASONS = {
  server_error: "a server error",
  timeout: "a timeout",
  connection_error: "a connection error",
  rate_limited: "its rate limit",
  rate_limited_locally: "its configured rate limit",
  malformed_response: "a malformed response",
  endpoint_rejected: "a refusal",
  circuit_open: "recent failures (circuit open)",
  circuit_half_open: "recent failures (being re-tested)",
  context_window_exceeded: "a context window too small for this conversation",
};

/** One sentence saying which endpoint was left and why. */
export function hopSentence(hop) {
  const why = REASONS[hop.reason] || String(hop.reason || "an error").replace(/_/g, " ");
  const status = hop.status_code ? ` (HTTP ${hop.status_code})` : "";
  const when = hop.mid_stream ? " mid-answer" : "";
  const to = hop.to ? `; moved on to ${hop.to}` : "";
  return `Fallback: ${hop.from} failed${when} with ${why}${status}${to}.`;
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function button(label, action, extra = {}) {
  const b = element("button", `btn btn-quiet ${extra.className || ""}`.trim(), label);
  b.type = "button";
  b.dataset.action = action;
  if (extra.ariaLabel) b.setAttribute("aria-label", extra.ariaLabel);
  return b;
}

const STOPPED = {
  disconnect: "stopped (connection lost)",
  shutdown: "stopped (the server restarted)",
};

/** The footer under an answer: endpoint, tokens, latency, time to first token. */
export function footerText(meta) {
  if (!meta) return "";
  const parts = [];
  if (meta.cached) parts.push("cached answer (every endpoint was down)");
  else if (meta.endpoint) parts.push(`via ${meta.endpoint}`);
  const usage = meta.usage;
  if (usage) {
    const approx = usage.estimated ? "≈" : "";
    parts.push(
      `${approx}${formatNumber(usage.prompt_tokens)} in · ${approx}${formatNumber(usage.completion_tokens)} out`,
    );
  }
  if (meta.latency_ms) parts.push(formatMs(meta.latency_ms));
  if (meta.ttft_ms) parts.push(`first token ${formatMs(meta.ttft_ms)}`);
  if (meta.stopped) parts.push(STOPPED[meta.stop_reason] || "stopped");
  return parts.join(" · ");
}

export function userMessageElement(message) {
  const article = element("article", "msg msg-user");
  article.dataset.id = message.id;
  const label = element("h2", "visually-hidden", "You said:");
  const bubble = element("div", "bubble plain", message.content);
  const actions = element("div", "msg-actions");
  actions.append(button("Edit", "edit", { ariaLabel: "Edit and resend this message" }));
  article.append(label, bubble, actions);
  return article;
}

/** An answer element; `live` is true while it streams. */
export function answerElement(message, { live = false } = {}) {
  const article = element("article", "msg msg-assistant");
  if (message.id) article.dataset.id = message.id;
  article.dataset.status = live ? "streaming" : message.status;
  article.append(element("h2", "visually-hidden", "Answer:"));
  const bubble = element("div", "bubble markdown");
  article.append(bubble);
  // What the server is doing while no text flows (a failover, a retry's wait).
  // A polite live region from the start, so each new line is read out.
  const waiting = element("p", "msg-waiting");
  waiting.setAttribute("aria-live", "polite");
  article.append(waiting);
  article.append(element("div", "msg-notices"));
  article.append(element("div", "msg-error"));
  article.append(element("p", "msg-footer muted"));
  article.append(element("div", "msg-actions"));
  updateAnswer(article, message, { live });
  return article;
}

// Elements whose last child the text being written continues in.
const CONTINUED = new Set([
  "P", "UL", "OL", "LI", "BLOCKQUOTE", "PRE", "CODE", "DIV", "TABLE", "THEAD", "TBODY",
  "TR", "TD", "TH", "H1", "H2", "H3", "H4", "H5", "H6",
]);

function lastNode(node) {
  let last = node.lastChild;
  while (last && last.nodeType === Node.TEXT_NODE && !last.textContent.trim()) {
    last = last.previousSibling;
  }
  return last;
}

/**
 * Where the streaming cursor goes: at the end of the text, inside the last
 * paragraph, list item, table cell or code block, so it sits inline after
 * the last character rather than on a line of its own.
 */
export function cursorHost(bubble) {
  let host = bubble;
  for (;;) {
    const last = lastNode(host);
    if (!last || last.nodeType !== Node.ELEMENT_NODE || !CONTINUED.has(last.tagName)) return host;
    host = last;
  }
}

/**
 * Redraw an answer element from a message (or the live state of one).
 *
 * `message.waiting` is the status line of a live answer waiting for text;
 * it is server-built but set as text, never as markup.
 */
export function updateAnswer(article, message, { live = false, textOnly = false } = {}) {
  const bubble = article.querySelector(".bubble");
  const waiting = (live && message.waiting) || "";
  renderMarkdown(bubble, message.content, { final: !live });
  // The status line stands in for the cursor until text flows again.
  if (live && !waiting) cursorHost(bubble).append(element("span", "cursor"));
  const line = article.querySelector(".msg-waiting");
  if (line.textContent !== waiting) line.textContent = waiting;
  article.classList.toggle("waiting", Boolean(waiting));
  // Not busy while waiting: a busy region's live changes may go unread.
  article.setAttribute("aria-busy", live && !waiting ? "true" : "false");
  if (textOnly) return;
  const meta = message.meta || {};
  article.dataset.status = live ? "streaming" : message.status;

  const notices = article.querySelector(".msg-notices");
  notices.replaceChildren(
    ...(meta.hops || []).map((hop) => element("p", "notice", hopSentence(hop))),
  );
  if (meta.context && meta.context.dropped_count) {
    const n = meta.context.dropped_count;
    notices.append(
      element(
        "p",
        "notice notice-quiet",
        `${n} older message${n === 1 ? " was" : "s were"} left out to fit the context window.`,
      ),
    );
  }

  // Its web process stopped (a crash, a restart) before it was finished.
  const interrupted = !live && message.status === "interrupted";
  const error = article.querySelector(".msg-error");
  error.replaceChildren();
  error.removeAttribute("role");
  if (interrupted) {
    error.append(
      element("strong", "", "Interrupted. "),
      element("span", "", "The server stopped before this answer was finished; retry to ask again."),
    );
  } else if (meta.error && !live) {
    error.setAttribute("role", "alert");
    error.append(element("span", "", meta.error.message));
  }

  const footer = article.querySelector(".msg-footer");
  if (waiting) footer.textContent = "";
  else if (live) footer.textContent = meta.endpoint ? `writing · via ${meta.endpoint}` : "writing…";
  else footer.textContent = footerText(meta);

  const actions = article.querySelector(".msg-actions");
  actions.replaceChildren();
  if (!live) {
    if (message.content) actions.append(button("Copy", "copy", { ariaLabel: "Copy this answer" }));
    const retry = Boolean(meta.error) || interrupted;
    actions.append(
      button(retry ? "Retry" : "Regenerate", "regenerate", {
        className: "regenerate",
        ariaLabel: retry ? "Try this question again" : "Write this answer again",
      }),
    );
  }
}

/** The editor that replaces a user message while it is being edited. */
export function editorElement(content) {
  const form = element("form", "editor");
  const label = element("label", "visually-hidden", "Edit your message");
  const area = element("textarea", "input editor-input");
  area.value = content;
  area.rows = Math.min(12, Math.max(2, content.split("\n").length));
  label.htmlFor = area.id = `edit-${Date.now()}`;
  const save = element("button", "btn btn-primary", "Save and send");
  save.type = "submit";
  const cancel = button("Cancel", "cancel-edit");
  const row = element("div", "editor-actions");
  row.append(save, cancel);
  form.append(label, area, row);
  return form;
}
