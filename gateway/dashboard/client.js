// The websocket protocol of docs/protocol.md, as any client speaks it: requests with ids,
// replies in any order, subscription frames beside them. One Client is one connection;
// the page makes a new one to reconnect.

export class ProtocolError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.code = code;
    this.extra = extra;
  }
}

export class Client {
  // onFrame(frame): every subscription frame; onClose(event): once, when the socket closes.
  constructor(url, { onFrame, onClose }) {
    this.url = url;
    this.onFrame = onFrame;
    this.onClose = onClose;
    this.pending = new Map();
    this.nextId = 1;
    this.socket = null;
    this.opened = false;
  }

  // Resolves once the websocket is open; rejects if it closes first (a refused handshake:
  // browsers do not tell its HTTP status, see probe()).
  open() {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(this.url);
      this.socket = socket;
      socket.onopen = () => {
        this.opened = true;
        resolve();
      };
      socket.onmessage = (message) => this.receive(message.data);
      socket.onclose = (event) => {
        const lost = new ProtocolError("disconnected", "The connection to the daemon was lost.");
        for (const { reject: fail } of this.pending.values()) fail(lost);
        this.pending.clear();
        if (this.opened) this.onClose(event);
        else reject(new ProtocolError("refused", `The websocket closed (code ${event.code}).`));
      };
    });
  }

  close() {
    if (this.socket) this.socket.close(1000, "bye");
  }

  request(op, params = {}) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) {
      return Promise.reject(new ProtocolError("disconnected", "Not connected to the daemon."));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.socket.send(JSON.stringify({ id, op, ...params }));
    });
  }

  receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return; // the server sends JSON objects only
    }
    if ("subscription" in frame) {
      this.onFrame(frame);
      return;
    }
    const waiting = this.pending.get(frame.id);
    if (!waiting) return;
    this.pending.delete(frame.id);
    if (frame.ok) waiting.resolve(frame.result);
    else {
      const { code, message, ...extra } = frame.error;
      waiting.reject(new ProtocolError(code, message, extra));
    }
  }
}

// Why a websocket could not open: "token" (the daemon refused it: 401), "unreachable"
// (nothing answers HTTP there), or "other". A plain GET /v1 answers 401 for a bad token
// and 426 for a good one (docs/protocol.md, "HTTP beside the websocket").
export async function probe(token) {
  try {
    const response = await fetch("/v1", {
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store",
    });
    return response.status === 401 ? "token" : "other";
  } catch {
    return "unreachable";
  }
}
