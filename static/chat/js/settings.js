// Conversation settings: the system prompt and sampling of a conversation,
// the user's presets, and the model picker's labels. See chat/PROTOCOL.md
// (`settings` frame, `send.settings`, `opened.conversation.settings`).
//
// A new chat sends its settings with the first `send` (none chosen: the server
// applies the model's defaults); an existing one stores them with a `settings`
// frame. The server checks everything again and names the range in its error.

import { api } from "./api.js";

const FIELDS = ["system_prompt", "temperature", "top_p", "max_tokens"];
const EMPTY = { system_prompt: "", temperature: null, top_p: null, max_tokens: null };

// "8k", "128k", "1M": a context window as the picker shows it.
export function windowLabel(tokens) {
  if (!tokens) return "";
  if (tokens >= 1_000_000) return `${Math.round(tokens / 100_000) / 10}M`;
  if (tokens >= 1000) return `${Math.round(tokens / 1000)}k`;
  return String(tokens);
}

export class SettingsPanel {
  constructor({ config, modelSelect, send, conversationId, announce }) {
    this.config = config;
    this.models = new Map((config.model_info || []).map((m) => [m.name, m]));
    this.modelSelect = modelSelect;
    this.send = send;
    this.conversationId = conversationId;
    this.announce = announce;
    // The settings of the conversation shown, or (new chat) those chosen in
    // the panel: null until chosen, then they go with the first send.
    this.current = null;
    this.chosen = null;
    this.presets = null;
    this.dialog = document.getElementById("settings-panel");
    this.button = document.getElementById("settings-button");
    this.form = document.getElementById("settings-form");
    this.error = document.getElementById("settings-error");
    this.presetSelect = document.getElementById("settings-preset");
    this.presetName = document.getElementById("settings-preset-name");
    this.inputs = Object.fromEntries(FIELDS.map((f) => [f, document.getElementById(`settings-${f}`)]));
    this.inputs.system_prompt.maxLength = config.max_system_prompt_chars;
    this.wire();
  }

  // --- The model picker ---------------------------------------------------------

  labelModels() {
    for (const option of this.modelSelect.options) {
      const info = this.models.get(option.value);
      if (info && info.context_window) {
        option.textContent = `${info.name} · ${windowLabel(info.context_window)}`;
      }
    }
  }

  modelDefaults() {
    const info = this.models.get(this.modelSelect.value);
    return { ...EMPTY, ...((info && info.defaults) || {}) };
  }

  // --- Hooks from app.js ---------------------------------------------------------

  // The settings of a new conversation's first `send`, or undefined (defaults).
  forNewChat() {
    return this.chosen ? { ...this.chosen } : undefined;
  }

  // A conversation was opened (`opened`): its stored settings.
  showConversation(conversation) {
    this.current = { ...EMPTY, ...(conversation.settings || {}) };
    this.chosen = null;
    this.markButton();
  }

  // A new chat: back to the model's defaults.
  reset() {
    this.current = null;
    this.chosen = null;
    this.markButton();
  }

  // The server stored a `settings` frame.
  saved(frame) {
    if (frame.conversation_id !== this.conversationId()) return;
    this.current = { ...EMPTY, ...frame.settings };
    this.markButton();
    if (this.dialog.open) this.dialog.close();
    this.announce("Settings saved.");
  }

  // An error frame answering our `settings` frame.
  failed(frame) {
    if (this.dialog.open) this.showError(frame.message);
  }

  // --- The panel -------------------------------------------------------------------

  shown() {
    // A conversation just started by this page has what its first send had:
    // the settings chosen, else the model's defaults.
    if (this.conversationId() && this.current) return this.current;
    return this.chosen || this.modelDefaults();
  }

  markButton() {
    const settings = (this.conversationId() && this.current) || this.chosen;
    const custom = Boolean(settings && FIELDS.some((f) => settings[f] !== null && settings[f] !== ""));
    this.button.classList.toggle("has-settings", custom);
    this.button.setAttribute("aria-label", custom ? "Conversation settings (changed)" : "Conversation settings");
  }

  open() {
    this.fill(this.shown());
    this.showError("");
    const info = this.models.get(this.modelSelect.value);
    this.inputs.max_tokens.max = String((info && info.max_output_tokens) || this.config.max_tokens_limit);
    document.getElementById("settings-scope").textContent = this.conversationId()
      ? "For this conversation, from its next answer on."
      : `For the new chat with ${this.modelSelect.value || "the chosen model"}.`;
    this.dialog.showModal();
    this.button.setAttribute("aria-expanded", "true");
    this.inputs.system_prompt.focus();
    this.loadPresets();
  }

  fill(settings) {
    for (const field of FIELDS) {
      const value = settings[field];
      this.inputs[field].value = value === null || value === undefined ? "" : String(value);
    }
  }

