// Test doubles for plexus.js: a clock that only moves when told to, and a
// WebSocket whose "server side" the test drives by hand.

/** Let every pending promise callback run. */
export async function flush() {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
}

export class FakeClock {
  constructor() {
    this.t = 1_000_000;
    this.timers = new Map();
    this.seq = 0;
    /** What random() returns: a number, or a function giving one. */
    this.randomValue = 0.5;
    this.now = () => this.t;
    this.setTimeout = (fn, ms) => {
      const id = ++this.seq;
      this.timers.set(id, { at: this.t + Math.max(0, ms || 0), fn, id });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
    this.random = () => (typeof this.randomValue === 'function' ? this.randomValue() : this.randomValue);
  }

  /** Move time forward by `ms`, firing due timers in order (and flushing promises). */
  async advance(ms) {
    const end = this.t + ms;
    await flush();
    for (;;) {
      let next = null;
      for (const timer of this.timers.values()) {
        if (timer.at <= end && (next === null || timer.at < next.at || (timer.at === next.at && timer.id < next.id))) {
          next = timer;
        }
      }
      if (next === null) break;
      this.timers.delete(next.id);
      this.t = next.at;
      next.fn();
      await flush();
    }
    this.t = end;
    await flush();
  }
}

/** Make a FakeWebSocket class whose instances are recorded in `sockets`. */
export function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSING = 2;
    static CLOSED = 3;

    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      this.onopen = null;
      this.onmessage = null;
      this.onclose = null;
      this.onerror = null;
      sockets.push(this);
    }

    send(text) {
      if (this.readyState !== 1) throw new Error('InvalidStateError: not open');
      this.sent.push(JSON.parse(text));
    }

    close(code = 1000, reason = '') {
      if (this.readyState >= 2) return;
      this.closedWith = { code, reason };
      this.readyState = 3;
      // Like a browser: the close event comes later.
      setImmediate(() => this.onclose && this.onclose({ code, reason, wasClean: true }));
    }

    // ---- driven by the test, as the server would

    open() {
      this.readyState = 1;
      if (this.onopen) this.onopen({});
    }

    receive(obj) {
      this.onmessage({ data: typeof obj === 'string' ? obj : JSON.stringify(obj) });
    }

    /** Open and send welcome. */
    accept(client = 'c-' + sockets.indexOf(this), user = null) {
      this.open();
      this.receive({ type: 'welcome', client, user, server: 'plexus/test', ping_interval: 25 });
    }

    reply(cmd, result = {}) {
      this.receive({ type: 'reply', id: cmd.id, result });
    }

    error(cmd, code, message = code) {
      this.receive({ type: 'error', id: cmd.id, code, message });
    }

    serverClose(code = 1006, reason = '') {
      this.readyState = 3;
      if (this.onclose) this.onclose({ code, reason, wasClean: code !== 1006 });
    }

    fail() {
      this.readyState = 3;
      if (this.onerror) this.onerror({});
      if (this.onclose) this.onclose({ code: 1006, reason: '', wasClean: false });
    }

    sentOfType(type) {
      return this.sent.filter((m) => m.type === type);
    }

    lastSent(type) {
      const all = this.sentOfType(type);
      return all[all.length - 1];
    }
  }
  return { FakeWebSocket, sockets };
}

/**
 * A `fetch` whose event streams (`GET .../sse`) and POSTs (`.../emulation`) the
 * test drives by hand, as the server would: `streams` and `posts` record them.
 */
export function fakeFetch() {
  const streams = [];
  const posts = [];
  class FakeStream {
    constructor(url) {
      this.url = url;
      this.chunks = [];
      this.waiting = null;
      this.ended = false;
      this.aborted = false;
    }

    /** Send one event (an object is one `data:` JSON event; a string goes as is). */
    push(obj) {
      this.write(typeof obj === 'string' ? obj : `data: ${JSON.stringify(obj)}\n\n`);
    }

    write(text) {
      this.chunks.push(new TextEncoder().encode(text));
      this._wake();
    }

    accept(client = 'c-sse' + streams.indexOf(this), session = 's-' + streams.indexOf(this)) {
      this.push({ type: 'welcome', client, user: null, server: 'plexus/test', ping_interval: 25, session, node: 'n1' });
    }

    end() {
      this.ended = true;
      this._wake();
    }

    _wake() {
      if (this.waiting) {
        const resolve = this.waiting;
        this.waiting = null;
        resolve();
      }
    }

    async read() {
      for (;;) {
        if (this.aborted) throw new Error('AbortError');
        if (this.chunks.length) return { value: this.chunks.shift(), done: false };
        if (this.ended) return { value: undefined, done: true };
        await new Promise((resolve) => (this.waiting = resolve));
      }
    }
  }
  async function fetchImpl(url, init = {}) {
    if ((init.method || 'GET') === 'POST') {
      const post = { url, body: JSON.parse(init.body), status: 204 };
      posts.push(post);
      const answer = fetchImpl.answer;
      const status = answer ? await answer(post) : 204;
      return { ok: status < 300, status };
    }
    if (fetchImpl.refuse) return { ok: false, status: fetchImpl.refuse, body: null };
    const stream = new FakeStream(url);
    streams.push(stream);
    if (init.signal) {
      init.signal.addEventListener('abort', () => {
        stream.aborted = true;
        stream._wake();
      });
    }
    return { ok: true, status: 200, body: { getReader: () => stream } };
  }
  fetchImpl.answer = null; // (post) => HTTP status (or a promise of one) for POSTs; default 204
  fetchImpl.refuse = 0; // an HTTP status to refuse event streams with
  return { fetch: fetchImpl, streams, posts };
}

/** A client wired to a fake clock and fake sockets (WebSocket only unless `transports` says). */
export async function setup(Plexus, options = {}) {
  const clock = new FakeClock();
  const { FakeWebSocket, sockets } = fakeWebSocketClass();
  const px = new Plexus('ws://test.invalid/ws', {
    WebSocket: FakeWebSocket,
    clock,
    transports: ['websocket'],
    ...options,
  });
  const states = [];
  const errors = [];
  const retries = [];
  px.on('state', (state, previous) => states.push([previous, state]));
  px.on('error', (err) => errors.push(err));
  px.on('retry', (info) => retries.push(info));
  const last = () => sockets[sockets.length - 1];
  return { px, clock, sockets, states, errors, retries, last };
}
