// plexus.js: the Plexus client, protocol version 1 (docs/protocol.md).
//
// A zero-dependency ES module for browsers and Node (pass `WebSocket` from the
// `ws` package on Node < 22). One file on purpose: the server serves it at
// `/plexus.js`, the npm package `plexus-client` ships the same file.
//
//   import { Plexus } from './plexus.js';
//   const px = new Plexus('ws://localhost:8000/ws');
//   px.on('state', (state, previous) => console.log(previous, '->', state));
//   await px.connect();
//   const sub = px.subscribe('chat:lobby', { info: { nick: 'ann' } });
//   sub.on('message', (msg) => console.log(msg.data));
//   await sub.ready;
//   await sub.publish({ text: '你好 👋' });
//
// Binary data: any Uint8Array (or other ArrayBuffer view / ArrayBuffer) inside
// `data` is sent as `{"$bytes": "<base64>"}`, the protocol's JSON form of
// bytes, and every `{"$bytes": "..."}` object received is turned back into a
// Uint8Array. So `sub.publish({ img: new Uint8Array([1, 2]) })` arrives at
// every other plexus.js client as a Uint8Array, and at a plain JSON client as
// `{"$bytes": "AQI="}`.
//
// Delivery: each subscription remembers the last offset and epoch it saw; after
// a reconnect it resubscribes with `since`, so the server replays what was
// missed. Each offset is delivered at most once. When the server cannot replay
// (history trimmed, epoch changed) the subscription emits 'lost' and the app
// reloads its state (e.g. with `history()`). The same happens, on the same
// Subscription, when the server ends a subscription with `insufficient_state`.
//
// Server-side subscriptions (the token's `channels` claim, ...) are announced
// by a `subscribed` push: they become Subscription objects like the app's own
// (the client emits 'subscribed' with the new one) and recover the same way.
//
// Transports: where a WebSocket cannot open (a proxy that breaks upgrades),
// the client falls back by itself to Server-Sent Events plus POSTs (`GET
// /sse`, `POST /emulation`), with the same API, events and recovery;
// `client.transport` says which one is in use. It tries the WebSocket again
// on a later reconnect. Once a WebSocket worked, it falls back only after
// five in a row failed (a server restarting is no broken proxy).
// `transports: ['websocket']` turns the fallback off.

const VERSION = '0.1.0';
// WebSockets in a row that close before `welcome`, after one worked, before the client falls back to SSE.
const WS_FAILURES = 5;

const DEFAULTS = {
  requestTimeout: 10000,
  pingAfter: 20000,
  pongTimeout: 5000,
  queueLimit: 100,
  queueWhileDisconnected: true,
  maxMessageSize: 64 * 1024,
  rateLimitDelay: 5000,
  refreshBefore: 30000,
  transports: ['websocket', 'sse'],
};

// `history` answers at most this many messages per request (the server's cap).
const HISTORY_PAGE = 10000;

const DEFAULT_BACKOFF = { initial: 500, max: 20000, resetAfter: 10000 };

/** Error of a request or of the connection; `code` is what to branch on. */
export class PlexusError extends Error {
  /**
   * @param {string} code protocol error code, or 'timeout' | 'disconnected' |
   *   'queue_full' | 'too_large' | 'token_expired' | 'unauthorized' ...
   * @param {string} [message]
   */
  constructor(code, message) {
    super(message || code);
    this.name = 'PlexusError';
    this.code = code;
  }
}

// ---------------------------------------------------------------- bytes <-> JSON

function bytesToBase64(bytes) {
  let binary = '';
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function isPlainObject(value) {
  if (value === null || typeof value !== 'object') return false;
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/** Replace binary values by `{"$bytes": base64}` (a copy; the input is not changed). */
export function encodeBytes(value) {
  if (value instanceof Uint8Array) return { $bytes: bytesToBase64(value) };
  if (ArrayBuffer.isView(value)) {
    return { $bytes: bytesToBase64(new Uint8Array(value.buffer, value.byteOffset, value.byteLength)) };
  }
  if (value instanceof ArrayBuffer) return { $bytes: bytesToBase64(new Uint8Array(value)) };
  if (Array.isArray(value)) return value.map(encodeBytes);
  if (isPlainObject(value)) {
    const out = {};
    for (const key of Object.keys(value)) out[key] = encodeBytes(value[key]);
    return out;
  }
  return value;
}

/** Replace every `{"$bytes": base64}` object by a Uint8Array (in place, returns the value). */
export function decodeBytes(value) {
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) value[i] = decodeBytes(value[i]);
    return value;
  }
  if (value !== null && typeof value === 'object') {
    const keys = Object.keys(value);
    if (keys.length === 1 && keys[0] === '$bytes' && typeof value.$bytes === 'string') {
      try {
        return base64ToBytes(value.$bytes);
      } catch {
        return value; // not base64 after all: leave it as the sender wrote it
      }
    }
    for (const key of keys) value[key] = decodeBytes(value[key]);
  }
  return value;
}

function utf8Length(text, max) {
  // Cheap upper bound first: most messages are far below the limit.
  if (text.length * 3 <= max) return text.length;
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff) {
      n += 4; // surrogate pair: one 4-byte code point
      i++;
    } else n += 3;
  }
  return n;
}

// ---------------------------------------------------------------- events

class Emitter {
  constructor() {
    this._handlers = new Map();
  }

  /** Add a handler; returns a function that removes it. */
  on(event, fn) {
    if (typeof fn !== 'function') throw new TypeError('handler must be a function');
    let set = this._handlers.get(event);
    if (!set) this._handlers.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }

  /** Remove a handler added with `on`. */
  off(event, fn) {
    const set = this._handlers.get(event);
    if (set) set.delete(fn);
  }

  _emit(event, ...args) {
    const set = this._handlers.get(event);
    if (!set || set.size === 0) return false;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (err) {
        // A failing handler must not break the client or the other handlers.
        if (typeof console !== 'undefined') console.error(`plexus: '${event}' handler failed:`, err);
      }
    }
    return true;
  }
}

function defer() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/**
 * The `exp` claim (Unix seconds) of a JWT, or null when the token is not a JWT
 * or has none. Read without checking the signature: only the server can, and
 * the client only wants to know when to ask for the next token.
 */
function tokenExpiry(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3 || parts[1] === '') return null;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(b64.padEnd(Math.ceil(b64.length / 4) * 4, '=')));
    return claims !== null && typeof claims.exp === 'number' ? claims.exp : null;
  } catch {
    return null;
  }
}

function defaultUrl() {
  if (typeof location !== 'undefined' && location.host) {
    return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws`;
  }
  throw new TypeError('Plexus: a url is required outside a browser page');
}

function normalizeUrl(url) {
  if (!url) return defaultUrl();
  let text = String(url);
  if (typeof location !== 'undefined' && location.href && !/^[a-z][a-z0-9+.-]*:/i.test(text)) {
    text = new URL(text, location.href).href; // relative to the page, e.g. '/ws'
  }
  return text.replace(/^http(s?):/i, 'ws$1:');
}

// ---------------------------------------------------------------- subscription

/**
 * One channel subscription. Made by `Plexus.subscribe`, or by the client when
 * the server subscribes the connection (a `subscribed` push), never directly.
 * Events: 'message' (push), 'join', 'leave', 'subscribed' (each (re)subscribe
 * reply or `subscribed` push), 'recovered', 'lost', 'unsubscribed', 'error'.
 */
export class Subscription extends Emitter {
  constructor(client, channel, options) {
    super();
    this.client = client;
    this.channel = channel;
    /** 'subscribing' | 'subscribed' | 'unsubscribed' */
    this.state = 'subscribing';
    /** True once the server made (or took over) this subscription: a `subscribed` push. */
    this.server = false;
    this._info = options.info;
    this._token = options.token;
    this._offset = null; // last offset seen (subscribe reply or message)
    this._epoch = null;
    if (options.since && typeof options.since.offset === 'number') {
      this._offset = options.since.offset;
      this._epoch = options.since.epoch ?? null;
    }
    this._everSubscribed = false;
    // A gap being filled from history after a server-side (re)subscribe:
    // {since, offset, epoch, got: [], held: []}, or null.
    this._fill = null;
    this._ready = defer();
    this._ready.promise.catch(() => {}); // nobody awaiting it is not an error
    /** Resolves with the first subscribe reply; rejects if the server refuses. */
    this.ready = this._ready.promise;
  }

  /** The last offset/epoch this subscription saw, or null before the first reply. */
  get position() {
    return this._offset === null ? null : { offset: this._offset, epoch: this._epoch };
  }

  /** Publish to this channel: resolves with `{offset}`. */
  publish(data) {
    return this.client._request({ type: 'publish', channel: this.channel, data }, this);
  }

  /** Read stored messages: resolves with `{messages, offset, epoch}`, oldest first. */
  history(options = {}) {
    return this.client.history(this.channel, options, this);
  }

  /** Who is subscribed: resolves with `{clients: {id: {user, info}}}`. */
  presence() {
    return this.client._request({ type: 'presence', channel: this.channel }, this);
  }

  /** Stop the subscription. Pending commands made on it are rejected. */
  unsubscribe() {
    return this.client._unsubscribe(this);
  }

  _subscribeCommand() {
    const cmd = { type: 'subscribe', channel: this.channel };
    if (this._info !== undefined) cmd.info = this._info;
    if (this._token !== undefined) cmd.token = this._token;
    if (this._offset !== null && this._epoch !== null) {
      cmd.since = { offset: this._offset, epoch: this._epoch };
    }
    return cmd;
  }

  _markReady(result) {
    this.state = 'subscribed';
    if (!this._everSubscribed) {
      this._everSubscribed = true;
      this._ready.resolve(result);
    }
  }

  _onSubscribed(result, since) {
    this._markReady(result);
    if (since && result.recovered) {
      // The missed messages follow as pushes; keep our offset so that they
      // (and only they) pass the duplicate check.
      if (result.epoch !== undefined) this._epoch = result.epoch;
    } else {
      this._offset = typeof result.offset === 'number' ? result.offset : this._offset;
      this._epoch = result.epoch ?? this._epoch;
    }
    this._emit('subscribed', result);
    if (since) {
      const info = { since, offset: result.offset, epoch: result.epoch };
      if (result.recovered) {
        this._emit('recovered', { ...info, missed: Math.max(0, result.offset - since.offset) });
      } else {
        this._emit('lost', info);
      }
    }
  }

  /**
   * The server subscribed us (a `subscribed` push). It made the subscription
   * without our `since`, so it replays nothing: returns the gap to fill from
   * history, `{since, offset, epoch}`, or null when there is none to fill.
   */
  _onGranted(result) {
    this.server = true;
    this._fill = null;
    const since = this._offset !== null && this._epoch !== null ? this.position : null;
    this._markReady(result);
    this._emit('subscribed', result);
    const info = { since, offset: result.offset, epoch: result.epoch };
    if (since === null || typeof result.offset !== 'number') {
      this._offset = typeof result.offset === 'number' ? result.offset : this._offset;
      this._epoch = result.epoch ?? this._epoch;
      return null;
    }
    if (result.epoch !== since.epoch) {
      this._offset = result.offset;
      this._epoch = result.epoch;
      this._emit('lost', info);
      return null;
    }
    if (result.offset <= since.offset) {
      this._emit('recovered', { ...info, missed: 0 });
      return null;
    }
    return info;
  }

  /** Returns false when the message is a duplicate and must not be delivered. */
  _accept(msg) {
    if (typeof msg.offset !== 'number') return true;
    const sameEpoch = msg.epoch === undefined || this._epoch === null || msg.epoch === this._epoch;
    if (sameEpoch && this._offset !== null && msg.offset <= this._offset) return false;
    this._offset = msg.offset;
    if (msg.epoch !== undefined) this._epoch = msg.epoch;
    return true;
  }

  _end(error, reason) {
    if (this.state === 'unsubscribed') return;
    this.state = 'unsubscribed';
    this._fill = null;
    if (!this._everSubscribed) this._ready.reject(error);
    this._emit('unsubscribed', { reason: reason || error.code });
  }
}

// ---------------------------------------------------------------- client

/**
 * A connection to a Plexus server that reconnects by itself.
 * Events: 'state' (state, previous), 'message' (push), 'error' (PlexusError),
 * 'retry' ({attempt, delay}) when a reconnect is scheduled, 'subscribed'
 * (subscription, result) when the server made a subscription the app had not
 * asked for (before any of its messages).
 */
/**
 * The SSE transport seen as a WebSocket: the same `send`, `close`, `onmessage`
 * and `onclose`, so the client runs unchanged over it. The server's frames
 * come on a `text/event-stream` (`GET /sse`), one `data:` event each; commands
 * go out as `POST /emulation`, batched and in order (one POST at a time). The
 * stream is read with `fetch` rather than `EventSource`, which would reconnect
 * by itself and hides the server's `: ping` comments (the heartbeat).
 */
class SseSocket {
  constructor(url, fetchImpl) {
    this.readyState = 0;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    this.onping = null;
    this._fetch = fetchImpl;
    this._abort = typeof AbortController === 'function' ? new AbortController() : null;
    this._base = url.replace(/\/sse(\?.*)?$/, '');
    this._session = null;
    this._node = null;
    this._outbox = [];
    this._posting = false;
    this._done = false;
    this._closeCode = 0;
    this._closeReason = '';
    this._read(url);
  }

  async _read(url) {
    let response;
    try {
      response = await this._fetch(url, {
        headers: { Accept: 'text/event-stream' },
        signal: this._abort ? this._abort.signal : undefined,
        cache: 'no-store',
      });
    } catch {
      this._finish(1006, 'event stream unreachable');
      return;
    }
    if (!response.ok || !response.body) {
      this._finish(1006, `event stream refused: HTTP ${response.status}`);
      return;
    }
    this.readyState = 1;
    if (this.onopen) this.onopen({});
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          this._event(block);
        }
      }
    } catch {
      // aborted or cut: the stream is over either way
    }
    this._finish(this._closeCode || 1006, this._closeReason || 'event stream ended');
  }

  _event(block) {
    const data = [];
    let comment = false;
    for (const line of block.split('\n')) {
      if (line.startsWith('data:')) data.push(line.slice(line[5] === ' ' ? 6 : 5));
      else if (line.startsWith(':')) comment = true;
    }
    if (data.length === 0) {
      if (comment && this.onping) this.onping();
      return;
    }
    const text = data.join('\n');
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (msg && msg.type === 'close') {
      // The server ends the stream after this: it carries the close code.
      this._closeCode = msg.code;
      this._closeReason = msg.reason || '';
      return;
    }
    if (msg && msg.type === 'welcome') {
      this._session = msg.session;
      this._node = msg.node;
    }
    if (this.onmessage) this.onmessage({ data: text });
  }

  send(text) {
    if (this._done) throw new Error('the event stream is closed');
    this._outbox.push(JSON.parse(text));
    if (!this._posting) {
      // Started on the next microtask: what is sent in the same tick goes in one POST.
      this._posting = true;
      queueMicrotask(() => this._post());
    }
  }

  async _post() {
    while (this._outbox.length && !this._done) {
      const commands = this._outbox.splice(0);
      try {
        const response = await this._fetch(this._base + '/emulation', {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ session: this._session, node: this._node, commands }),
        });
        if (response.status !== 204) {
          // The session is gone (404) or the commands were refused: this
          // connection cannot go on; the client reconnects and recovers.
          this.close(4000, `emulation refused: HTTP ${response.status}`);
        }
      } catch {
        this.close(1006, 'emulation unreachable');
      }
    }
    this._posting = false;
  }

  close(code = 1000, reason = '') {
    if (this._done) return;
    if (this._abort) this._abort.abort();
    this._finish(code, reason);
  }

  _finish(code, reason) {
    if (this._done) return;
    this._done = true;
    this.readyState = 3;
    if (this.onclose) this.onclose({ code, reason });
  }
}

function sseUrl(url) {
  return url.replace(/^ws(s?):/, 'http$1:').replace(/\/ws(\?|$)/, '/sse$1');
}

export class Plexus extends Emitter {
  /**
   * @param {string} [url] `ws://host:port/ws` (http(s) URLs and, in a page,
   *   paths like '/ws' are accepted; defaults to the page's own server).
   * @param {object} [options] see README.md
   */
  constructor(url, options = {}) {
    super();
    this.url = normalizeUrl(url);
    this.options = { ...DEFAULTS, ...options };
    this.options.backoff = { ...DEFAULT_BACKOFF, ...(options.backoff || {}) };
    const clock = options.clock || {};
    this._clock = {
      now: clock.now || (() => Date.now()),
      setTimeout: clock.setTimeout || ((fn, ms) => setTimeout(fn, ms)),
      clearTimeout: clock.clearTimeout || ((id) => clearTimeout(id)),
      random: clock.random || (() => Math.random()),
    };
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._fetch = options.fetch || (typeof fetch === 'function' ? fetch.bind(globalThis) : null);
    /** 'websocket' | 'sse' | null: the transport of the current (or last) connection. */
    this.transport = null;
    this._fallback = false; // the next attempt uses SSE (the WebSocket did not open)
    // A WebSocket was welcomed before, and how many have closed before `welcome`
    // since: a server restarting is not a proxy breaking upgrades.
    this._wsWorked = false;
    this._wsFailures = 0;
    this._welcomed = false; // the current socket got its `welcome`
    this._token = options.token || null;
    this._getToken = options.getToken || null;
    this._maxExplicit = options.maxMessageSize !== undefined;
    this._serverMax = null; // `max_message_size` from welcome, if the server tells

    /** 'connecting' | 'connected' | 'reconnecting' | 'closed' */
    this.state = 'closed';
    /** The last `welcome` message, with `client` (this connection's id) and `user`. */
    this.welcome = null;
    /** Clock time of the next scheduled reconnect attempt, or null. */
    this.retryAt = null;

    this._ws = null;
    this._gen = 0; // bumped per socket; events of older sockets are ignored
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, timer, sub, subscribe?}
    this._queue = []; // [{cmd, sub, resolve, reject}] not sent yet
    this._subs = new Map(); // channel -> Subscription
    this._attempt = 0;
    this._refreshToken = false;
    this._stopped = false; // close() or a terminal close code: no reconnecting, no queueing
    this._waiters = []; // connect() promises
    this._timers = { retry: null, connect: null, idle: null, pong: null, stable: null, refresh: null };
    this._lastRx = 0;
    this._onWake = () => this.retryNow();
    this._onVisibility = () => {
      if (typeof document !== 'undefined' && document.visibilityState === 'visible') this.retryNow();
    };
  }

  // ------------------------------------------------------------ public API

  /** This connection's client id (from `welcome`), or null. */
  get clientId() {
    return this.welcome ? this.welcome.client : null;
  }

  /** The authenticated user (JWT `sub`), or null. */
  get user() {
    return this.welcome ? this.welcome.user : null;
  }

  /**
   * The largest message this client sends (UTF-8 bytes; 0 = no limit): the
   * `maxMessageSize` option if given, else the server's `max_message_size`
   * from `welcome` if it sent one, else 64 KiB, the protocol's default.
   */
  get maxMessageSize() {
    if (this._maxExplicit || this._serverMax === null) return this.options.maxMessageSize;
    return this._serverMax;
  }

  /**
   * Open the connection. Resolves with the `welcome` message once connected;
   * failed attempts are retried with backoff meanwhile. Rejects only when the
   * client stops for good: `close()`, or close code 4001 (unauthorized).
   */
  connect() {
    if (this.state === 'connected') return Promise.resolve(this.welcome);
    const waiter = defer();
    // Failures also reach 'error' handlers: fire-and-forget `connect()` is fine.
    waiter.promise.catch(() => {});
    this._waiters.push(waiter);
    if (this.state === 'closed') {
      this._stopped = false;
      this._attempt = 0;
      this._listenWake(true);
      this._setState('connecting');
      this._open();
    }
    return waiter.promise;
  }

  /**
   * Subscribe to a channel. Returns the Subscription at once; `await sub.ready`
   * for the reply. Commands made on it before then are sent after the
   * subscribe, in order. Subscribing to a channel twice returns the existing
   * subscription (the new options are ignored).
   * @param {string} channel
   * @param {{info?: any, token?: string, since?: {offset: number, epoch: string}}} [options]
   */
  subscribe(channel, options = {}) {
    if (typeof channel !== 'string' || channel === '') throw new TypeError('channel must be a non-empty string');
    const existing = this._subs.get(channel);
    if (existing) return existing;
    const sub = new Subscription(this, channel, options);
    this._subs.set(channel, sub);
    if (this.state === 'connected') this._sendSubscribe(sub);
    return sub;
  }

  /** The live subscription to a channel, or undefined. */
  getSubscription(channel) {
    return this._subs.get(channel);
  }

  /** Publish without subscribing: resolves with `{offset}`. */
  publish(channel, data) {
    return this._request({ type: 'publish', channel, data }, null);
  }

  /**
   * Stored messages of a channel, oldest first: resolves with
   * `{messages, offset, epoch}`.
   * @param {{limit?: number, since?: {offset: number, epoch: string}}} [options]
   */
  history(channel, options = {}, sub = null) {
    const cmd = { type: 'history', channel };
    if (options.limit !== undefined) cmd.limit = options.limit;
    if (options.since !== undefined) cmd.since = options.since;
    return this._request(cmd, sub);
  }

  /** Who is subscribed to a channel: resolves with `{clients}`. */
  presence(channel) {
    return this._request({ type: 'presence', channel }, null);
  }

  /** Call an application method: resolves with the reply result, `{data}`. */
  rpc(method, data = null) {
    return this._request({ type: 'rpc', method, data }, null);
  }

  /**
   * Use a new connection token: for later connects, and sent with `auth` now
   * when connected (resolves with `{user}`).
   */
  setToken(token) {
    this._token = token || null;
    if (this.state !== 'connected') return Promise.resolve(null);
    const gen = this._gen;
    return this._request({ type: 'auth', token }, null).then((result) => {
      if (gen === this._gen && this._token === (token || null)) this._armRefresh();
      return result;
    });
  }

  /** If a reconnect is waiting for its backoff delay, try now. */
  retryNow() {
    if (this.state === 'reconnecting' && this._timers.retry !== null) {
      this._clear('retry');
      this.retryAt = null;
      this._open();
    }
  }

  /** Close for good: no reconnecting; pending requests reject with 'disconnected'. */
  close() {
    if (this.state === 'closed' && this._stopped) return;
    this._stop(new PlexusError('disconnected', 'client closed'));
    this._setState('closed');
  }

  // ------------------------------------------------------------ connection

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._emit('state', state, previous);
  }

  _clear(name) {
    if (this._timers[name] !== null) {
      this._clock.clearTimeout(this._timers[name]);
      this._timers[name] = null;
    }
  }

  _later(name, ms, fn) {
    this._clear(name);
    this._timers[name] = this._clock.setTimeout(() => {
      this._timers[name] = null;
      fn();
    }, ms);
  }

  _listenWake(on) {
    const method = on ? 'addEventListener' : 'removeEventListener';
    if (typeof window !== 'undefined' && typeof window[method] === 'function') {
      window[method]('online', this._onWake);
    }
    if (typeof document !== 'undefined' && typeof document[method] === 'function') {
      document[method]('visibilitychange', this._onVisibility);
    }
  }

  async _open() {
    const gen = ++this._gen;
    if ((this._refreshToken || !this._token) && this._getToken) {
      try {
        const token = await this._getToken();
        if (gen !== this._gen || this._stopped) return;
        this._token = token || null;
        this._refreshToken = false;
      } catch (err) {
        if (gen !== this._gen || this._stopped) return;
        this._emit('error', asError(err, 'token_error'));
        this._setState('reconnecting');
        this._scheduleReconnect(this._backoffDelay());
        return;
      }
    }
    let url = this.url;
    if (this._token) {
      url += (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(this._token);
    }
    const transports = this.options.transports;
    const useSse =
      transports.includes('sse') &&
      (!transports.includes('websocket') || this._fallback || !this._WebSocket);
    let ws;
    try {
      if (useSse) {
        if (!this._fetch) throw new PlexusError('disconnected', 'no fetch implementation: pass options.fetch');
        ws = new SseSocket(sseUrl(url), this._fetch);
        ws.onping = () => {
          if (gen === this._gen) this._lastRx = this._clock.now();
        };
      } else {
        if (!this._WebSocket) throw new PlexusError('disconnected', 'no WebSocket implementation: pass options.WebSocket');
        ws = new this._WebSocket(url);
      }
    } catch (err) {
      this._emit('error', asError(err, 'disconnected'));
      this._onSocketClosed(gen, 1006, String(err && err.message));
      return;
    }
    this.transport = useSse ? 'sse' : 'websocket';
    this._welcomed = false;
    this._ws = ws;
    ws.onmessage = (ev) => {
      if (gen === this._gen) this._onFrame(ev.data);
    };
    ws.onclose = (ev) => this._onSocketClosed(gen, ev.code, ev.reason);
    ws.onerror = () => {}; // a close event follows; 'ws' throws on unhandled errors
    // A socket that never opens (or never says welcome) is treated as dead.
    this._later('connect', this.options.requestTimeout, () => this._abandon(gen, 'connect timeout'));
  }

  /** Give up on the current socket at once (no waiting for its close handshake). */
  _abandon(gen, reason) {
    if (gen !== this._gen || !this._ws) return;
    const ws = this._ws;
    try {
      ws.close(4000, reason.slice(0, 100));
    } catch {
      // already closing
    }
    this._onSocketClosed(gen, 1006, reason);
  }

  _onSocketClosed(gen, code, reason) {
    if (gen !== this._gen) return;
    this._gen++; // later events of this socket are ignored
    // A WebSocket that closed before `welcome` looks like a blocked upgrade:
    // the next attempt (at once) is over SSE. A connection that ran, whatever
    // its transport, is followed by a WebSocket attempt again. Once a
    // WebSocket worked here, a failed one is more likely a server restarting
    // or a network outage: it takes WS_FAILURES in a row to fall back.
    const failedOpen = this.transport === 'websocket' && !this._welcomed && !this._stopped;
    if (failedOpen) this._wsFailures++;
    const blocked = failedOpen && (!this._wsWorked || this._wsFailures >= WS_FAILURES);
    const canFallBack = this.options.transports.includes('sse');
    this._fallback = blocked && canFallBack;
    this._ws = null;
    this.welcome = null;
    for (const name of ['connect', 'idle', 'pong', 'stable', 'refresh']) this._clear(name);
    for (const sub of this._subs.values()) {
      if (sub.state === 'subscribed') sub.state = 'subscribing';
      // A gap fill in progress is dropped with what it held: nothing of it was
      // delivered, so the next connection asks again from the same position.
      sub._fill = null;
    }
    const lost = new PlexusError('disconnected', `connection closed (${code}${reason ? ' ' + reason : ''})`);
    this._failPending(lost);
    if (this._stopped) return;

    if (code === 4001) {
      this._terminate(new PlexusError('unauthorized', reason || 'unauthorized (4001)'));
      return;
    }
    if (code === 4002) {
      if (!this._getToken) {
        this._terminate(new PlexusError('token_expired', reason || 'token expired (4002) and no getToken'));
        return;
      }
      this._refreshToken = true;
    }
    let delay = this._backoffDelay();
    if (code === 4029) delay += this.options.rateLimitDelay;
    if (this._fallback && code === 1006) delay = 0; // straight to the other transport
    this._setState('reconnecting');
    this._scheduleReconnect(delay);
  }

  _backoffDelay() {
    const { initial, max } = this.options.backoff;
    const cap = Math.min(max, initial * 2 ** Math.min(this._attempt, 30));
    return Math.floor(this._clock.random() * cap); // full jitter
  }

  _scheduleReconnect(delay) {
    this._attempt++;
    this.retryAt = this._clock.now() + delay;
    this._emit('retry', { attempt: this._attempt, delay });
    this._later('retry', delay, () => {
      this.retryAt = null;
      this._open();
    });
  }

  _terminate(error) {
    this._stop(error);
    this._setState('closed');
    this._emit('error', error);
  }

  _stop(error) {
    this._stopped = true;
    this._gen++;
    for (const name of Object.keys(this._timers)) this._clear(name);
    this.retryAt = null;
    this._listenWake(false);
    const ws = this._ws;
    this._ws = null;
    this.welcome = null;
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        // already closed
      }
    }
    const gone = new PlexusError('disconnected', error.message);
    this._failPending(gone);
    const queue = this._queue;
    this._queue = [];
    for (const item of queue) item.reject(gone);
    const subs = [...this._subs.values()];
    this._subs.clear();
    for (const sub of subs) sub._end(gone, 'closed');
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) w.reject(error);
  }

  _failPending(error) {
    const pending = this._pending;
    this._pending = new Map();
    for (const entry of pending.values()) {
      this._clock.clearTimeout(entry.timer);
      if (!entry.subscribe) entry.reject(error); // subscribes are redone on reconnect
    }
  }

  // ------------------------------------------------------------ receiving

  _onFrame(raw) {
    if (typeof raw !== 'string') return; // JSON only: we never ask for msgpack
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      return;
    }
    if (msg === null || typeof msg !== 'object') return;
    this._lastRx = this._clock.now();
    if (this._timers.pong !== null) {
      // Anything received (the pong or not) proves the connection is alive.
      this._clear('pong');
      this._armIdle();
    }
    switch (msg.type) {
      case 'welcome':
        this._onWelcome(msg);
        break;
      case 'reply':
      case 'error':
        this._onAnswer(msg);
        break;
      case 'pong':
        // Answers our own ping; only the resubscribe barrier waits for one.
        if (msg.id !== undefined && msg.id !== null) this._onAnswer(msg);
        break;
      case 'subscribed':
        this._onGranted(msg);
        break;
      case 'message':
        this._onMessage(decodeBytes(msg));
        break;
      case 'join':
      case 'leave': {
        const sub = this._subs.get(msg.channel);
        if (sub) sub._emit(msg.type, decodeBytes(msg));
        break;
      }
      case 'unsubscribed': {
        const sub = this._subs.get(msg.channel);
        if (sub && msg.resubscribe) {
          // The server could no longer promise a gap-free stream and ended
          // the subscription: subscribe again at once from the last offset
          // seen, on the same Subscription ('recovered' or 'lost' follows).
          sub._fill = null;
          this._sendSubscribe(sub);
        } else if (sub) {
          this._subs.delete(msg.channel);
          this._rejectQueued(sub, new PlexusError('not_subscribed', msg.reason || 'unsubscribed by the server'));
          sub._end(new PlexusError('not_subscribed', msg.reason || 'unsubscribed'), msg.reason || 'server');
        }
        break;
      }
      default:
        break; // 'pong' and anything newer than this client
    }
  }

  _onWelcome(msg) {
    this._welcomed = true;
    if (this.transport === 'websocket') {
      this._wsWorked = true;
      this._wsFailures = 0;
    }
    this._clear('connect');
    this._lastRx = this._clock.now();
    this.welcome = msg;
    if (Number.isInteger(msg.max_message_size) && msg.max_message_size > 0) this._serverMax = msg.max_message_size;
    this._setState('connected');
    this._later('stable', this.options.backoff.resetAfter, () => {
      this._attempt = 0;
    });
    this._armIdle();
    this._armRefresh();
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) w.resolve(msg);
    if (this.state !== 'connected') return; // a handler closed us
    const granted = [];
    for (const sub of this._subs.values()) {
      if (sub.server) granted.push(sub);
      else this._sendSubscribe(sub);
    }
    if (granted.length > 0) {
      // The server may subscribe this connection again by itself (e.g. from
      // the token's `channels` claim): it does so right after `welcome`,
      // before it reads our first command. So the answer to a ping tells
      // which ones it did; only the others need our subscribe, and none of
      // ours is refused with `already_subscribed` (a bad command).
      const gen = this._gen;
      this._send({ type: 'ping' }, null, {
        resolve: () => {
          if (gen !== this._gen) return;
          for (const sub of granted) {
            if (sub.state === 'subscribing' && this._subs.get(sub.channel) === sub) this._sendSubscribe(sub);
          }
        },
        reject: () => {},
        onTimeout: () => this._abandon(gen, 'ping timeout'),
      });
    }
    this._flush();
  }

  _onAnswer(msg) {
    if (msg.id === undefined || msg.id === null) {
      // We always send ids: an id-less `already_subscribed` is the server
      // failing to subscribe us by itself to a channel we already hold.
      if (msg.code === 'already_subscribed') return;
      this._emit('error', new PlexusError(msg.code || 'internal', msg.message));
      return;
    }
    const entry = this._pending.get(msg.id);
    if (!entry) return; // timed out already
    this._pending.delete(msg.id);
    this._clock.clearTimeout(entry.timer);
    if (msg.type === 'error') entry.reject(new PlexusError(msg.code || 'internal', msg.message));
    else entry.resolve(decodeBytes(msg.result ?? {})); // a reply, or the pong to our ping
  }

  _onMessage(msg) {
    const sub = this._subs.get(msg.channel);
    if (!sub) return;
    if (sub._fill) {
      sub._fill.held.push(msg); // after the gap, which is still being fetched
      return;
    }
    this._deliver(sub, msg);
  }

  _deliver(sub, msg) {
    if (!sub._accept(msg)) return;
    sub._emit('message', msg);
    this._emit('message', msg);
  }

  /** A `subscribed` push: the server subscribed this connection by itself. */
  _onGranted(msg) {
    const channel = msg.channel;
    if (typeof channel !== 'string') return;
    const result = { channel, offset: msg.offset, epoch: msg.epoch, recovered: !!msg.recovered };
    let sub = this._subs.get(channel);
    if (!sub) {
      sub = new Subscription(this, channel, {});
      this._subs.set(channel, sub);
      // Before any of its messages: handlers added here miss nothing.
      this._emit('subscribed', sub, result);
      if (this._subs.get(channel) !== sub || sub.state === 'unsubscribed') return; // a handler dropped it
    }
    const gap = sub._onGranted(result);
    if (gap !== null && sub.state === 'subscribed') {
      sub._fill = { ...gap, got: [], held: [] };
      this._fetchGap(sub, sub._fill);
    }
    this._flush();
  }

  // A server-made subscription starts at the channel's current offset; what
  // came between our last offset and it is read with `history`, delivered
  // before the live messages held meanwhile, each offset once.
  _fetchGap(sub, fill) {
    const last = fill.got.length > 0 ? fill.got[fill.got.length - 1].offset : fill.since.offset;
    const limit = Math.min(HISTORY_PAGE, fill.offset - last);
    const since = { offset: last, epoch: fill.since.epoch };
    this._send({ type: 'history', channel: sub.channel, since, limit }, null, {
      resolve: (page) => {
        if (sub._fill === fill) this._onGapPage(sub, fill, page, last, limit);
      },
      reject: () => {
        if (sub._fill === fill) this._endGap(sub, fill, false);
      },
    });
  }

  _onGapPage(sub, fill, page, last, limit) {
    const messages = Array.isArray(page.messages) ? page.messages : [];
    if (page.epoch !== undefined && page.epoch !== fill.since.epoch) {
      this._endGap(sub, fill, false); // the stream restarted: what we missed is gone
      return;
    }
    let expected = last + 1;
    for (const msg of messages) {
      if (typeof msg.offset !== 'number' || msg.offset < expected) continue;
      if (msg.offset !== expected) {
        this._endGap(sub, fill, false); // trimmed from history
        return;
      }
      fill.got.push({ ...msg, channel: sub.channel, epoch: msg.epoch ?? fill.since.epoch });
      expected++;
    }
    if (expected > fill.offset) this._endGap(sub, fill, true);
    else if (messages.length >= limit && messages.length > 0) this._fetchGap(sub, fill);
    else this._endGap(sub, fill, false);
  }

  _endGap(sub, fill, complete) {
    sub._fill = null;
    const info = { since: fill.since, offset: fill.offset, epoch: fill.epoch };
    if (complete) {
      sub._emit('recovered', { ...info, missed: fill.offset - fill.since.offset });
      for (const msg of fill.got) this._deliver(sub, msg);
    } else {
      sub._offset = fill.offset;
      sub._epoch = fill.epoch;
      sub._emit('lost', info);
    }
    for (const msg of fill.held) {
      if (sub._fill !== null || this._subs.get(sub.channel) !== sub) return; // a handler changed it
      this._deliver(sub, msg);
    }
  }

  // ------------------------------------------------------------ token refresh

  // With `getToken` and a token that expires, a new token is asked for and
  // sent with `auth` before the server would close the connection with 4002:
  // `refreshBefore` ms ahead, or halfway for a token that lives less long.
  _armRefresh() {
    this._clear('refresh');
    if (!this._getToken || this.state !== 'connected') return;
    const exp = tokenExpiry(this._token);
    if (exp === null) return;
    const left = exp * 1000 - this._clock.now();
    const delay = Math.max(0, left - Math.min(this.options.refreshBefore, left / 2));
    const gen = this._gen;
    this._later('refresh', delay, () => this._refresh(gen));
  }

  async _refresh(gen) {
    const old = tokenExpiry(this._token);
    let token;
    try {
      token = await this._getToken();
    } catch (err) {
      // Not fatal yet: at expiry the server closes with 4002, and the
      // reconnect asks getToken again.
      if (gen === this._gen && !this._stopped) this._emit('error', asError(err, 'token_error'));
      return;
    }
    if (gen !== this._gen || this._stopped || !token) return;
    const exp = tokenExpiry(token);
    // The same (or an older) expiry gains nothing, and asking again at once would spin.
    if (old !== null && (exp === null || exp <= old)) return;
    this._token = token;
    this._request({ type: 'auth', token }, null).then(
      () => {
        if (gen === this._gen && this._token === token) this._armRefresh();
      },
      (err) => {
        if (gen === this._gen && !this._stopped) this._emit('error', err);
      },
    );
  }

  // ------------------------------------------------------------ heartbeat

  _armIdle() {
    this._later('idle', this.options.pingAfter, () => this._idle());
  }

  _idle() {
    const gen = this._gen;
    const idleFor = this._clock.now() - this._lastRx;
    if (idleFor < this.options.pingAfter) {
      this._later('idle', this.options.pingAfter - idleFor, () => this._idle());
      return;
    }
    this._sendRaw({ type: 'ping', id: this._nextId++ });
    this._later('pong', this.options.pongTimeout, () => this._abandon(gen, 'ping timeout'));
  }

  // ------------------------------------------------------------ sending

  _sendRaw(obj) {
    const ws = this._ws;
    if (!ws) return false;
    try {
      ws.send(JSON.stringify(obj));
      return true;
    } catch {
      return false; // the close event will follow
    }
  }

  _sendSubscribe(sub) {
    const cmd = sub._subscribeCommand();
    const since = cmd.since || null;
    sub.state = 'subscribing';
    this._send(cmd, null, {
      subscribe: true,
      resolve: (result) => {
        if (sub.state !== 'subscribing' || this._subs.get(sub.channel) !== sub) return;
        sub._onSubscribed(result, since);
        this._flush();
      },
      reject: (err) => {
        // The server subscribed us by itself first (a `subscribed` push came
        // before this answer): that subscription is ours, nothing failed.
        if (err.code === 'already_subscribed' && sub.state === 'subscribed') return;
        if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
        this._rejectQueued(sub, err);
        sub._emit('error', err);
        sub._end(err, err.code);
      },
      onTimeout: () => this._abandon(this._gen, 'subscribe timeout'),
    });
  }

  /** Send a command with an id now; `handlers` get its answer. */
  _send(cmd, sub, handlers) {
    const id = this._nextId++;
    const timer = this._clock.setTimeout(() => {
      if (!this._pending.has(id)) return;
      this._pending.delete(id);
      if (handlers.onTimeout) handlers.onTimeout();
      else handlers.reject(new PlexusError('timeout', `no answer to ${cmd.type} in ${this.options.requestTimeout} ms`));
    }, this.options.requestTimeout);
    this._pending.set(id, { ...handlers, timer, sub });
    if (!this._sendRaw({ ...cmd, id })) {
      // No socket after all: the close handler rejects it.
    }
  }

  _encode(cmd) {
    if (!('data' in cmd)) return cmd;
    const out = { ...cmd, data: encodeBytes(cmd.data) };
    const max = this.maxMessageSize;
    if (max > 0) {
      const size = utf8Length(JSON.stringify({ ...out, id: 2 ** 40 }), max);
      if (size > max) {
        throw new PlexusError('too_large', `message of ${size} bytes is over maxMessageSize (${max})`);
      }
    }
    return out;
  }

  _canSend(sub) {
    return this.state === 'connected' && this._ws !== null && (!sub || sub.state === 'subscribed');
  }

  /** Every request goes through here: send now, queue, or reject. */
  _request(cmd, sub) {
    return new Promise((resolve, reject) => {
      let encoded;
      try {
        encoded = this._encode(cmd);
      } catch (err) {
        reject(err);
        return;
      }
      if (sub && sub.state === 'unsubscribed') {
        reject(new PlexusError('not_subscribed', `not subscribed to ${sub.channel}`));
        return;
      }
      if (this._canSend(sub)) {
        this._send(encoded, sub, { resolve, reject });
        return;
      }
      const connected = this.state === 'connected';
      if (this._stopped || (!connected && !this.options.queueWhileDisconnected)) {
        reject(new PlexusError('disconnected', 'not connected'));
        return;
      }
      if (this._queue.length >= this.options.queueLimit) {
        reject(new PlexusError('queue_full', `${this._queue.length} commands already wait for the connection`));
        return;
      }
      this._queue.push({ cmd: encoded, sub, resolve, reject });
    });
  }

  _flush() {
    if (this.state !== 'connected') return;
    const waiting = this._queue;
    this._queue = [];
    for (const item of waiting) {
      if (this._canSend(item.sub)) this._send(item.cmd, item.sub, item);
      else this._queue.push(item); // its subscription is not ready yet
    }
  }

  _rejectQueued(sub, error) {
    const keep = [];
    for (const item of this._queue) {
      if (item.sub === sub) item.reject(error);
      else keep.push(item);
    }
    this._queue = keep;
  }

  _unsubscribe(sub) {
    if (sub.state === 'unsubscribed') return Promise.resolve({});
    const wasSent = this.state === 'connected';
    if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
    const error = new PlexusError('not_subscribed', 'unsubscribed');
    this._rejectQueued(sub, error);
    sub._end(error, 'unsubscribe');
    if (!wasSent) return Promise.resolve({});
    return new Promise((resolve) => {
      // The server may already have dropped it: either way we are unsubscribed.
      this._send({ type: 'unsubscribe', channel: sub.channel }, null, { resolve, reject: () => resolve({}) });
    });
  }
}

function asError(err, code) {
  if (err instanceof PlexusError) return err;
  const e = new PlexusError(code, err && err.message ? err.message : String(err));
  e.cause = err;
  return e;
}

Plexus.VERSION = VERSION;
Plexus.PlexusError = PlexusError;

export default Plexus;