  showError(text) {
    this.error.textContent = text;
    this.error.hidden = !text;
  }

  // The fields as settings, or null after showing what is wrong. The server
  // checks the same ranges.
  read() {
    const settings = { system_prompt: this.inputs.system_prompt.value };
    const ranges = {
      temperature: [0, 2, false],
      top_p: [0, 1, false],
      max_tokens: [1, Number(this.inputs.max_tokens.max) || this.config.max_tokens_limit, true],
    };
    for (const [field, [low, high, whole]] of Object.entries(ranges)) {
      const raw = this.inputs[field].value.trim();
      if (raw === "") {
        settings[field] = null;
        continue;
      }
      const value = Number(raw);
      if (!Number.isFinite(value) || value < low || value > high || (whole && !Number.isInteger(value))) {
        const kind = whole ? "a whole number" : "a number";
        this.showError(`${field} must be ${kind} from ${low} to ${high}, or empty.`);
        this.inputs[field].focus();
        return null;
      }
      settings[field] = value;
    }
    if (settings.system_prompt.length > this.config.max_system_prompt_chars) {
      this.showError(`The system prompt can be at most ${this.config.max_system_prompt_chars} characters.`);
      return null;
    }
    return settings;
  }

  apply() {
    const settings = this.read();
    if (!settings) return;
    const id = this.conversationId();
    if (id) {
      // Closed once the server says it stored them (`settings` frame).
      if (!this.send({ type: "settings", conversation_id: id, settings })) {
        this.showError("Not connected to the server; try again in a moment.");
      }
      return;
    }
    this.chosen = settings;
    this.markButton();
    this.dialog.close();
    this.announce("Settings chosen for the new chat.");
  }

  // --- Presets -------------------------------------------------------------------------

  async loadPresets() {
    try {
      const data = await api(this.config.urls.presets);
      this.presets = data.presets;
      this.renderPresets();
    } catch (error) {
      this.showError(`Presets could not be loaded: ${error.message}`);
    }
  }

  renderPresets() {
    const select = this.presetSelect;
    select.replaceChildren(new Option("Choose a preset…", ""));
    for (const preset of this.presets || []) {
      const label = preset.model ? `${preset.name} (${preset.model})` : preset.name;
      select.append(new Option(label, String(preset.id)));
    }
    document.getElementById("settings-delete-preset").disabled = true;
  }

  pickPreset() {
    const preset = (this.presets || []).find((p) => String(p.id) === this.presetSelect.value);
    document.getElementById("settings-delete-preset").disabled = !preset;
    if (!preset) return;
    this.fill({ ...EMPTY, ...preset.settings });
    this.presetName.value = preset.name;
    // A new chat follows the preset's model, when it has one we offer.
    if (!this.conversationId() && preset.model && this.models.has(preset.model)) {
      this.modelSelect.value = preset.model;
      this.modelSelect.dispatchEvent(new Event("change"));
    }
  }

  async savePreset() {
    const settings = this.read();
    if (!settings) return;
    const name = this.presetName.value.trim();
    if (!name) {
      this.showError("Give the preset a name.");
      this.presetName.focus();
      return;
    }
    try {
      const data = await api(this.config.urls.presets, {
        method: "POST",
        body: { name, model: this.modelSelect.value || "", settings },
      });
      this.showError("");
      await this.loadPresets();
      this.presetSelect.value = String(data.preset.id);
      document.getElementById("settings-delete-preset").disabled = false;
      this.announce(`Preset ${name} saved.`);
    } catch (error) {
      this.showError(error.message);
    }
  }

  async deletePreset() {
    const id = this.presetSelect.value;
    if (!id) return;
    try {
      await api(`${this.config.urls.presets}${id}/`, { method: "DELETE" });
      await this.loadPresets();
      this.announce("Preset deleted.");
    } catch (error) {
      this.showError(error.message);
    }
  }

  wire() {
    this.button.addEventListener("click", () => this.open());
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.apply();
    });
    document.getElementById("settings-cancel").addEventListener("click", () => this.dialog.close());
    document.getElementById("settings-defaults").addEventListener("click", () => this.fill(this.modelDefaults()));
    document.getElementById("settings-save-preset").addEventListener("click", () => this.savePreset());
    document.getElementById("settings-delete-preset").addEventListener("click", () => this.deletePreset());
    this.presetSelect.addEventListener("change", () => this.pickPreset());
    this.dialog.addEventListener("close", () => {
      this.button.setAttribute("aria-expanded", "false");
      this.button.focus();
    });
    // Esc closes the dialog (the browser does it); keep it from stopping an answer.
    this.dialog.addEventListener("keydown", (event) => {
      if (event.key === "Escape") event.stopPropagation();
    });
    this.modelSelect.addEventListener("change", () => this.markButton());
  }
}
