// Subscriptions and requests: ordering, queueing, recovery, bytes, errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Plexus, PlexusError, encodeBytes, decodeBytes } from '../plexus.js';
import { setup, flush } from './helpers/fakes.mjs';

async function connected(options = {}) {
  const env = await setup(Plexus, options);
  env.clock.randomValue = 0;
  env.px.connect();
  await flush();
  env.last().accept();
  return env;
}

function push(ws, channel, offset, data = { n: offset }, epoch = 'e1') {
  ws.receive({ type: 'message', channel, data, offset, epoch, time: 1, from: { client: 'c-9', user: null } });
}

test('subscribe returns at once; ready resolves with the reply', async () => {
  const { px, last } = await connected();
  const sub = px.subscribe('chat:lobby', { info: { nick: 'ann' } });
  assert.equal(sub.state, 'subscribing');
  const cmd = last().lastSent('subscribe');
  assert.deepEqual({ ...cmd, id: 0 }, { type: 'subscribe', channel: 'chat:lobby', info: { nick: 'ann' }, id: 0 });
  assert.equal(cmd.since, undefined);
  last().reply(cmd, { channel: 'chat:lobby', offset: 3, epoch: 'e1', recovered: false });
  const result = await sub.ready;
  assert.equal(result.offset, 3);
  assert.equal(sub.state, 'subscribed');
  assert.deepEqual(sub.position, { offset: 3, epoch: 'e1' });
  assert.equal(px.subscribe('chat:lobby'), sub, 'a second subscribe returns the same subscription');
  px.close();
});

test('subscribe before connect is sent on connect', async () => {
  const { px, last } = await setup(Plexus);
  const sub = px.subscribe('chat:a');
  px.connect();
  await flush();
  last().accept();
  const cmd = last().lastSent('subscribe');
  assert.equal(cmd.channel, 'chat:a');
  last().reply(cmd, { channel: 'chat:a', offset: 0, epoch: 'e', recovered: false });
  await sub.ready;
  px.close();
});

test('commands made before ready are sent after the subscribe reply, in order', async () => {
  const { px, last } = await connected();
  const sub = px.subscribe('chat:lobby');
  const p1 = sub.publish({ text: 'one' });
  const p2 = sub.history({ limit: 5 });
  const p3 = sub.publish({ text: 'three' });
  await flush();
  assert.deepEqual(last().sent.map((m) => m.type), ['subscribe']);
  last().reply(last().lastSent('subscribe'), { channel: 'chat:lobby', offset: 0, epoch: 'e1', recovered: false });
  await flush();
  const sent = last().sent.slice(1);
  assert.deepEqual(sent.map((m) => m.type), ['publish', 'history', 'publish']);
  assert.equal(sent[0].data.text, 'one');
  assert.equal(sent[1].limit, 5);
  assert.equal(sent[2].data.text, 'three');
  last().reply(sent[0], { offset: 1 });
  last().reply(sent[1], { messages: [], offset: 1, epoch: 'e1' });
  last().reply(sent[2], { offset: 2 });
  assert.deepEqual(await p1, { offset: 1 });
  assert.deepEqual(await p2, { messages: [], offset: 1, epoch: 'e1' });
  assert.deepEqual(await p3, { offset: 2 });
  px.close();
});

test('a refused subscribe rejects ready and the commands queued on it', async () => {
  const { px, last } = await connected();
  const sub = px.subscribe('secret:x');
  const errors = [];
  sub.on('error', (e) => errors.push(e.code));
  const pub = sub.publish(1);
  last().error(last().lastSent('subscribe'), 'permission_denied');
  await assert.rejects(sub.ready, { code: 'permission_denied' });
  await assert.rejects(pub, { code: 'permission_denied' });
  assert.equal(sub.state, 'unsubscribed');
  assert.deepEqual(errors, ['permission_denied']);
  assert.equal(px.getSubscription('secret:x'), undefined);
  px.close();
});

test('requests resolve with the result and reject with the protocol error code', async () => {
  const { px, last } = await connected();
  const ok = px.rpc('sum', [1, 2]);
  const bad = px.publish('nope', 1);
  const [rpc, pub] = last().sent.slice(-2);
  assert.deepEqual({ type: rpc.type, method: rpc.method, data: rpc.data }, { type: 'rpc', method: 'sum', data: [1, 2] });
  last().reply(rpc, { data: 3 });
  last().error(pub, 'permission_denied', 'no publishing here');
  assert.deepEqual(await ok, { data: 3 });
  await assert.rejects(bad, (err) => {
    assert.ok(err instanceof PlexusError);
    assert.ok(err instanceof Error);
    assert.equal(err.code, 'permission_denied');
    assert.equal(err.message, 'no publishing here');
    return true;
  });
  assert.notEqual(rpc.id, pub.id, 'every command gets its own id');
  px.close();
});

