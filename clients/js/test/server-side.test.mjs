// Subscriptions the server starts or ends by itself: `insufficient_state`
// (resubscribe with since), `subscribed` pushes (server-side subscriptions),
// and token refresh before expiry. Driven with the fake clock and socket.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Plexus } from '../plexus.js';
import { setup, flush } from './helpers/fakes.mjs';

async function connected(options = {}) {
  const env = await setup(Plexus, options);
  env.clock.randomValue = 0;
  env.px.connect();
  await flush();
  env.last().accept();
  return env;
}

function push(ws, channel, offset, epoch = 'e1') {
  ws.receive({ type: 'message', channel, data: { n: offset }, offset, epoch, time: 1 });
}

function granted(ws, channel, offset, epoch = 'e1') {
  ws.receive({ type: 'subscribed', channel, offset, epoch, recovered: false });
}

/** Record a subscription's events as [name, detail] pairs. */
function record(sub) {
  const events = [];
  sub.on('message', (m) => events.push(['message', m.offset]));
  for (const name of ['subscribed', 'recovered', 'lost', 'unsubscribed', 'error']) {
    sub.on(name, (detail) => events.push([name, detail]));
  }
  return events;
}

function messages(events) {
  return events.filter(([name]) => name === 'message').map(([, offset]) => offset);
}

function jwt(claims) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  return `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}.sig`;
}

// ---------------------------------------------------------------- insufficient_state

test('insufficient_state: resubscribes at once with since on the same Subscription, no gap, no duplicate', async () => {
  const { px, last, errors } = await connected();
  const sub = px.subscribe('chat:lobby');
  last().reply(last().lastSent('subscribe'), { channel: 'chat:lobby', offset: 5, epoch: 'e1', recovered: false });
  await sub.ready;
  const events = record(sub);
  push(last(), 'chat:lobby', 6);
  push(last(), 'chat:lobby', 7);
  last().receive({ type: 'unsubscribed', channel: 'chat:lobby', reason: 'insufficient_state', resubscribe: true });
  assert.equal(sub.state, 'subscribing');
  assert.equal(px.getSubscription('chat:lobby'), sub, 'the same Subscription stays registered');
  const resubscribe = last().lastSent('subscribe');
  assert.deepEqual(resubscribe.since, { offset: 7, epoch: 'e1' });
  // A command made meanwhile waits for the resubscribe reply.
  const published = sub.publish('x');
  await flush();
  assert.equal(last().sentOfType('publish').length, 0);
  last().reply(resubscribe, { channel: 'chat:lobby', offset: 9, epoch: 'e1', recovered: true });
  await flush();
  assert.equal(last().sentOfType('publish').length, 1);
  last().reply(last().lastSent('publish'), { offset: 10 });
  for (const offset of [7, 8, 9, 10]) push(last(), 'chat:lobby', offset);
  assert.deepEqual(await published, { offset: 10 });
  assert.deepEqual(messages(events), [6, 7, 8, 9, 10]);
  assert.deepEqual(
    events.filter(([name]) => name === 'recovered'),
    [['recovered', { since: { offset: 7, epoch: 'e1' }, offset: 9, epoch: 'e1', missed: 2 }]],
  );
  assert.equal(events.filter(([name]) => name === 'unsubscribed').length, 0, 'the app never saw it end');
  assert.equal(sub.state, 'subscribed');
  assert.deepEqual(errors, []);
  px.close();
});

test("insufficient_state, then recovered false: 'lost', and the stream restarts at the reply's position", async () => {
  const { px, last } = await connected();
  const sub = px.subscribe('chat:lobby');
  last().reply(last().lastSent('subscribe'), { channel: 'chat:lobby', offset: 5, epoch: 'e1', recovered: false });
  await sub.ready;
  const events = record(sub);
  last().receive({ type: 'unsubscribed', channel: 'chat:lobby', reason: 'insufficient_state', resubscribe: true });
  last().reply(last().lastSent('subscribe'), { channel: 'chat:lobby', offset: 3, epoch: 'e2', recovered: false });
  push(last(), 'chat:lobby', 4, 'e2');
  assert.deepEqual(
    events.filter(([name]) => name === 'lost'),
    [['lost', { since: { offset: 5, epoch: 'e1' }, offset: 3, epoch: 'e2' }]],
  );
  assert.deepEqual(messages(events), [4]);
  assert.deepEqual(sub.position, { offset: 4, epoch: 'e2' });
  px.close();
});

