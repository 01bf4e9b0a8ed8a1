// The chat websocket, reconnecting with backoff. Events: "open", "close"
// (detail: {code, wasOpen, retryIn}) and "frame" (detail: the decoded frame).

const PING_MS = 25000;
const MAX_BACKOFF_MS = 15000;

export class ChatSocket extends EventTarget {
  constructor(path) {
    super();
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.url = `${scheme}//${location.host}${path}`;
    this.ws = null;
    this.failures = 0;
    this.timer = null;
    this.pinger = null;
  }

  get connected() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  connect() {
    clearTimeout(this.timer);
    const ws = new WebSocket(this.url);
    let wasOpen = false;
    this.ws = ws;
    ws.addEventListener("open", () => {
      wasOpen = true;
      this.failures = 0;
      this.pinger = setInterval(() => this.send({ type: "ping" }), PING_MS);
      this.dispatchEvent(new Event("open"));
    });
    ws.addEventListener("message", (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this.dispatchEvent(new CustomEvent("frame", { detail: frame }));
    });
    ws.addEventListener("close", (event) => {
      clearInterval(this.pinger);
      if (this.ws !== ws) return;
      this.ws = null;
      this.failures += 1;
      const base = Math.min(MAX_BACKOFF_MS, 500 * 2 ** Math.min(this.failures - 1, 5));
      const retryIn = wasOpen ? 300 : base + Math.random() * 250;
      this.dispatchEvent(
        new CustomEvent("close", { detail: { code: event.code, wasOpen, retryIn } }),
      );
      this.timer = setTimeout(() => this.connect(), retryIn);
    });
  }

  /** Send a frame; false when the socket is not open. */
  send(frame) {
    if (!this.connected) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Drop the connection now and reconnect (used by tests and after sign-in). */
  reconnect() {
    if (this.ws) this.ws.close();
    else this.connect();
  }
}
