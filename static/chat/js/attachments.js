// Images in the composer: paste, drop or pick them; each is uploaded at once
// (POST /chat/api/attachments/) and sent by id with the next message. Only
// offered for models whose every route takes images (config.image_models).

const ACCEPT = "image/png,image/jpeg,image/webp,image/gif";

function csrf() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

function sizeWords(bytes) {
  if (bytes >= 1024 * 1024) return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
  return `${Math.max(1, Math.round(bytes / 1024))} KiB`;
}

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** The thumbnails of a sent question, each a link to the full image. */
export function imagesElement(attachments) {
  const list = make("div", "msg-images");
  for (const image of attachments || []) {
    const link = make("a", "msg-image");
    link.href = image.url;
    link.target = "_blank";
    link.rel = "noopener";
    const img = make("img");
    img.src = image.thumbnail_url;
    img.alt = `Attached image, ${image.width} × ${image.height} pixels (opens the full image)`;
    img.loading = "lazy";
    // The thumbnail keeps the image's shape within 256 pixels.
    const scale = Math.min(1, 256 / Math.max(image.width, image.height));
    img.width = Math.max(1, Math.round(image.width * scale));
    img.height = Math.max(1, Math.round(image.height * scale));
    link.append(img);
    list.append(link);
  }
  return list;
}

/** Uploads waiting in the composer, and the controls to add and remove them. */
export class Attachments {
  constructor({ config, composer, input, model, before, announce, onChange }) {
    this.url = config.urls.attachments;
    this.models = new Set(config.image_models || []);
    this.limits = config.images || { max_bytes: 5 * 1024 * 1024, max_per_message: 4 };
    this.model = model;
    this.announce = announce;
    this.onChange = onChange;
    this.items = [];
    this.counter = 0;

    this.picker = make("input");
    this.picker.type = "file";
    this.picker.accept = ACCEPT;
    this.picker.multiple = true;
    this.picker.hidden = true;
    this.picker.id = "image-picker";
    this.button = make("button", "btn btn-quiet attach-btn", "Add image");
    this.button.type = "button";
    this.button.id = "attach";
    this.button.setAttribute("aria-label", "Add images to the message");
    this.list = make("ul", "attachment-list");
    this.list.id = "attachments";
    this.list.setAttribute("aria-label", "Images to send");
    before.before(this.button, this.picker);
    composer.insertBefore(this.list, composer.querySelector(".composer-row"));

    this.button.addEventListener("click", () => this.picker.click());
    this.picker.addEventListener("change", () => {
      this.add([...this.picker.files]);
      this.picker.value = "";
    });
    input.addEventListener("paste", (event) => {
      const files = [...(event.clipboardData ? event.clipboardData.files : [])].filter((f) =>
        f.type.startsWith("image/"),
      );
      if (files.length && this.offered()) {
        event.preventDefault();
        this.add(files);
      }
    });
    composer.addEventListener("dragover", (event) => {
      if (!this.offered()) return;
      event.preventDefault();
      composer.classList.add("dropping");
    });
    composer.addEventListener("dragleave", () => composer.classList.remove("dropping"));
    composer.addEventListener("drop", (event) => {
      composer.classList.remove("dropping");
      if (!this.offered() || !event.dataTransfer) return;
      event.preventDefault();
      this.add([...event.dataTransfer.files]);
    });
    model.addEventListener("change", () => this.update());
    this.update();
  }

  /** Whether the selected model takes images. */
  offered() {
    return this.models.has(this.model.value);
  }

  /** Mark the models that take images in the picker: "name · images". */
  markModels() {
    for (const option of this.model.options) {
      if (this.models.has(option.value) && !option.textContent.endsWith(" · images")) {
        option.textContent += " · images";
      }
    }
  }

  /** Ids of the uploaded images, in the order they were added. */
  ids() {
    return this.items.filter((item) => item.id).map((item) => item.id);
  }