test('a request without an answer rejects with timeout', async () => {
  const { px, clock } = await connected({ requestTimeout: 1000 });
  const p = px.presence('chat:x');
  await clock.advance(999);
  let settled = false;
  p.catch(() => {}).finally(() => (settled = true));
  await flush();
  assert.equal(settled, false);
  await clock.advance(1);
  await assert.rejects(p, { code: 'timeout' });
  px.close();
});

test('requests in flight reject with disconnected when the socket drops', async () => {
  const { px, last } = await connected();
  const p = px.rpc('slow');
  last().serverClose(1006);
  await assert.rejects(p, { code: 'disconnected' });
  px.close();
});

test('an error without id reaches error handlers', async () => {
  const { px, errors, last } = await connected();
  last().receive({ type: 'error', code: 'bad_request', message: 'x' });
  assert.equal(errors[0].code, 'bad_request');
  px.close();
});

test('publishing while disconnected queues; flushed in order after resubscribe', async () => {
  const { px, clock, last } = await connected();
  const sub = px.subscribe('chat:lobby');
  last().reply(last().lastSent('subscribe'), { channel: 'chat:lobby', offset: 10, epoch: 'e1', recovered: false });
  await sub.ready;
  last().serverClose(1006);
  const p = [sub.publish('a'), px.publish('chat:other', 'b'), sub.publish('c')];
  await clock.advance(0);
  const ws = last();
  ws.accept();
  await flush();
  // The resubscribe goes first; the free-standing publish needs no subscription.
  assert.deepEqual(ws.sent.map((m) => [m.type, m.data ?? null]), [
    ['subscribe', null],
    ['publish', 'b'],
  ]);
  assert.deepEqual(ws.sent[0].since, { offset: 10, epoch: 'e1' });
  ws.reply(ws.sent[0], { channel: 'chat:lobby', offset: 10, epoch: 'e1', recovered: true });
  await flush();
  assert.deepEqual(ws.sent.slice(2).map((m) => m.data), ['a', 'c']);
  ws.reply(ws.sent[1], { offset: 1 });
  ws.reply(ws.sent[2], { offset: 11 });
  ws.reply(ws.sent[3], { offset: 12 });
  assert.deepEqual(await Promise.all(p), [{ offset: 11 }, { offset: 1 }, { offset: 12 }]);
  px.close();
});

test('the queue is bounded: beyond queueLimit requests reject with queue_full', async () => {
  const { px, last } = await connected({ queueLimit: 2 });
  last().serverClose(1006);
  const a = px.publish('chat:x', 1);
  const b = px.publish('chat:x', 2);
  const c = px.publish('chat:x', 3);
  await assert.rejects(c, { code: 'queue_full' });
  px.close();
  await assert.rejects(a, { code: 'disconnected' });
  await assert.rejects(b, { code: 'disconnected' });
});

test('queueWhileDisconnected: false rejects at once with disconnected', async () => {
  const { px, last } = await connected({ queueWhileDisconnected: false });
  last().serverClose(1006);
  await assert.rejects(px.publish('chat:x', 1), { code: 'disconnected' });
  px.close();
});

test('recovery: resubscribe with since, duplicates dropped by offset, recovered event', async () => {
  const { px, clock, last } = await connected();
  const sub = px.subscribe('chat:lobby');
  const got = [];
  const all = [];
  const recovered = [];
  sub.on('message', (m) => got.push(m.offset));
  px.on('message', (m) => all.push(m.offset));
  sub.on('recovered', (info) => recovered.push(info));
  last().reply(last().lastSent('subscribe'), { channel: 'chat:lobby', offset: 5, epoch: 'e1', recovered: false });
  await sub.ready;
  push(last(), 'chat:lobby', 6);
  push(last(), 'chat:lobby', 7);
  push(last(), 'chat:lobby', 7); // duplicate
  last().serverClose(4008);
  await clock.advance(0);
  last().accept();
  const cmd = last().lastSent('subscribe');
  assert.deepEqual(cmd.since, { offset: 7, epoch: 'e1' });
  last().reply(cmd, { channel: 'chat:lobby', offset: 9, epoch: 'e1', recovered: true });
  for (const offset of [6, 7, 8, 9, 8, 10]) push(last(), 'chat:lobby', offset);
  assert.deepEqual(got, [6, 7, 8, 9, 10]);
  assert.deepEqual(all, [6, 7, 8, 9, 10]);
  assert.deepEqual(recovered, [{ since: { offset: 7, epoch: 'e1' }, offset: 9, epoch: 'e1', missed: 2 }]);
  assert.deepEqual(sub.position, { offset: 10, epoch: 'e1' });
  px.close();
});

