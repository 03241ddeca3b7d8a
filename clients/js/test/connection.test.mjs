// Connection lifecycle: states, backoff with full jitter, heartbeat, close codes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Plexus, PlexusError } from '../plexus.js';
import { setup, flush } from './helpers/fakes.mjs';

test('states: connecting -> connected -> reconnecting -> connected -> closed', async () => {
  const { px, clock, sockets, states, last } = await setup(Plexus);
  assert.equal(px.state, 'closed');
  const connected = px.connect();
  await flush();
  assert.equal(px.state, 'connecting');
  assert.equal(sockets.length, 1);
  assert.equal(last().url, 'ws://test.invalid/ws');
  last().accept('c-1');
  const welcome = await connected;
  assert.equal(welcome.client, 'c-1');
  assert.equal(px.clientId, 'c-1');
  assert.equal(px.state, 'connected');

  last().serverClose(1001, 'going away');
  assert.equal(px.state, 'reconnecting');
  await clock.advance(500);
  assert.equal(sockets.length, 2);
  last().accept('c-2');
  assert.equal(px.state, 'connected');
  assert.equal(px.clientId, 'c-2');

  px.close();
  assert.equal(px.state, 'closed');
  assert.deepEqual(last().closedWith.code, 1000);
  assert.deepEqual(states, [
    ['closed', 'connecting'],
    ['connecting', 'connected'],
    ['connected', 'reconnecting'],
    ['reconnecting', 'connected'],
    ['connected', 'closed'],
  ]);
  // Nothing reconnects after close().
  await clock.advance(60_000);
  assert.equal(sockets.length, 2);
});

test('state events fire only on change; connect() while connected resolves at once', async () => {
  const { px, states, last } = await setup(Plexus);
  px.connect();
  await flush();
  last().accept();
  const again = await px.connect();
  assert.equal(again.type, 'welcome');
  assert.equal(states.length, 2);
  px.close();
  px.close();
  assert.equal(states.length, 3);
});

test('backoff: exponential caps with full jitter, first delay below 0.5 s, cap 20 s', async () => {
  const { px, clock, sockets, retries, last } = await setup(Plexus);
  clock.randomValue = 0.999999;
  px.connect();
  await flush();
  const caps = [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000, 20000];
  for (const cap of caps) {
    last().fail();
    const { delay } = retries[retries.length - 1];
    assert.ok(delay <= cap && delay >= cap * 0.999 - 1, `delay ${delay} for cap ${cap}`);
    await clock.advance(delay);
  }
  assert.equal(sockets.length, caps.length + 1);
  assert.equal(px.state, 'reconnecting');

  // Full jitter: the delay is random() * cap, anywhere from 0 up to the cap.
  clock.randomValue = 0;
  last().fail();
  assert.equal(retries[retries.length - 1].delay, 0);
  await clock.advance(0);
  clock.randomValue = 0.25;
  last().fail();
  assert.equal(retries[retries.length - 1].delay, 5000);
  px.close();
});

test('backoff: a retry happens only when its delay has passed', async () => {
  const { px, clock, sockets, last } = await setup(Plexus);
  clock.randomValue = 0.5;
  px.connect();
  await flush();
  last().fail(); // delay 250
  await clock.advance(249);
  assert.equal(sockets.length, 1);
  await clock.advance(1);
  assert.equal(sockets.length, 2);
  px.close();
});

test('backoff resets after resetAfter ms connected, not before', async () => {
  const { px, clock, retries, last } = await setup(Plexus);
  clock.randomValue = 0.999999;
  px.connect();
  await flush();
  for (let i = 0; i < 4; i++) {
    last().fail();
    await clock.advance(retries[retries.length - 1].delay);
  }
  // Connected briefly: the attempt counter keeps growing.
  last().accept();
  await clock.advance(9_000);
  last().serverClose(1006);
  let { delay } = retries[retries.length - 1];
  assert.ok(delay > 8000 * 0.99 && delay <= 8000, `short connection keeps backing off: ${delay}`);
  await clock.advance(delay);

  // Connected for longer than resetAfter: back to the first step.
  last().accept();
  await clock.advance(10_000);
  last().serverClose(1006);
  ({ delay } = retries[retries.length - 1]);
  assert.ok(delay <= 500, `after a stable connection the delay restarts: ${delay}`);
  px.close();
});