  /** A sentence saying why the message cannot be sent yet, or "". */
  blocker() {
    if (this.items.some((item) => item.state === "uploading")) {
      return "Wait for the images to finish uploading.";
    }
    if (this.items.some((item) => item.state === "error")) {
      return "Remove the images that could not be uploaded first.";
    }
    if (this.items.length && !this.offered()) {
      return "This model does not take images: choose a model marked “images”, or remove them.";
    }
    return "";
  }

  /** Forget the images once their message is on its way (they are bound to it). */
  clear() {
    this.items = [];
    this.render();
  }

  add(files) {
    for (const file of files) {
      if (this.items.length >= this.limits.max_per_message) {
        this.announce(`A message can carry at most ${this.limits.max_per_message} images.`, true);
        break;
      }
      const item = { key: ++this.counter, name: file.name || "pasted image", state: "uploading", progress: 0 };
      this.items.push(item);
      if (file.size > this.limits.max_bytes) {
        this.fail(item, `${item.name} is ${sizeWords(file.size)}; the limit is ${sizeWords(this.limits.max_bytes)}.`);
        continue;
      }
      this.upload(item, file);
    }
    this.render();
  }

  upload(item, file) {
    const form = new FormData();
    form.append("file", file, file.name || "image");
    const request = new XMLHttpRequest();
    request.open("POST", this.url);
    request.setRequestHeader("X-CSRFToken", csrf());
    request.setRequestHeader("Accept", "application/json");
    request.responseType = "json";
    request.upload.addEventListener("progress", (event) => {
      if (!event.lengthComputable) return;
      item.progress = Math.round((event.loaded * 100) / event.total);
      this.render();
    });
    request.addEventListener("load", () => {
      const data = request.response || {};
      if (request.status === 201 && data.attachment) {
        Object.assign(item, { state: "ready", id: data.attachment.id, image: data.attachment });
        this.render();
        this.announce(`${item.name} is ready to send.`);
        return;
      }
      if (request.status === 401) {
        location.assign(`/accounts/login/?next=${encodeURIComponent(location.pathname)}`);
        return;
      }
      const message = (data.error && data.error.message) || `The server answered ${request.status}.`;
      this.fail(item, `${item.name} could not be uploaded: ${message}`);
    });
    request.addEventListener("error", () =>
      this.fail(item, `${item.name} could not be uploaded: the connection failed.`),
    );
    request.send(form);
  }

  fail(item, message) {
    Object.assign(item, { state: "error", message });
    this.render();
    this.announce(message, true);
  }

  remove(item) {
    this.items = this.items.filter((other) => other !== item);
    if (item.id) {
      // Not sent yet: the server deletes it (and would within a day anyway).
      fetch(`${this.url}${item.id}/`, {
        method: "DELETE",
        credentials: "same-origin",
        headers: { "X-CSRFToken": csrf() },
      }).catch(() => {});
    }
    this.render();
    this.announce(`${item.name} removed.`);
    this.button.focus();
  }

  update() {
    this.button.hidden = !this.offered();
    this.render();
  }

  render() {
    this.list.replaceChildren();
    this.list.hidden = this.items.length === 0;
    for (const item of this.items) {
      const row = make("li", `attachment attachment-${item.state}`);
      if (item.image) {
        const img = make("img");
        img.src = item.image.thumbnail_url;
        img.alt = "";
        row.append(img);
      }
      let words = item.name;
      if (item.state === "uploading") words += ` — uploading ${item.progress}%`;
      else if (item.state === "error") words = item.message;
      else words += ` — ${item.image.width} × ${item.image.height}, ${sizeWords(item.image.size)}`;
      row.append(make("span", "attachment-text", words));
      const remove = make("button", "icon-btn attachment-remove", "×");
      remove.type = "button";
      remove.setAttribute("aria-label", `Remove ${item.name}`);
      remove.addEventListener("click", () => this.remove(item));
      row.append(remove);
      this.list.append(row);
    }
    if (this.items.length && !this.offered()) {
      this.list.append(make("li", "attachment attachment-error", this.blocker()));
    }
    this.onChange();
  }
}