test('an unsubscribed push without resubscribe still ends the subscription', async () => {
  const { px, last } = await connected();
  const sub = px.subscribe('chat:lobby');
  last().reply(last().lastSent('subscribe'), { channel: 'chat:lobby', offset: 0, epoch: 'e1', recovered: false });
  await sub.ready;
  const before = last().sentOfType('subscribe').length;
  last().receive({ type: 'unsubscribed', channel: 'chat:lobby', reason: 'unsubscribed by the server' });
  assert.equal(sub.state, 'unsubscribed');
  assert.equal(last().sentOfType('subscribe').length, before);
  px.close();
});

// ---------------------------------------------------------------- subscribed pushes

test("a subscribed push makes a Subscription: 'subscribed' event before its messages, which are delivered", async () => {
  const { px, last, errors } = await connected();
  const made = [];
  const got = [];
  const all = [];
  px.on('message', (m) => all.push([m.channel, m.offset]));
  px.on('subscribed', (sub, result) => {
    made.push([sub.channel, result]);
    sub.on('message', (m) => got.push(m.offset)); // attached before the first message
  });
  granted(last(), '#alice', 4);
  push(last(), '#alice', 5);
  push(last(), '#alice', 5); // duplicate
  push(last(), '#alice', 6);
  assert.deepEqual(made, [['#alice', { channel: '#alice', offset: 4, epoch: 'e1', recovered: false }]]);
  const sub = px.getSubscription('#alice');
  assert.ok(sub);
  assert.equal(sub.server, true);
  assert.equal(sub.state, 'subscribed');
  assert.deepEqual(await sub.ready, { channel: '#alice', offset: 4, epoch: 'e1', recovered: false });
  assert.deepEqual(got, [5, 6]);
  assert.deepEqual(all, [['#alice', 5], ['#alice', 6]]);
  assert.deepEqual(sub.position, { offset: 6, epoch: 'e1' });
  // subscribe() of that channel is that subscription; nothing is sent.
  assert.equal(px.subscribe('#alice'), sub);
  assert.equal(last().sentOfType('subscribe').length, 0);
  // Commands on it go straight out.
  const p = sub.presence();
  last().reply(last().lastSent('presence'), { clients: {} });
  assert.deepEqual(await p, { clients: {} });
  assert.deepEqual(errors, []);
  px.close();
});

test('the app subscribes, the server subscribes it first: one subscription, no already_subscribed anywhere', async () => {
  const { px, last, errors } = await connected();
  const made = [];
  px.on('subscribed', (sub) => made.push(sub));
  const sub = px.subscribe('#alice');
  const events = record(sub);
  const cmd = last().lastSent('subscribe');
  granted(last(), '#alice', 2);
  last().error(cmd, 'already_subscribed');
  push(last(), '#alice', 3);
  await flush();
  assert.deepEqual(await sub.ready, { channel: '#alice', offset: 2, epoch: 'e1', recovered: false });
  assert.equal(sub.state, 'subscribed');
  assert.equal(px.getSubscription('#alice'), sub);
  assert.deepEqual(made, [], "the app already had it: no client 'subscribed' event");
  assert.deepEqual(events.map(([name]) => name), ['subscribed', 'message']);
  assert.deepEqual(errors, []);
  px.close();
});

test("the app's subscribe is answered first, the server's own attempt then fails without id: nothing surfaces", async () => {
  const { px, last, errors } = await connected();
  const sub = px.subscribe('#alice');
  const events = record(sub);
  last().reply(last().lastSent('subscribe'), { channel: '#alice', offset: 2, epoch: 'e1', recovered: false });
  last().receive({ type: 'error', code: 'already_subscribed', message: 'already subscribed to #alice' });
  push(last(), '#alice', 3);
  assert.deepEqual(errors, []);
  assert.deepEqual(events.map(([name]) => name), ['subscribed', 'message']);
  // Other errors without id still reach the app.
  last().receive({ type: 'error', code: 'permission_denied', message: 'secret:x' });
  assert.deepEqual(errors.map((e) => e.code), ['permission_denied']);
  px.close();
});

