// Keyboard shortcuts of the chat page and the "?" help dialog that lists them.
//
// Ctrl/Cmd+Shift+O starts a new chat and Ctrl/Cmd+K goes to the conversation
// search, also while typing; "?" opens the help when the focus is not in a
// text field. The help is a modal <dialog>: the page behind it is inert, Tab
// stays inside, Esc closes it and the focus goes back where it was.

const isMac = /Mac|iPhone|iPad/.test(
  (navigator.userAgentData && navigator.userAgentData.platform) || navigator.platform || "",
);
const MOD = isMac ? "⌘" : "Ctrl";

/** What the help lists: keys (each shown as a <kbd>) and what they do. */
export const SHORTCUTS = [
  { keys: [MOD, "Shift", "O"], action: "New chat" },
  { keys: [MOD, "K"], action: "Search conversations" },
  { keys: ["Enter"], action: "Send the message" },
  { keys: ["Shift", "Enter"], action: "New line in the message" },
  { keys: ["Esc"], action: "Stop the answer being written, or close a panel" },
  { keys: ["?"], action: "This help" },
];

function typing(target) {
  if (!(target instanceof Element)) return false;
  return Boolean(target.closest("input, textarea, select, [contenteditable]:not([contenteditable='false'])"));
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function helpDialog() {
  const dialog = element("dialog", "shortcuts-dialog");
  dialog.id = "shortcuts-dialog";
  dialog.setAttribute("aria-labelledby", "shortcuts-title");
  const title = element("h2", "shortcuts-title", "Keyboard shortcuts");
  title.id = "shortcuts-title";
  const list = element("dl", "shortcuts-list");
  for (const { keys, action } of SHORTCUTS) {
    const term = element("dt");
    keys.forEach((key, index) => {
      if (index) term.append("+");
      term.append(element("kbd", "", key));
    });
    list.append(term, element("dd", "", action));
  }
  const form = element("form", "shortcuts-actions");
  form.method = "dialog";
  const close = element("button", "btn btn-primary", "Close");
  close.type = "submit";
  form.append(close);
  dialog.append(title, list, form);
  return dialog;
}

/**
 * Wire the shortcuts: `newChat()` and `search()` are the page's own actions;
 * `helpButton` (optional) opens the help too.
 */
export function setupShortcuts({ newChat, search, helpButton = null, newChatButton = null, searchInput = null }) {
  const dialog = helpDialog();
  document.body.append(dialog);
  let opener = null;

  function openHelp() {
    if (dialog.open) return;
    opener = document.activeElement;
    dialog.showModal();
    dialog.querySelector("button").focus();
  }

  dialog.addEventListener("close", () => {
    if (opener && opener.isConnected && typeof opener.focus === "function") opener.focus();
    opener = null;
  });
  // Tab and Shift+Tab go round the dialog's own controls.
  dialog.addEventListener("keydown", (event) => {
    // Esc closes the help (the browser does that), and nothing else: not
    // the answer being written behind it.
    if (event.key === "Escape") event.stopPropagation();
    if (event.key !== "Tab") return;
    const focusable = [...dialog.querySelectorAll("button, a[href], input, select, textarea")];
    const first = focusable[0];
    const last = focusable[focusable.length - 1];
    if (event.shiftKey && document.activeElement === first) {
      event.preventDefault();
      last.focus();
    } else if (!event.shiftKey && document.activeElement === last) {
      event.preventDefault();
      first.focus();
    }
  });
  // A click on the backdrop (outside the dialog's box) closes it.
  dialog.addEventListener("click", (event) => {
    if (event.target !== dialog) return;
    const box = dialog.getBoundingClientRect();
    const inside =
      event.clientX >= box.left && event.clientX <= box.right && event.clientY >= box.top && event.clientY <= box.bottom;
    if (!inside) dialog.close();
  });

  if (helpButton) helpButton.addEventListener("click", openHelp);
  if (newChatButton) {
    newChatButton.setAttribute("aria-keyshortcuts", isMac ? "Meta+Shift+O" : "Control+Shift+O");
    newChatButton.title = `New chat (${MOD}+Shift+O)`;
  }
  if (searchInput) {
    searchInput.setAttribute("aria-keyshortcuts", isMac ? "Meta+K" : "Control+K");
    searchInput.title = `Search conversations (${MOD}+K)`;
  }

  document.addEventListener("keydown", (event) => {
    if (event.defaultPrevented || event.isComposing || dialog.open) return;
    const mod = isMac ? event.metaKey : event.ctrlKey;
    const key = event.key.toLowerCase();
    if (mod && event.shiftKey && !event.altKey && key === "o") {
      event.preventDefault();
      newChat();
    } else if (mod && !event.shiftKey && !event.altKey && key === "k") {
      event.preventDefault();
      search();
    } else if (event.key === "?" && !event.ctrlKey && !event.metaKey && !event.altKey && !typing(event.target)) {
      event.preventDefault();
      openHelp();
    }
  });

  return { openHelp, dialog };
}
