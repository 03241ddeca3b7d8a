// End to end: plexus.js (with the `ws` package) against a real `plexus serve`.
// Skipped when the repository's Python venv (../../.venv) is not there.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import { Plexus } from '../plexus.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const PYTHON = process.env.PLEXUS_PYTHON || join(ROOT, '.venv', 'bin', 'python');
const skip = existsSync(PYTHON) ? false : `no Python venv at ${PYTHON} (make install)`;
const SECRET = 'test-secret-that-is-long-enough-for-hs256';
const WAIT = 10000;

const TEST_RPC_SERVER = fileURLToPath(new URL('./helpers/serve_with_test_rpc.py', import.meta.url));

/** A `plexus serve` child process on a loopback port (or `script`, given the port). */
class Server {
  constructor(dataDir, port = 0, script = null) {
    this.dataDir = dataDir;
    this.port = port;
    this.script = script;
    this.proc = null;
  }

  start() {
    return new Promise((resolve, reject) => {
      const env = { ...process.env, PLEXUS_DATA_DIR: this.dataDir, PLEXUS_JWT_SECRET: SECRET, PLEXUS_LOG_LEVEL: 'info' };
      const args = this.script ? [this.script, String(this.port)] : ['-m', 'plexus', 'serve', '--port', String(this.port)];
      const proc = spawn(PYTHON, args, { cwd: ROOT, env });
      this.proc = proc;
      let output = '';
      const timer = setTimeout(() => reject(new Error(`server did not start:\n${output}`)), WAIT);
      const onData = (chunk) => {
        output += chunk;
        const match = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(output);
        if (match) {
          clearTimeout(timer);
          this.port = Number(match[1]);
          resolve(this);
        }
      };
      proc.stdout.setEncoding('utf8').on('data', onData);
      proc.stderr.setEncoding('utf8').on('data', onData);
      proc.on('exit', () => {
        clearTimeout(timer);
        reject(new Error(`server exited:\n${output}`));
      });
    });
  }

  stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null) return Promise.resolve();
    return new Promise((resolve) => {
      proc.on('exit', resolve);
      proc.kill('SIGTERM');
    });
  }

  get ws() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  async publish(channel, data) {
    const res = await fetch(`http://127.0.0.1:${this.port}/api/publish`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ channel, data }),
    });
    assert.equal(res.status, 200);
    return res.json();
  }
}

function jwt(claims) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64(claims);
  const sig = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** Resolve when `predicate()` holds, checked on each event of `emitter`. */