test('heartbeat: ping after pingAfter idle ms, pong keeps the connection', async () => {
  const { px, clock, sockets, last } = await setup(Plexus, { pingAfter: 20_000, pongTimeout: 5_000 });
  px.connect();
  await flush();
  last().accept();
  await clock.advance(19_999);
  assert.equal(last().sentOfType('ping').length, 0);
  await clock.advance(1);
  const ping = last().lastSent('ping');
  assert.ok(ping, 'a ping was sent');
  assert.equal(typeof ping.id, 'number');
  await clock.advance(4_000);
  last().receive({ type: 'pong', id: ping.id });
  await clock.advance(10_000);
  assert.equal(px.state, 'connected');
  assert.equal(sockets.length, 1);
  // The next idle period brings the next ping.
  await clock.advance(10_000);
  assert.equal(last().sentOfType('ping').length, 2);
  px.close();
});

test('heartbeat: traffic postpones the ping', async () => {
  const { px, clock, last } = await setup(Plexus, { pingAfter: 20_000 });
  px.connect();
  await flush();
  last().accept();
  for (let i = 0; i < 5; i++) {
    await clock.advance(15_000);
    last().receive({ type: 'join', channel: 'x', client: 'c-x' });
  }
  assert.equal(last().sentOfType('ping').length, 0);
  px.close();
});

test('heartbeat: no pong within pongTimeout drops the socket and reconnects', async () => {
  const { px, clock, sockets, states, last } = await setup(Plexus, { pingAfter: 20_000, pongTimeout: 5_000 });
  clock.randomValue = 0;
  px.connect();
  await flush();
  const first = last();
  first.accept();
  await clock.advance(20_000);
  assert.equal(first.sentOfType('ping').length, 1);
  await clock.advance(4_999);
  assert.equal(px.state, 'connected');
  await clock.advance(1);
  assert.equal(px.state, 'reconnecting');
  assert.ok(first.closedWith, 'the dead socket was closed');
  await clock.advance(0);
  assert.equal(sockets.length, 2);
  last().accept();
  assert.equal(px.state, 'connected');
  // The dead socket's late close event changes nothing.
  first.onclose({ code: 1006 });
  assert.equal(px.state, 'connected');
  assert.deepEqual(states.slice(-2), [['connected', 'reconnecting'], ['reconnecting', 'connected']]);
  px.close();
});

test('a socket that never says welcome is given up after requestTimeout', async () => {
  const { px, clock, sockets, last } = await setup(Plexus, { requestTimeout: 3000 });
  clock.randomValue = 0;
  px.connect();
  await flush();
  last().open();
  await clock.advance(3000);
  assert.equal(px.state, 'reconnecting');
  await clock.advance(0);
  assert.equal(sockets.length, 2);
  px.close();
});

test('close 4001 stops retrying: state closed, error event, connect() rejects', async () => {
  const { px, clock, sockets, errors, last } = await setup(Plexus, { token: 'bad' });
  const connecting = px.connect();
  await flush();
  assert.match(last().url, /\?token=bad$/);
  last().open();
  last().serverClose(4001, 'invalid token');
  await assert.rejects(connecting, (err) => err instanceof PlexusError && err.code === 'unauthorized');
  assert.equal(px.state, 'closed');
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, 'unauthorized');
  await clock.advance(120_000);
  assert.equal(sockets.length, 1);
  await assert.rejects(px.publish('chat:x', 1), { code: 'disconnected' });
});

test('close 4001 after being connected also stops; pending requests reject', async () => {
  const { px, clock, sockets, last } = await setup(Plexus);
  px.connect();
  await flush();
  last().accept();
  const pending = px.rpc('x', {});
  last().serverClose(4001);
  await assert.rejects(pending, { code: 'disconnected' });
  assert.equal(px.state, 'closed');
  await clock.advance(60_000);
  assert.equal(sockets.length, 1);
});

test('close 4002 calls getToken() and reconnects with the new token', async () => {
  let calls = 0;
  const getToken = async () => `tok-${++calls}`;
  const { px, clock, sockets, last } = await setup(Plexus, { token: 'tok-0', getToken });
  clock.randomValue = 0;
  px.connect();
  await flush();
  assert.match(last().url, /token=tok-0/);
  assert.equal(calls, 0, 'a given token is used first');
  last().accept();
  last().serverClose(4002, 'token expired');
  assert.equal(px.state, 'reconnecting');
  await clock.advance(0);
  assert.equal(calls, 1);
  assert.equal(sockets.length, 2);
  assert.match(last().url, /token=tok-1/);
  last().accept();
  assert.equal(px.state, 'connected');
  // A plain network error does not ask for a new token.
  last().serverClose(1006);
  await clock.advance(0);
  assert.equal(calls, 1);
  assert.match(last().url, /token=tok-1/);
  px.close();
});

