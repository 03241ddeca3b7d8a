'use strict';
// A Node `ws` server speaking the subset of the Plexus protocol v1 that the
// benchmarks use, so the same load client drives both servers:
//   welcome on open; subscribe / publish / ping commands; message pushes;
//   HTTP POST /api/publish {"channel","data"} -> {"offset"}.
// Fan-out serializes a push once and sends the same Buffer to every
// subscriber, which is what a careful Node server does.
// Usage: node server.js [PORT]   (or env PORT; 0 = ephemeral)
// PERMESSAGE_DEFLATE=1: negotiate permessage-deflate with ws's defaults (each
// socket keeps its own compression context) and no size threshold, so that
// chat-sized messages are compressed too (ws's default threshold is 1 KiB).

const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] ?? process.env.PORT ?? 0);
const channels = new Map(); // name -> {subs: Set<ws>, offset: number}
// Ids and epoch as long as Plexus's, so both servers push frames of the same size.
const epoch = Math.random().toString(36).slice(2, 10).padEnd(8, '0');
let nextClient = 0x100000000;

function channel(name) {
  let ch = channels.get(name);
  if (ch === undefined) {
    ch = { subs: new Set(), offset: 0 };
    channels.set(name, ch);
  }
  return ch;
}

function publish(name, data, from) {
  const ch = channel(name);
  ch.offset += 1;
  const push = { type: 'message', channel: name, data, offset: ch.offset, epoch, time: Date.now() };
  if (from !== undefined) push.from = from;
  const frame = Buffer.from(JSON.stringify(push));
  for (const ws of ch.subs) ws.send(frame, { binary: false });
  return ch.offset;
}

function reply(ws, id, result) {
  if (id !== undefined) ws.send(JSON.stringify({ type: 'reply', id, result }));
}

function error(ws, id, code, message) {
  const msg = { type: 'error', code, message };
  if (id !== undefined) msg.id = id;
  ws.send(JSON.stringify(msg));
}

const server = http.createServer((req, res) => {
  if (req.method !== 'POST' || req.url !== '/api/publish') {
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end('{"error":{"code":"not_found","message":"not found"}}');
    return;
  }
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch {
      res.writeHead(400, { 'content-type': 'application/json' });
      res.end('{"error":{"code":"bad_request","message":"not JSON"}}');
      return;
    }
    const offset = publish(String(body.channel), body.data, undefined);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ offset }));
  });
});

const wss = new WebSocketServer({
  server,
  path: '/ws',
  perMessageDeflate: process.env.PERMESSAGE_DEFLATE === '1' ? { threshold: 0 } : false,
  clientTracking: false,
  maxPayload: 64 * 1024,
});

wss.on('connection', (ws) => {
  const client = `c-${(nextClient++).toString(16)}`;
  const subscribed = new Set();
  ws.on('error', () => {});
  ws.on('close', () => {
    for (const name of subscribed) {
      const ch = channels.get(name);
      if (ch !== undefined) ch.subs.delete(ws);
    }
  });
  ws.on('message', (raw, isBinary) => {
    let cmd;
    try {
      cmd = JSON.parse(isBinary ? raw.toString('utf8') : raw);
    } catch {
      error(ws, undefined, 'bad_request', 'not JSON');
      return;
    }
    if (cmd === null || typeof cmd !== 'object') {
      error(ws, undefined, 'bad_request', 'not an object');
      return;
    }
    const id = cmd.id;
    switch (cmd.type) {
      case 'subscribe': {
        const name = String(cmd.channel);
        if (subscribed.has(name)) {
          error(ws, id, 'already_subscribed', name);
          return;
        }
        subscribed.add(name);
        const ch = channel(name);
        ch.subs.add(ws);
        reply(ws, id, { channel: name, offset: ch.offset, epoch, recovered: false });
        return;
      }
      case 'unsubscribe': {
        const name = String(cmd.channel);
        subscribed.delete(name);
        const ch = channels.get(name);
        if (ch !== undefined) ch.subs.delete(ws);
        reply(ws, id, {});
        return;
      }
      case 'publish': {
        const offset = publish(String(cmd.channel), cmd.data, { client, user: null });
        reply(ws, id, { offset });
        return;
      }
      case 'ping':
        ws.send(id === undefined ? '{"type":"pong"}' : JSON.stringify({ type: 'pong', id }));
        return;
      default:
        error(ws, id, 'unknown_type', String(cmd.type));
    }
  });
  ws.send(
    JSON.stringify({ type: 'welcome', client, user: null, server: 'node-ws-peer', ping_interval: 25 }),
  );
});

server.listen(port, '127.0.0.1', () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});

function stop() {
  server.close();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
