// The SSE fallback: where the WebSocket cannot open, the same client runs over
// `GET /sse` + `POST /emulation`, and tries the WebSocket again later.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Plexus } from '../plexus.js';
import { fakeFetch, flush, setup } from './helpers/fakes.mjs';

async function fallbackSetup(options = {}) {
  const net = fakeFetch();
  const env = await setup(Plexus, { transports: ['websocket', 'sse'], fetch: net.fetch, ...options });
  return { ...env, ...net };
}

test('a WebSocket closed before welcome falls back to SSE at once, with the same API', async () => {
  const { px, clock, sockets, streams, posts, last } = await fallbackSetup();
  const connected = px.connect();
  await flush();
  last().fail(); // what a proxy that breaks upgrades looks like
  await clock.advance(0);
  assert.equal(streams.length, 1);
  assert.equal(streams[0].url, 'http://test.invalid/sse');
  assert.equal(px.transport, 'sse');
  streams[0].accept('c-1', 'sess-1');
  const welcome = await connected;
  assert.equal(welcome.session, 'sess-1');
  assert.equal(px.state, 'connected');
  assert.equal(sockets.length, 1); // no second WebSocket meanwhile

  const sub = px.subscribe('chat:a');
  const published = px.publish('chat:a', { text: 'hi' });
  await flush();
  // Commands leave as POSTs carrying the session and node, in order.
  const commands = posts.flatMap((p) => p.body.commands);
  assert.deepEqual(posts.map((p) => [p.url, p.body.session, p.body.node]), posts.map(() => ['http://test.invalid/emulation', 'sess-1', 'n1']));
  const subscribe = commands.find((c) => c.type === 'subscribe');
  assert.equal(subscribe.channel, 'chat:a');
  streams[0].push({ type: 'reply', id: subscribe.id, result: { channel: 'chat:a', offset: 0, epoch: 'e', recovered: false } });
  await sub.ready;
  await flush();
  const publish = posts.flatMap((p) => p.body.commands).find((c) => c.type === 'publish');
  assert.deepEqual(publish.data, { text: 'hi' });
  streams[0].push({ type: 'reply', id: publish.id, result: { offset: 1, epoch: 'e' } });
  assert.deepEqual(await published, { offset: 1, epoch: 'e' });
  const got = [];
  sub.on('message', (m) => got.push(m.data));
  streams[0].push({ type: 'message', channel: 'chat:a', data: { text: 'hi' }, offset: 1, epoch: 'e', time: 1 });
  await flush();
  assert.deepEqual(got, [{ text: 'hi' }]);
  px.close();
});

test('POSTs go one at a time; what is sent meanwhile leaves in the next, in order', async () => {
  const { px, clock, streams, posts, fetch, last } = await fallbackSetup();
  px.connect();
  await flush();
  last().fail();
  await clock.advance(0);
  streams[0].accept();
  await flush();
  let release;
  fetch.answer = () => new Promise((resolve) => (release = () => resolve(204)));
  const first = px.rpc('a');
  // The others are left unanswered: the test ends with close(), which rejects them.
  const rest = ['b', 'c', 'd', 'e'].map(() => null);
  rest[0] = px.rpc('b').catch(() => {});
  rest[1] = px.rpc('c').catch(() => {});
  await flush();
  assert.equal(posts.length, 1); // one POST for what was sent in one tick
  assert.deepEqual(posts[0].body.commands.map((c) => c.method), ['a', 'b', 'c']);
  rest[2] = px.rpc('d').catch(() => {});
  await flush();
  rest[3] = px.rpc('e').catch(() => {});
  await flush();
  assert.equal(posts.length, 1); // the next waits for the first to be answered
  fetch.answer = null;
  release();
  await flush();
  assert.deepEqual(posts.map((p) => p.body.commands.map((c) => c.method)), [['a', 'b', 'c'], ['d', 'e']]);
  streams[0].push({ type: 'reply', id: posts[0].body.commands[0].id, result: { data: 1 } });
  assert.deepEqual(await first, { data: 1 });
  px.close();
});

test('the server\'s ": ping" comments keep an idle SSE connection alive', async () => {
  const { px, clock, streams, posts, last } = await fallbackSetup({ pingAfter: 1000, pongTimeout: 500 });
  px.connect();
  await flush();
  last().fail();
  await clock.advance(0);
  streams[0].accept();
  await flush();
  for (let i = 0; i < 5; i++) {
    await clock.advance(900);
    streams[0].write(': ping\n\n');
    await flush();
  }
  assert.equal(posts.flatMap((p) => p.body.commands).filter((c) => c.type === 'ping').length, 0);
  assert.equal(px.state, 'connected');
  await clock.advance(1000); // silence: the client pings itself
  assert.equal(posts.flatMap((p) => p.body.commands).filter((c) => c.type === 'ping').length, 1);
  px.close();
});

