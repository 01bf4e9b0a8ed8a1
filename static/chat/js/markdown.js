// Markdown for model output: parsed by marked, sanitized by DOMPurify,
// highlighted by highlight.js. Model text is untrusted: raw HTML in it is shown
// as text, images become links (no request leaves the page on their behalf),
// and whatever HTML remains is filtered to a short list of tags.

import { Marked } from "../../vendor/marked/marked.esm.js";
import DOMPurify from "../../vendor/dompurify/purify.es.mjs";
import hljs from "../../vendor/highlightjs/highlight.min.js";

const escapeHtml = (text) =>
  String(text)
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&#39;");

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    html({ text, block }) {
      return block ? `<p>${escapeHtml(text)}</p>` : escapeHtml(text);
    },
    image({ href, text }) {
      const label = text ? `image: ${text}` : "image";
      return `<a href="${escapeHtml(href || "")}">[${escapeHtml(label)}]</a>`;
    },
    checkbox({ checked }) {
      return checked ? "☑ " : "☐ ";
    },
    code({ text, lang }) {
      const language = (lang || "").trim().split(/\s+/)[0].replace(/[^\w+#.-]/g, "");
      const cls = language ? ` class="language-${escapeHtml(language)}"` : "";
      return `<pre><code${cls}>${escapeHtml(text)}</code></pre>\n`;
    },
  },
});

const PURIFY = {
  ALLOWED_TAGS: [
    "a", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4",
    "h5", "h6", "hr", "i", "kbd", "li", "ol", "p", "pre", "s", "span", "strong",
    "sub", "sup", "table", "tbody", "td", "th", "thead", "tr", "ul",
  ],
  ALLOWED_ATTR: ["href", "title", "class", "align", "start", "colspan", "rowspan"],
  ALLOW_DATA_ATTR: false,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** Render Markdown into an element; `final` turns on language auto-detection. */
export function renderMarkdown(element, text, { final = false } = {}) {
  const html = DOMPurify.sanitize(marked.parse(text || ""), PURIFY);
  element.innerHTML = html;
  // DOMPurify drops an href with an unsafe scheme (javascript:, data:, ...)
  // and leaves the <a>: show its text as plain text, not as a dead link.
  for (const link of element.querySelectorAll("a:not([href])")) {
    link.replaceWith(...link.childNodes);
  }
  for (const code of element.querySelectorAll("pre > code")) {
    highlight(code, final);
    addCopyButton(code.parentElement);
  }
}

function highlight(code, final) {
  const known = [...code.classList].some(
    (c) => c.startsWith("language-") && hljs.getLanguage(c.slice(9)),
  );
  // Guessing the language of every partial block on every frame costs too
  // much while streaming; the final render guesses once.
  if (!known && !final) return;
  if (!known) {
    code.classList.forEach((c) => c.startsWith("language-") && code.classList.remove(c));
  }
  hljs.highlightElement(code);
}

function addCopyButton(pre) {
  const code = pre.querySelector("code");
  const wrapper = document.createElement("div");
  wrapper.className = "code-block";
  const bar = document.createElement("div");
  bar.className = "code-bar";
  // highlight.js marks a block whose language it could not guess "undefined".
  const lang = [...code.classList].find((c) => c.startsWith("language-") && c !== "language-undefined");
  const label = document.createElement("span");
  label.textContent = lang ? lang.slice(9) : "code";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy-code";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy code");
  button.addEventListener("click", async () => {
    const ok = await copyText(code.textContent);
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
  bar.append(label, button);
  pre.replaceWith(wrapper);
  wrapper.append(bar, pre);
}

/** Copy text to the clipboard, also on plain-http deployments. */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // Fall through to the selection-based copy.
    }
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "clipboard-helper";
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}
