// Versions of a message: "‹ 2 / 3 ›" under a regenerated answer or an edited
// question. Switching asks the server (`switch`), which answers with the path
// now shown (`opened`); the next message continues from it.

function pagerButton(label, ariaLabel, targetId) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "btn btn-quiet version-step";
  b.textContent = label;
  b.setAttribute("aria-label", ariaLabel);
  b.dataset.action = "version";
  if (targetId == null) b.disabled = true;
  else b.dataset.target = String(targetId);
  return b;
}

/** The pager for a message, or null when it has a single version. */
export function versionsElement(message, { disabled = false } = {}) {
  const v = message.versions;
  if (!v || v.count <= 1) return null;
  const pager = document.createElement("div");
  pager.className = "versions";
  pager.setAttribute("role", "group");
  pager.setAttribute("aria-label", `Version ${v.index} of ${v.count}`);
  const prev = pagerButton("‹", "Previous version", v.prev);
  prev.dataset.step = "prev";
  const position = document.createElement("span");
  position.className = "versions-position";
  position.textContent = `${v.index} / ${v.count}`;
  // The group's label says it for screen readers.
  position.setAttribute("aria-hidden", "true");
  const next = pagerButton("›", "Next version", v.next);
  next.dataset.step = "next";
  if (disabled) prev.disabled = next.disabled = true;
  pager.append(prev, position, next);
  return pager;
}

/** Put a message's pager first in its row of buttons (Copy, Regenerate, Edit). */
export function addVersions(article, message, options) {
  const pager = versionsElement(message, options);
  if (pager) article.querySelector(".msg-actions").prepend(pager);
}

/**
 * A question that is not in the list (a new version after an edit) replaces
 * what followed its parent: the branch of its earlier version.
 */
export function dropBranchOf(messages, question) {
  if (messages.some((m) => m.id === question.id)) return;
  if (question.parent_id == null) {
    messages.splice(0);
    return;
  }
  const parent = messages.findIndex((m) => m.id === question.parent_id);
  if (parent >= 0) messages.splice(parent + 1);
}

/**
 * Where the reader was: after a switch redraws the conversation, focus the
 * same step of the version now shown (or the other one at either end).
 */
export function focusSwitched(container, pending) {
  if (!pending) return;
  const article = container.querySelector(`article[data-id="${pending.id}"]`);
  if (!article) return;
  const steps = [...article.querySelectorAll(".versions .version-step")];
  const same = steps.find((b) => b.dataset.step === pending.step && !b.disabled);
  const target = same || steps.find((b) => !b.disabled);
  article.scrollIntoView({ block: "nearest" });
  if (target) target.focus();
}