test('reconnect: the server subscribes again, the gap is read from history, held live messages follow, each once', async () => {
  const { px, clock, last } = await connected();
  granted(last(), '#alice', 4);
  const sub = px.getSubscription('#alice');
  const events = record(sub);
  push(last(), '#alice', 5);
  last().serverClose(1001);
  await clock.advance(0);
  const ws = last();
  ws.accept();
  // No subscribe yet: a ping first, to learn whether the server subscribes again.
  assert.deepEqual(ws.sent.map((m) => m.type), ['ping']);
  granted(ws, '#alice', 8);
  const history = ws.lastSent('history');
  assert.deepEqual({ since: history.since, limit: history.limit }, { since: { offset: 5, epoch: 'e1' }, limit: 3 });
  push(ws, '#alice', 9); // live, while the gap is being read
  push(ws, '#alice', 10);
  ws.receive({ type: 'pong', id: ws.sent[0].id });
  assert.equal(ws.sentOfType('subscribe').length, 0, 'subscribed by the server: no subscribe of ours');
  ws.reply(history, {
    messages: [6, 7, 8, 9].map((offset) => ({ type: 'message', channel: '#alice', data: { n: offset }, offset, epoch: 'e1', time: 1 })),
    offset: 9,
    epoch: 'e1',
  });
  push(ws, '#alice', 11);
  assert.deepEqual(messages(events), [5, 6, 7, 8, 9, 10, 11]);
  assert.deepEqual(
    events.filter(([name]) => name === 'recovered'),
    [['recovered', { since: { offset: 5, epoch: 'e1' }, offset: 8, epoch: 'e1', missed: 3 }]],
  );
  const recoveredAt = events.findIndex(([name]) => name === 'recovered');
  assert.deepEqual(events[recoveredAt + 1], ['message', 6], "'recovered' comes before the recovered messages");
  assert.equal(events.filter(([name]) => name === 'lost').length, 0);
  assert.equal(px.getSubscription('#alice'), sub);
  px.close();
});

test('reconnect: a server subscription the server does not renew is resubscribed with since after the ping', async () => {
  const { px, clock, last } = await connected();
  granted(last(), 'news', 4);
  const sub = px.getSubscription('news');
  const events = record(sub);
  last().serverClose(4008);
  await clock.advance(0);
  const ws = last();
  ws.accept();
  assert.deepEqual(ws.sent.map((m) => m.type), ['ping']);
  ws.receive({ type: 'pong', id: ws.sent[0].id });
  const cmd = ws.lastSent('subscribe');
  assert.deepEqual(cmd.since, { offset: 4, epoch: 'e1' });
  ws.reply(cmd, { channel: 'news', offset: 6, epoch: 'e1', recovered: true });
  for (const offset of [5, 6, 7]) push(ws, 'news', offset);
  assert.deepEqual(messages(events), [5, 6, 7]);
  assert.equal(events.filter(([name]) => name === 'recovered').length, 1);
  px.close();
});

test("reconnect: history no longer has the gap: 'lost', then the live messages from the server's position", async () => {
  const { px, clock, last } = await connected();
  granted(last(), '#alice', 4);
  const sub = px.getSubscription('#alice');
  const events = record(sub);
  last().serverClose(1006);
  await clock.advance(0);
  last().accept();
  granted(last(), '#alice', 20);
  push(last(), '#alice', 21);
  const history = last().lastSent('history');
  // Trimmed: the oldest kept message is 15, not 5.
  last().reply(history, {
    messages: [{ type: 'message', channel: '#alice', data: 1, offset: 15, epoch: 'e1', time: 1 }],
    offset: 21,
    epoch: 'e1',
  });
  assert.deepEqual(
    events.filter(([name]) => name === 'lost'),
    [['lost', { since: { offset: 4, epoch: 'e1' }, offset: 20, epoch: 'e1' }]],
  );
  assert.deepEqual(messages(events), [21]);
  assert.deepEqual(sub.position, { offset: 21, epoch: 'e1' });
  px.close();
});

test("reconnect: the server subscribes again in a new epoch: 'lost' at once, no history read", async () => {
  const { px, clock, last } = await connected();
  granted(last(), '#alice', 4);
  const sub = px.getSubscription('#alice');
  const events = record(sub);
  last().serverClose(1006);
  await clock.advance(0);
  last().accept();
  granted(last(), '#alice', 0, 'e2');
  push(last(), '#alice', 1, 'e2');
  assert.equal(last().sentOfType('history').length, 0);
  assert.deepEqual(
    events.filter(([name]) => name === 'lost'),
    [['lost', { since: { offset: 4, epoch: 'e1' }, offset: 0, epoch: 'e2' }]],
  );
  assert.deepEqual(messages(events), [1]);
  px.close();
});

test('a gap longer than one history page is read page by page', async () => {
  const { px, clock, last } = await connected();
  granted(last(), 'news', 0);
  const sub = px.getSubscription('news');
  const events = record(sub);
  last().serverClose(1006);
  await clock.advance(0);
  last().accept();
  granted(last(), 'news', 10005);
  const page = (from, to) =>
    Array.from({ length: to - from + 1 }, (_, i) => ({ type: 'message', channel: 'news', data: null, offset: from + i, epoch: 'e1', time: 1 }));
  const first = last().lastSent('history');
  assert.equal(first.limit, 10000);
  last().reply(first, { messages: page(1, 10000), offset: 10005, epoch: 'e1' });
  const second = last().lastSent('history');
  assert.deepEqual({ since: second.since, limit: second.limit }, { since: { offset: 10000, epoch: 'e1' }, limit: 5 });
  assert.equal(messages(events).length, 0, 'nothing is delivered before the gap is complete');
  last().reply(second, { messages: page(10001, 10005), offset: 10005, epoch: 'e1' });
  const got = messages(events);
  assert.equal(got.length, 10005);
  assert.ok(got.every((offset, i) => offset === i + 1));
  px.close();
});