function until(emitter, event, predicate) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting on '${event}'`)), WAIT);
    const off = emitter.on(event, (...args) => {
      if (predicate(...args)) {
        clearTimeout(timer);
        off();
        resolve(args);
      }
    });
  });
}

/** Resolve when `predicate()` holds (polled: for state that may already be reached). */
async function eventually(predicate, what = 'condition') {
  const deadline = Date.now() + WAIT;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

let dataDir;
let server;
const clients = [];

function client(options = {}) {
  const px = new Plexus(server.ws, { WebSocket, backoff: { initial: 100, max: 500 }, ...options });
  clients.push(px);
  return px;
}

before(async () => {
  if (skip) return;
  dataDir = mkdtempSync(join(tmpdir(), 'plexus-js-'));
  server = await new Server(dataDir).start();
});

after(async () => {
  for (const px of clients) px.close();
  if (server) await server.stop();
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

test('two clients: publish, bytes and unicode round trip, presence, history', { skip, timeout: 20000 }, async () => {
  const a = client();
  const b = client();
  await Promise.all([a.connect(), b.connect()]);
  const sa = a.subscribe('chat:node-e2e', { info: { nick: 'ann' } });
  const sb = b.subscribe('chat:node-e2e', { info: { nick: 'bo' } });
  await Promise.all([sa.ready, sb.ready]);
  const got = until(sb, 'message', () => true);
  const own = until(sa, 'message', () => true);
  const bytes = new Uint8Array([0, 1, 2, 254, 255]);
  const { offset } = await sa.publish({ kind: 'image', text: '你好世界 👋🏽', bytes });
  const [[msg], [mine]] = await Promise.all([got, own]);
  assert.equal(msg.offset, offset);
  assert.equal(msg.data.text, '你好世界 👋🏽');
  assert.ok(msg.data.bytes instanceof Uint8Array);
  assert.deepEqual([...msg.data.bytes], [...bytes]);
  assert.equal(msg.from.client, a.clientId);
  assert.equal(mine.offset, offset, 'the publisher gets its own message');

  const { clients: present } = await sb.presence();
  const nicks = Object.values(present).map((c) => c.info.nick).sort();
  assert.deepEqual(nicks, ['ann', 'bo']);

  const page = await sb.history({ limit: 10 });
  assert.equal(page.messages.at(-1).offset, offset);
  assert.deepEqual([...page.messages.at(-1).data.bytes], [...bytes]);

  await assert.rejects(a.publish('no-namespace-publish', 1), { code: 'permission_denied' });
  await assert.rejects(a.rpc('no.such.method', {}), { code: 'not_found' });
  await assert.rejects(a.publish('chat:bad channel!', 1), { code: 'invalid_channel' });
});

test('app-level ping is answered with pong; the connection stays up', { skip, timeout: 20000 }, async () => {
  // Several ping rounds, each of which fails unless a pong comes within 500 ms.
  const px = client({ pingAfter: 200, pongTimeout: 500 });
  await px.connect();
  const states = [];
  px.on('state', (s) => states.push(s));
  await new Promise((resolve) => setTimeout(resolve, 2000));
  assert.equal(px.state, 'connected');
  assert.deepEqual(states, []);
});

test('4001: a bad token stops the client; 4002: getToken gives a new one', { skip, timeout: 20000 }, async () => {
  const bad = client({ token: 'not-a-jwt' });
  const refused = bad.connect();
  await assert.rejects(refused, { code: 'unauthorized' });
  assert.equal(bad.state, 'closed');

  const now = Math.floor(Date.now() / 1000);
  let asked = 0;
  const px = client({
    token: jwt({ sub: 'alice', exp: now - 60 }),
    getToken: async () => {
      asked++;
      return jwt({ sub: 'alice', exp: now + 3600 });
    },
  });
  const welcome = await px.connect();
  assert.equal(asked, 1);
  assert.equal(welcome.user, 'alice');
});

test('server restart: resubscribe with since recovers every message once, in order', { skip, timeout: 40000 }, async () => {
  const px = client();
  await px.connect();
  const sub = px.subscribe('chat:node-restart');
  await sub.ready;
  const seen = [];
  sub.on('message', (m) => seen.push([m.offset, m.data]));
  const events = [];
  sub.on('recovered', (e) => events.push(['recovered', e]));
  sub.on('lost', (e) => events.push(['lost', e]));
  px.on('state', (s) => events.push(['state', s]));
  await sub.publish('before');
  await eventually(() => seen.length === 1, 'the first message');

  await server.stop();
  await eventually(() => px.state === 'reconnecting', 'reconnecting');
  server = await new Server(dataDir, server.port).start();
  for (const n of [1, 2, 3]) await server.publish('chat:node-restart', `api ${n}`);
  await eventually(() => seen.length === 4, 'the recovered messages');
  assert.deepEqual(events.map((e) => e[0]), ['state', 'state', 'recovered']);
  const info = events[2][1];
  assert.deepEqual(seen.map(([, d]) => d), ['before', 'api 1', 'api 2', 'api 3']);
  const offsets = seen.map(([o]) => o);
  assert.deepEqual(offsets, [offsets[0], offsets[0] + 1, offsets[0] + 2, offsets[0] + 3]);
  assert.equal(info.since.offset, offsets[0]);
  await sub.publish('after');
  await eventually(() => seen.length === 5, 'a live message after the restart');
});

test('server-side subscriptions (token channels claim): a Subscription, recovered across a restart', { skip, timeout: 40000 }, async () => {
  const channel = 'chat:node-granted';
  const made = [];
  const seen = [];
  const events = [];
  const errors = [];
  // No retry by itself (a long backoff): the test publishes while it is away, then retries.
  const px = client({ token: jwt({ sub: 'alice', channels: [channel] }), backoff: { initial: 600000, max: 600000 } });
  px.on('error', (e) => errors.push(e.code));
  px.on('subscribed', (sub, result) => {
    made.push([sub.channel, result.recovered]);
    sub.on('message', (m) => seen.push([m.offset, m.data]));
    sub.on('recovered', (e) => events.push(['recovered', e]));
    sub.on('lost', (e) => events.push(['lost', e]));
    sub.on('unsubscribed', (e) => events.push(['unsubscribed', e]));
  });
  await px.connect();
  await eventually(() => made.length === 1, "the client 'subscribed' event");
  const sub = px.getSubscription(channel);
  assert.deepEqual(made, [[channel, false]]);
  assert.equal(sub.server, true);
  assert.equal(px.subscribe(channel), sub, 'subscribe() of a server-side subscription is that subscription');
  await sub.ready;
  await server.publish(channel, 'before');
  await eventually(() => seen.length === 1, 'the first message');

  await server.stop();
  await eventually(() => px.state === 'reconnecting', 'reconnecting');
  server = await new Server(dataDir, server.port).start();
  for (const n of [1, 2, 3]) await server.publish(channel, `api ${n}`);
  px.retryNow();
  await eventually(() => seen.length === 4, 'the missed messages');
  // The server subscribed it again (from the token) at its current offset; the
  // three it missed came from history, before anything live.
  assert.deepEqual(events.map(([name, e]) => [name, e.missed]), [['recovered', 3]]);
  await sub.publish('after');
  await eventually(() => seen.length === 5, 'a live message after the restart');
  assert.deepEqual(seen.map(([, d]) => d), ['before', 'api 1', 'api 2', 'api 3', 'after']);
  const offsets = seen.map(([o]) => o);
  assert.deepEqual(offsets, offsets.map((_, i) => offsets[0] + i), 'consecutive offsets, each once');
  assert.equal(made.length, 1, 'the same Subscription after the reconnect');
  assert.equal(px.getSubscription(channel), sub);
  assert.ok(!events.some(([name]) => name === 'lost' || name === 'unsubscribed'), JSON.stringify(events));
  assert.deepEqual(errors, [], 'no already_subscribed (or other) error reached the app');
});

test('insufficient_state from a real server: resubscribed with since, every message once, in order', { skip, timeout: 40000 }, async () => {
  const special = await new Server(dataDir, 0, TEST_RPC_SERVER).start();
  try {
    const channel = 'chat:node-insufficient';
    const px = new Plexus(special.ws, { WebSocket, backoff: { initial: 100, max: 500 } });
    clients.push(px);
    await px.connect();
    const sub = px.subscribe(channel);
    await sub.ready;
    const seen = [];
    const events = [];
    sub.on('message', (m) => seen.push([m.offset, m.data]));
    for (const name of ['subscribed', 'recovered', 'lost', 'unsubscribed']) sub.on(name, (e) => events.push([name, e]));
    for (const n of [1, 2]) await special.publish(channel, n);
    await eventually(() => seen.length === 2, 'the first messages');
    // The server ends the subscription; publishes race the resubscribe.
    const ended = px.rpc('test.insufficient_state', { channel });
    const racing = [3, 4, 5, 6].map((n) => special.publish(channel, n));
    assert.deepEqual(await ended, { data: true });
    await Promise.all(racing);
    await eventually(() => seen.length >= 6, 'every message');
    await sub.publish(7);
    await eventually(() => seen.length >= 7, 'a live message after the resubscribe');
    assert.deepEqual(seen.map(([o]) => o), [1, 2, 3, 4, 5, 6, 7]);
    assert.deepEqual(seen.map(([, d]) => d).sort(), [1, 2, 3, 4, 5, 6, 7], 'each message once');
    assert.deepEqual(events.map(([name]) => name), ['subscribed', 'recovered']);
    assert.deepEqual(events[1][1].since, { offset: 2, epoch: events[1][1].epoch });
    assert.equal(sub.state, 'subscribed');
    assert.equal(px.getSubscription(channel), sub);
  } finally {
    await special.stop();
  }
});