test('the final close event carries the close code: 4001 stops the client', async () => {
  const { px, clock, streams, errors, last } = await fallbackSetup();
  px.connect();
  await flush();
  last().fail();
  await clock.advance(0);
  streams[0].push({ type: 'close', code: 4001, reason: 'bad token' });
  streams[0].end();
  await flush();
  assert.equal(px.state, 'closed');
  assert.equal(errors.at(-1).code, 'unauthorized');
});

test('after an SSE session ends, the next attempt is a WebSocket again; it recovers with since', async () => {
  const { px, clock, sockets, streams, posts, last } = await fallbackSetup();
  px.connect();
  await flush();
  last().fail();
  await clock.advance(0);
  streams[0].accept();
  await flush();
  const sub = px.subscribe('chat:a');
  await flush();
  const subscribe = posts[0].body.commands[0];
  streams[0].push({ type: 'reply', id: subscribe.id, result: { channel: 'chat:a', offset: 4, epoch: 'e', recovered: false } });
  streams[0].push({ type: 'message', channel: 'chat:a', data: 5, offset: 5, epoch: 'e', time: 1 });
  await sub.ready;
  streams[0].end(); // the stream is cut
  await flush();
  assert.equal(px.state, 'reconnecting');
  for (let i = 0; i < 400 && sockets.length < 2; i++) await clock.advance(50);
  assert.equal(sockets.length, 2);
  assert.equal(px.transport, 'websocket');
  last().accept();
  await flush();
  const again = last().lastSent('subscribe');
  assert.deepEqual(again.since, { offset: 5, epoch: 'e' });
  px.close();
});

test('a session the server no longer knows (404) ends the connection; the client recovers', async () => {
  const { px, clock, streams, fetch, last } = await fallbackSetup();
  px.connect();
  await flush();
  last().fail();
  await clock.advance(0);
  streams[0].accept();
  await flush();
  fetch.answer = () => 404;
  const failed = px.rpc('x').catch((err) => err.code);
  await flush();
  assert.equal(await failed, 'disconnected');
  assert.equal(px.state, 'reconnecting');
  px.close();
});

test('once a WebSocket worked, reconnects stay on it through a restart; five failed in a row fall back', async () => {
  const { px, clock, sockets, streams, last } = await fallbackSetup();
  px.connect();
  await flush();
  last().accept();
  await flush();
  last().serverClose(1006); // the server goes away
  await flush();
  const attempt = async () => {
    const before = sockets.length + streams.length;
    for (let i = 0; i < 2000 && sockets.length + streams.length === before; i++) await clock.advance(50);
  };
  for (let n = 1; n < 5; n++) {
    await attempt();
    assert.equal(px.transport, 'websocket', `attempt ${n}`);
    last().fail(); // refused: the server is restarting
    await flush();
  }
  assert.equal(streams.length, 0);
  await attempt();
  last().accept(); // it is back: the WebSocket connects, and counts as working again
  await flush();
  assert.equal(px.state, 'connected');
  assert.equal(px.transport, 'websocket');
  last().serverClose(1006);
  await flush();
  for (let n = 1; n <= 5; n++) {
    await attempt();
    assert.equal(px.transport, 'websocket');
    last().fail();
    await flush();
  }
  await attempt(); // the fifth in a row: now it looks like a blocked upgrade
  assert.equal(px.transport, 'sse');
  assert.equal(streams.length, 1);
  px.close();
});

test('a working WebSocket is used: no SSE request is made', async () => {
  const { px, streams, last } = await fallbackSetup();
  const connected = px.connect();
  await flush();
  last().accept();
  await connected;
  assert.equal(px.transport, 'websocket');
  assert.equal(streams.length, 0);
  px.close();
});

test("transports: ['sse'] goes straight to SSE; ['websocket'] never falls back", async () => {
  const only = await fallbackSetup({ transports: ['sse'] });
  only.px.connect();
  await flush();
  assert.equal(only.sockets.length, 0);
  assert.equal(only.streams.length, 1);
  only.px.close();
  const ws = await fallbackSetup({ transports: ['websocket'] });
  ws.px.connect();
  await flush();
  ws.last().fail();
  await ws.clock.advance(0);
  assert.equal(ws.streams.length, 0);
  ws.px.close();
});