test('close 4002 without getToken stops with token_expired', async () => {
  const { px, clock, sockets, errors, last } = await setup(Plexus, { token: 'old' });
  px.connect().catch(() => {});
  await flush();
  last().accept();
  last().serverClose(4002);
  assert.equal(px.state, 'closed');
  assert.equal(errors[0].code, 'token_expired');
  await clock.advance(60_000);
  assert.equal(sockets.length, 1);
});

test('getToken is asked for the first token when none is given; a failure is retried', async () => {
  let calls = 0;
  const getToken = async () => {
    calls++;
    if (calls === 1) throw new Error('auth server down');
    return 'fresh';
  };
  const { px, clock, sockets, errors, last } = await setup(Plexus, { getToken });
  clock.randomValue = 0;
  px.connect();
  await flush();
  assert.equal(calls, 1);
  assert.equal(sockets.length, 0);
  assert.equal(errors[0].code, 'token_error');
  assert.equal(px.state, 'reconnecting');
  await clock.advance(0);
  assert.equal(calls, 2);
  assert.match(last().url, /token=fresh/);
  px.close();
});

test('1001, 4008 and network errors reconnect with backoff; 4029 waits longer', async () => {
  const { px, clock, sockets, retries, last } = await setup(Plexus, { rateLimitDelay: 5000 });
  clock.randomValue = 0;
  px.connect();
  await flush();
  for (const code of [1001, 4008, 1006, 1011]) {
    last().accept();
    last().serverClose(code);
    assert.equal(px.state, 'reconnecting', `after ${code}`);
    await clock.advance(0);
  }
  assert.equal(sockets.length, 5);
  last().accept();
  last().serverClose(4029);
  assert.equal(retries[retries.length - 1].delay, 5000);
  await clock.advance(4999);
  assert.equal(sockets.length, 5);
  await clock.advance(1);
  assert.equal(sockets.length, 6);
  px.close();
});

test("window 'online' and visibility 'visible' retry at once (and are optional in Node)", async () => {
  const win = new EventTarget();
  const doc = new EventTarget();
  doc.visibilityState = 'hidden';
  globalThis.window = win;
  globalThis.document = doc;
  try {
    const { px, clock, sockets, last } = await setup(Plexus);
    clock.randomValue = 0.999;
    px.connect();
    await flush();
    last().fail(); // waits ~500 ms
    last; // the failed socket
    await flush();
    assert.equal(sockets.length, 1);
    win.dispatchEvent(new Event('online'));
    await flush();
    assert.equal(sockets.length, 2, 'online retried at once');
    last().fail();
    doc.dispatchEvent(new Event('visibilitychange'));
    await flush();
    assert.equal(sockets.length, 2, 'hidden does not retry');
    doc.visibilityState = 'visible';
    doc.dispatchEvent(new Event('visibilitychange'));
    await flush();
    assert.equal(sockets.length, 3, 'visible retried at once');
    px.close();
    // After close() the listeners are gone.
    win.dispatchEvent(new Event('online'));
    await flush();
    assert.equal(sockets.length, 3);
  } finally {
    delete globalThis.window;
    delete globalThis.document;
  }
});

test('a failing handler does not break the client', async () => {
  const { px, last } = await setup(Plexus);
  const original = console.error;
  const logged = [];
  console.error = (...args) => logged.push(args);
  try {
    px.on('state', () => {
      throw new Error('boom');
    });
    let seen = 0;
    px.on('state', () => seen++);
    px.connect();
    await flush();
    last().accept();
    assert.equal(px.state, 'connected');
    assert.equal(seen, 2);
    assert.equal(logged.length, 2);
    px.close();
  } finally {
    console.error = original;
  }
});

test('url forms: http(s) becomes ws(s), token is appended to an existing query', () => {
  const a = new Plexus('http://h:1/ws', { WebSocket: class {} });
  assert.equal(a.url, 'ws://h:1/ws');
  const b = new Plexus('https://h/ws?x=1', { WebSocket: class {} });
  assert.equal(b.url, 'wss://h/ws?x=1');
  assert.throws(() => new Plexus(undefined, {}), TypeError);
});

test('on() returns an unsubscribe function', async () => {
  const { px, last } = await setup(Plexus);
  const seen = [];
  const off = px.on('state', (s) => seen.push(s));
  px.connect();
  await flush();
  off();
  last().accept();
  assert.deepEqual(seen, ['connecting']);
  px.close();
});