test("lost: recovered false after a since emits 'lost' and restarts from the reply position", async () => {
  const { px, clock, last } = await connected();
  const sub = px.subscribe('chat:lobby');
  const lost = [];
  const recovered = [];
  const got = [];
  sub.on('lost', (info) => lost.push(info));
  sub.on('recovered', (info) => recovered.push(info));
  sub.on('message', (m) => got.push([m.epoch, m.offset]));
  last().reply(last().lastSent('subscribe'), { channel: 'chat:lobby', offset: 5, epoch: 'e1', recovered: false });
  await sub.ready;
  assert.equal(lost.length, 0, 'no lost event for a first subscribe');
  last().serverClose(1001);
  await clock.advance(0);
  last().accept();
  last().reply(last().lastSent('subscribe'), { channel: 'chat:lobby', offset: 2, epoch: 'e2', recovered: false });
  assert.deepEqual(lost, [{ since: { offset: 5, epoch: 'e1' }, offset: 2, epoch: 'e2' }]);
  assert.equal(recovered.length, 0);
  push(last(), 'chat:lobby', 3, {}, 'e2');
  assert.deepEqual(got, [['e2', 3]], 'a new epoch starts at its own offsets');
  px.close();
});

test('own messages are delivered like any other', async () => {
  const { px, last } = await connected();
  const sub = px.subscribe('chat:lobby');
  last().reply(last().lastSent('subscribe'), { channel: 'chat:lobby', offset: 0, epoch: 'e1', recovered: false });
  await sub.ready;
  const got = [];
  sub.on('message', (m) => got.push(m));
  last().receive({ type: 'message', channel: 'chat:lobby', data: 'mine', offset: 1, epoch: 'e1', time: 1, from: { client: px.clientId, user: null } });
  assert.equal(got.length, 1);
  assert.equal(got[0].data, 'mine');
  px.close();
});

test('join, leave and server unsubscribed reach the subscription', async () => {
  const { px, last } = await connected();
  const sub = px.subscribe('chat:lobby');
  last().reply(last().lastSent('subscribe'), { channel: 'chat:lobby', offset: 0, epoch: 'e1', recovered: false });
  await sub.ready;
  const events = [];
  sub.on('join', (m) => events.push(['join', m.client, m.info]));
  sub.on('leave', (m) => events.push(['leave', m.client]));
  sub.on('unsubscribed', (e) => events.push(['unsubscribed', e.reason]));
  last().receive({ type: 'join', channel: 'chat:lobby', client: 'c-2', user: null, info: { nick: 'bo' } });
  last().receive({ type: 'leave', channel: 'chat:lobby', client: 'c-2', user: null });
  last().receive({ type: 'unsubscribed', channel: 'chat:lobby', reason: 'kicked' });
  assert.deepEqual(events, [
    ['join', 'c-2', { nick: 'bo' }],
    ['leave', 'c-2'],
    ['unsubscribed', 'kicked'],
  ]);
  assert.equal(sub.state, 'unsubscribed');
  await assert.rejects(sub.publish(1), { code: 'not_subscribed' });
  px.close();
});

test('unsubscribe sends unsubscribe, drops later messages, rejects queued commands', async () => {
  const { px, last } = await connected();
  const sub = px.subscribe('chat:lobby');
  const queued = sub.publish('x');
  const got = [];
  sub.on('message', (m) => got.push(m));
  const done = sub.unsubscribe();
  await assert.rejects(queued, { code: 'not_subscribed' });
  await assert.rejects(sub.ready, { code: 'not_subscribed' });
  const cmd = last().lastSent('unsubscribe');
  assert.equal(cmd.channel, 'chat:lobby');
  last().reply(cmd, {});
  await done;
  push(last(), 'chat:lobby', 1);
  assert.equal(got.length, 0);
  // A new subscription to the same channel is a new object.
  const again = px.subscribe('chat:lobby');
  assert.notEqual(again, sub);
  px.close();
});

test('bytes: Uint8Array is sent as {$bytes} and received back as Uint8Array', async () => {
  const { px, last } = await connected();
  const bytes = new Uint8Array([0, 1, 2, 250, 255]);
  const pub = px.publish('chat:x', { kind: 'image', bytes, list: [new Uint8Array([7])], text: '你好 👋' });
  const sent = last().lastSent('publish');
  assert.deepEqual(sent.data, { kind: 'image', bytes: { $bytes: 'AAEC+v8=' }, list: [{ $bytes: 'Bw==' }], text: '你好 👋' });
  last().reply(sent, { offset: 1 });
  await pub;
  const sub = px.subscribe('chat:x');
  last().reply(last().lastSent('subscribe'), { channel: 'chat:x', offset: 0, epoch: 'e1', recovered: false });
  await sub.ready;
  const got = [];
  sub.on('message', (m) => got.push(m.data));
  push(last(), 'chat:x', 1, { kind: 'image', bytes: { $bytes: 'AAEC+v8=' }, text: '你好 👋' });
  assert.ok(got[0].bytes instanceof Uint8Array);
  assert.deepEqual([...got[0].bytes], [0, 1, 2, 250, 255]);
  assert.equal(got[0].text, '你好 👋');
  // History results are decoded too.
  const h = sub.history({ limit: 1 });
  await flush();
  last().reply(last().lastSent('history'), {
    messages: [{ channel: 'chat:x', data: { b: { $bytes: 'Bw==' } }, offset: 1, time: 1 }],
    offset: 1,
    epoch: 'e1',
  });
  const page = await h;
  assert.deepEqual([...page.messages[0].data.b], [7]);
  px.close();
});