test('a drop while the gap is read: nothing of it delivered, the next connection reads it again', async () => {
  const { px, clock, last } = await connected();
  granted(last(), '#alice', 4);
  const sub = px.getSubscription('#alice');
  const events = record(sub);
  last().serverClose(1006);
  await clock.advance(0);
  last().accept();
  granted(last(), '#alice', 6);
  push(last(), '#alice', 7);
  last().serverClose(1006);
  await clock.advance(0);
  last().accept();
  granted(last(), '#alice', 7);
  const history = last().lastSent('history');
  assert.deepEqual(history.since, { offset: 4, epoch: 'e1' });
  last().reply(history, {
    messages: [5, 6, 7].map((offset) => ({ type: 'message', channel: '#alice', data: null, offset, epoch: 'e1', time: 1 })),
    offset: 7,
    epoch: 'e1',
  });
  assert.deepEqual(messages(events), [5, 6, 7]);
  assert.equal(events.filter(([name]) => name === 'lost').length, 0);
  px.close();
});

test('insufficient_state on a server subscription resubscribes it with since like any other', async () => {
  const { px, last } = await connected();
  granted(last(), '#alice', 4);
  const sub = px.getSubscription('#alice');
  const events = record(sub);
  push(last(), '#alice', 5);
  last().receive({ type: 'unsubscribed', channel: '#alice', reason: 'insufficient_state', resubscribe: true });
  const cmd = last().lastSent('subscribe');
  assert.deepEqual(cmd.since, { offset: 5, epoch: 'e1' });
  last().reply(cmd, { channel: '#alice', offset: 6, epoch: 'e1', recovered: true });
  push(last(), '#alice', 6);
  assert.deepEqual(messages(events), [5, 6]);
  assert.equal(sub.server, true);
  px.close();
});

// ---------------------------------------------------------------- token refresh

test('getToken is asked before the token expires and the new one is sent with auth', async () => {
  const now = () => 1_000; // the fake clock starts at 1,000,000 ms
  const first = jwt({ sub: 'alice', exp: now() + 100 });
  const second = jwt({ sub: 'alice', exp: now() + 200 });
  const tokens = [second, second];
  let asked = 0;
  const { px, clock, last } = await connected({
    pingAfter: 1e9, // no heartbeat in the way of the long clock jumps
    token: first,
    getToken: async () => {
      asked++;
      return tokens.shift();
    },
  });
  assert.ok(last().url.includes(`token=${first}`));
  await clock.advance(69_999); // refreshBefore (30 s) ahead of expiry
  assert.equal(asked, 0);
  await clock.advance(1);
  assert.equal(asked, 1);
  const auth = last().lastSent('auth');
  assert.equal(auth.token, second);
  last().reply(auth, { user: 'alice' });
  await flush();
  // The next refresh: 30 s before the new expiry. The same token again gains
  // nothing and is not sent.
  await clock.advance(100_000 - 1);
  assert.equal(asked, 1);
  await clock.advance(1);
  assert.equal(asked, 2);
  assert.equal(last().sentOfType('auth').length, 1);
  assert.equal(px.state, 'connected');
  px.close();
});

test('a short-lived token is refreshed halfway; a failing getToken reaches error handlers', async () => {
  const token = jwt({ exp: 1_000 + 10 }); // 10 s left: refreshed after 5 s
  const { px, clock, errors } = await connected({
    pingAfter: 1e9,
    token,
    getToken: async () => {
      throw new Error('backend down');
    },
  });
  await clock.advance(4_999);
  assert.equal(errors.length, 0);
  await clock.advance(1);
  assert.deepEqual(errors.map((e) => e.code), ['token_error']);
  assert.equal(px.state, 'connected', 'the server decides: 4002 at expiry, then getToken again');
  px.close();
});

test('no refresh without getToken or without exp', async () => {
  const { px, clock, last } = await connected({ pingAfter: 1e9, token: jwt({ sub: 'a', exp: 1_000 + 10 }) });
  await clock.advance(60_000);
  assert.equal(last().sentOfType('auth').length, 0);
  px.close();
  let asked = 0;
  const other = await connected({ pingAfter: 1e9, token: jwt({ sub: 'a' }), getToken: () => (asked++, 'x') });
  await other.clock.advance(60_000);
  assert.equal(asked, 0);
  other.px.close();
});
