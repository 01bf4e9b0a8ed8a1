// The conversation list: newest first, search, rename, delete, paging.

import { api } from "./api.js";

const SEARCH_DELAY_MS = 250;

export class Sidebar {
  constructor({ url, exportUrl, onOpen, onDeleted, onRenamed, onError }) {
    this.url = url;
    this.exportUrl = exportUrl;
    this.onOpen = onOpen;
    this.onDeleted = onDeleted;
    this.onRenamed = onRenamed;
    this.onError = onError;
    this.list = document.getElementById("conversation-list");
    this.empty = document.getElementById("list-empty");
    this.more = document.getElementById("more-conversations");
    this.search = document.getElementById("search");
    this.items = new Map();
    this.current = null;
    this.running = new Set();
    this.query = "";
    this.oldest = null;
    this.search.addEventListener("input", () => {
      clearTimeout(this.searchTimer);
      this.searchTimer = setTimeout(() => this.load(this.search.value), SEARCH_DELAY_MS);
    });
    this.search.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && this.search.value) {
        this.search.value = "";
        this.load("");
      }
    });
    this.more.addEventListener("click", () => this.load(this.query, { append: true }));
  }

  async load(query = "", { append = false } = {}) {
    this.query = query.trim();
    const params = new URLSearchParams();
    if (this.query) params.set("q", this.query);
    if (append && this.oldest) params.set("before", this.oldest);
    let page;
    try {
      page = await api(`${this.url}?${params}`);
    } catch (error) {
      this.onError(error.message);
      return;
    }
    if (query.trim() !== this.query) return;
    if (!append) {
      this.items.clear();
      this.list.replaceChildren();
    }
    for (const conversation of page.conversations) this.upsert(conversation, { place: "end" });
    const last = page.conversations[page.conversations.length - 1];
    if (last) this.oldest = last.updated_at;
    this.more.hidden = !page.more;
    this.empty.textContent = this.query ? "No conversation matches." : "No conversations yet.";
    this.empty.hidden = this.items.size > 0;
  }

  /** Add or update a conversation: "top" (new activity), "end" (paging) or "keep". */
  upsert(conversation, { place = "top" } = {}) {
    // While searching, activity elsewhere does not add rows to the results.
    if (this.query && !this.items.has(conversation.id) && place === "top") return;
    let item = this.items.get(conversation.id);
    if (!item) {
      item = this.build(conversation.id);
      this.items.set(conversation.id, item);
      if (place === "keep") place = "top";
    }
    item.querySelector(".conversation-link").textContent = conversation.title || "Untitled";
    item.dataset.title = conversation.title || "";
    if (place === "end") this.list.append(item);
    else if (place === "top") this.list.prepend(item);
    this.empty.hidden = true;
    this.mark();
  }

  build(id) {
    const item = document.createElement("li");
    item.className = "conversation";
    item.dataset.id = id;
    const link = document.createElement("a");
    link.className = "conversation-link";
    link.href = `/chat/c/${id}/`;
    link.addEventListener("click", (event) => {
      if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
      event.preventDefault();
      this.onOpen(id);
    });
    const rename = document.createElement("button");
    rename.type = "button";
    rename.className = "icon-btn";
    rename.textContent = "✎";
    rename.setAttribute("aria-label", "Rename");
    rename.addEventListener("click", () => this.rename(id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "icon-btn";
    remove.textContent = "✕";
    remove.setAttribute("aria-label", "Delete");
    remove.addEventListener("click", () => this.remove(id));
    item.append(link, this.downloadMenu(id), rename, remove);
    return item;
  }

  /** A "Download" button that shows the conversation's two files under its row. */
  downloadMenu(id) {
    const wrapper = document.createDocumentFragment();
    const toggle = document.createElement("button");
    toggle.type = "button";
    toggle.className = "icon-btn download-toggle";
    toggle.textContent = "⤓";
    toggle.setAttribute("aria-label", "Download");
    toggle.setAttribute("aria-expanded", "false");
    const menu = document.createElement("div");
    menu.className = "download-menu";
    menu.id = `download-${id}`;
    menu.hidden = true;
    menu.setAttribute("role", "group");
    menu.setAttribute("aria-label", "Download as");
    toggle.setAttribute("aria-controls", menu.id);
    for (const [label, extension] of [["Markdown", "md"], ["JSON", "json"]]) {
      const file = document.createElement("a");
      file.className = "btn btn-quiet";
      file.href = `${this.exportUrl}${id}.${extension}`;
      file.download = "";
      file.textContent = label;
      file.addEventListener("click", () => setTimeout(() => close(true), 0));
      menu.append(file);
    }
    const close = (refocus) => {
      menu.hidden = true;
      toggle.setAttribute("aria-expanded", "false");
      if (refocus) toggle.focus();
    };
    toggle.addEventListener("click", () => {
      const opening = menu.hidden;
      for (const other of this.list.querySelectorAll(".download-menu:not([hidden])")) {
        other.hidden = true;
        other.parentElement.querySelector(".download-toggle").setAttribute("aria-expanded", "false");
      }
      menu.hidden = !opening;
      toggle.setAttribute("aria-expanded", String(opening));
      if (opening) menu.querySelector("a").focus();
    });
    menu.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.stopPropagation();
        close(true);
      }
    });
    wrapper.append(toggle, menu);
    return wrapper;
  }

  select(id) {
    this.current = id;
    this.mark();
  }

  setRunning(id, running) {
    if (running) this.running.add(id);
    else this.running.delete(id);
    this.mark();
  }

  mark() {
    for (const [id, item] of this.items) {
      const link = item.querySelector(".conversation-link");
      if (id === this.current) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
      item.classList.toggle("running", this.running.has(id));
    }
  }

  rename(id) {
    const item = this.items.get(id);
    const link = item.querySelector(".conversation-link");
    const input = document.createElement("input");
    input.className = "rename-input";
    input.value = item.dataset.title;
    input.maxLength = 200;
    input.setAttribute("aria-label", "New title");
    link.hidden = true;
    item.prepend(input);
    input.focus();
    input.select();
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      input.remove();
      link.hidden = false;
      if (!save || input.value === item.dataset.title) return;
      try {
        const data = await api(`${this.url}${id}/`, { method: "PATCH", body: { title: input.value } });
        this.upsert(data.conversation, { place: "keep" });
        this.onRenamed(data.conversation);
      } catch (error) {
        this.onError(error.message);
      }
      link.focus();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") finish(true);
      if (event.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
  }

  async remove(id) {
    const item = this.items.get(id);
    const title = item ? item.dataset.title || "this conversation" : "this conversation";
    if (!window.confirm(`Delete “${title}” and all its messages?`)) return;
    try {
      await api(`${this.url}${id}/`, { method: "DELETE" });
    } catch (error) {
      this.onError(error.message);
      return;
    }
    if (item) item.remove();
    this.items.delete(id);
    this.empty.hidden = this.items.size > 0;
    this.onDeleted(id);
  }
}