test('encodeBytes / decodeBytes round trip and leave other values alone', () => {
  const value = { a: [1, 'x', null, { b: new Uint16Array([1, 2]).subarray(1) }], c: new ArrayBuffer(2), d: true };
  const encoded = encodeBytes(value);
  assert.deepEqual(encoded, { a: [1, 'x', null, { b: { $bytes: 'AgA=' } }], c: { $bytes: 'AAA=' }, d: true });
  const decoded = decodeBytes(JSON.parse(JSON.stringify(encoded)));
  assert.deepEqual([...decoded.a[3].b], [2, 0]);
  assert.deepEqual(decodeBytes({ $bytes: 1 }), { $bytes: 1 }, 'not a string: not bytes');
  assert.deepEqual(decodeBytes({ $bytes: 'AA==', x: 1 }), { $bytes: 'AA==', x: 1 }, 'extra keys: not bytes');
  const big = new Uint8Array(300_000).map((_, i) => i % 256);
  assert.deepEqual(decodeBytes(encodeBytes(big)), big);
});

test('a message over maxMessageSize is refused before sending (too_large)', async () => {
  const { px, last } = await connected({ maxMessageSize: 1000 });
  await assert.rejects(px.publish('chat:x', 'x'.repeat(1000)), { code: 'too_large' });
  await assert.rejects(px.publish('chat:x', '好'.repeat(400)), { code: 'too_large' }, 'counted in UTF-8 bytes');
  assert.equal(last().sentOfType('publish').length, 0);
  assert.equal(px.state, 'connected');
  px.close();
});

test("the server's max_message_size from welcome is used unless the option is given", async () => {
  const env = await setup(Plexus);
  env.px.connect();
  await flush();
  env.last().open();
  env.last().receive({ type: 'welcome', client: 'c-1', user: null, server: 'x', ping_interval: 25, max_message_size: 500 });
  assert.equal(env.px.maxMessageSize, 500);
  await assert.rejects(env.px.publish('chat:x', 'y'.repeat(600)), { code: 'too_large' });
  env.px.close();

  const fixed = await setup(Plexus, { maxMessageSize: 100000 });
  fixed.px.connect();
  await flush();
  fixed.last().open();
  fixed.last().receive({ type: 'welcome', client: 'c-1', user: null, max_message_size: 500 });
  assert.equal(fixed.px.maxMessageSize, 100000);
  fixed.px.publish('chat:x', 'y'.repeat(600)).catch(() => {});
  assert.equal(fixed.last().sentOfType('publish').length, 1);
  fixed.px.close();

  const plain = await connected();
  assert.equal(plain.px.maxMessageSize, 65536, 'the protocol default when the server does not say');
  plain.px.close();
});

test('close() ends subscriptions and rejects their ready', async () => {
  const { px } = await connected();
  const sub = px.subscribe('chat:y');
  const ended = [];
  sub.on('unsubscribed', (e) => ended.push(e.reason));
  px.close();
  await assert.rejects(sub.ready, { code: 'disconnected' });
  assert.deepEqual(ended, ['closed']);
  assert.equal(px.getSubscription('chat:y'), undefined);
});

test('a subscribe that gets no answer drops the connection and is retried', async () => {
  const { px, clock, sockets, last } = await connected({ requestTimeout: 1000 });
  const sub = px.subscribe('chat:z');
  await clock.advance(1000);
  assert.equal(px.state, 'reconnecting');
  await clock.advance(0);
  assert.equal(sockets.length, 2);
  last().accept();
  last().reply(last().lastSent('subscribe'), { channel: 'chat:z', offset: 0, epoch: 'e', recovered: false });
  await sub.ready;
  px.close();
});

test('setToken sends auth when connected', async () => {
  const { px, last } = await connected();
  const p = px.setToken('new-token');
  const cmd = last().lastSent('auth');
  assert.equal(cmd.token, 'new-token');
  last().reply(cmd, { user: 'alice' });
  assert.deepEqual(await p, { user: 'alice' });
  last().serverClose(1006);
  px.retryNow();
  px.close();
});
