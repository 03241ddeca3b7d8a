// Type declarations for plexus.js, the Plexus client (protocol version 1).

/** Connection state; 'state' handlers get each change. */
export type ConnectionState = 'connecting' | 'connected' | 'reconnecting' | 'closed';

/** State of one subscription. */
export type SubscriptionState = 'subscribing' | 'subscribed' | 'unsubscribed';

/**
 * What an error's `code` can be: a protocol error code from the server, or one
 * made by the client.
 */
export type ErrorCode =
  | 'bad_request'
  | 'unknown_type'
  | 'invalid_channel'
  | 'not_subscribed'
  | 'already_subscribed'
  | 'unauthorized'
  | 'permission_denied'
  | 'too_large'
  | 'rate_limited'
  | 'unavailable'
  | 'not_found'
  | 'internal'
  /** no answer within `requestTimeout` */
  | 'timeout'
  /** the connection closed before the answer came, or the client is closed */
  | 'disconnected'
  /** `queueLimit` commands already wait for the connection */
  | 'queue_full'
  /** close code 4002 and no `getToken` to get a new token */
  | 'token_expired'
  /** `getToken` threw */
  | 'token_error'
  | (string & {});

/** The error every failed request rejects with. */
export class PlexusError extends Error {
  constructor(code: ErrorCode, message?: string);
  readonly name: 'PlexusError';
  readonly code: ErrorCode;
}

/**
 * Any JSON value, where binary data may appear as a Uint8Array (sent as
 * `{"$bytes": base64}`; received `{"$bytes": ...}` objects come back as Uint8Array).
 */
export type Data =
  | null
  | boolean
  | number
  | string
  | Uint8Array
  | Data[]
  | { [key: string]: Data };

/** What may be published: like `Data`, plus any ArrayBuffer or ArrayBuffer view. */
export type PublishData =
  | null
  | boolean
  | number
  | string
  | ArrayBuffer
  | ArrayBufferView
  | PublishData[]
  | { [key: string]: PublishData };

/** A channel position: the last offset seen, in a stream epoch. */
export interface StreamPosition {
  offset: number;
  epoch: string;
}

export interface Welcome {
  type: 'welcome';
  /** this connection's id, unique per connection */
  client: string;
  /** JWT `sub`, or null when anonymous */
  user: string | null;
  server: string;
  ping_interval: number;
}

export interface Publisher {
  client: string;
  user: string | null;
}

/** A `message` push (also the shape of each history entry). */
export interface Message<T = Data> {
  type: 'message';
  channel: string;
  data: T;
  offset: number;
  epoch?: string;
  /** milliseconds since the Unix epoch */
  time: number;
  /** absent for messages published through the HTTP API */
  from?: Publisher;
}

export interface JoinEvent {
  type: 'join';
  channel: string;
  client: string;
  user: string | null;
  info?: Data;
}

export interface LeaveEvent {
  type: 'leave';
  channel: string;
  client: string;
  user: string | null;
}

export interface SubscribeResult {
  channel: string;
  offset: number;
  epoch: string;
  recovered: boolean;
}

export interface PublishResult {
  offset: number;
}

export interface HistoryResult<T = Data> {
  /** oldest first */
  messages: Message<T>[];
  offset: number;
  epoch: string;
}

export interface PresenceResult {
  clients: { [client: string]: { user: string | null; info?: Data } };
}

export interface RpcResult<T = Data> {
  data: T;
}

export interface HistoryOptions {
  /** default 100 on the server */
  limit?: number;
  /** only messages after this position */
  since?: StreamPosition;
}

/**
 * Emitted after a resubscribe with `since` (a reconnect, or `insufficient_state`)
 * when nothing was lost; also when the server subscribed the connection again by
 * itself and the client read what was missed from `history`.
 */
export interface RecoveredEvent {
  /** the position the resubscribe asked from */
  since: StreamPosition;
  /** the channel's position at the resubscribe */
  offset: number;
  epoch: string;
  /** how many messages follow as pushes */
  missed: number;
}

/** What was missed since `since` could not be replayed: reload state (e.g. `history()`). */
export interface LostEvent {
  since: StreamPosition;
  offset: number;
  epoch: string;
}

export interface RetryEvent {
  /** failed attempts since the last stable connection */
  attempt: number;
  /** milliseconds until the next attempt */
  delay: number;
}

/** An injectable clock, for tests. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(id: unknown): void;
  /** a number in [0, 1) */
  random(): number;
}

export interface BackoffOptions {
  /** the first retry waits up to this many ms (default 500) */
  initial?: number;
  /** the cap of the exponential growth (default 20000) */
  max?: number;
  /** ms connected after which backoff starts again from `initial` (default 10000) */
  resetAfter?: number;
}

/** A WebSocket constructor: the browser's, or `WebSocket` from the `ws` package. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  readyState: number;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
};

export interface PlexusOptions {
  /** connection token (JWT), sent as `?token=` */
  token?: string | null;
  /**
   * asked for a token on connect when there is none, after close 4002, and
   * before the current token's `exp` (then sent with `auth`)
   */
  getToken?: () => string | null | undefined | Promise<string | null | undefined>;
  /**
   * ms before the token's `exp` to ask `getToken` for the next one (halfway
   * for a token that lives less than twice this); default 30000
   */
  refreshBefore?: number;
  /** the WebSocket implementation; default `globalThis.WebSocket` */
  WebSocket?: WebSocketConstructor;
  /**
   * transports to use, in order of preference; default `['websocket', 'sse']`:
   * a WebSocket that cannot open (or closes before `welcome`) is followed at
   * once by Server-Sent Events (`GET /sse` + `POST /emulation`) for that
   * connection, and the WebSocket is tried again on a later reconnect
   */
  transports?: Array<'websocket' | 'sse'>;
  /** the fetch implementation the SSE transport uses; default `globalThis.fetch` */
  fetch?: (input: string, init?: Record<string, unknown>) => Promise<unknown>;
  /** ms to wait for an answer (and for `welcome` on connect); default 10000 */
  requestTimeout?: number;
  /** ms without any incoming message before sending a `ping`; default 20000 */
  pingAfter?: number;
  /** ms to wait for the `pong` before the connection is dropped; default 5000 */
  pongTimeout?: number;
  /** commands that may wait for the connection; default 100 */
  queueLimit?: number;
  /** queue commands while disconnected (true) or reject them at once (false); default true */
  queueWhileDisconnected?: boolean;
  /** refuse larger outgoing messages with `too_large` (UTF-8 bytes; 0 = no check); default 65536 */
  maxMessageSize?: number;
  /** extra ms before reconnecting after close 4029 (rate limited); default 5000 */
  rateLimitDelay?: number;
  backoff?: BackoffOptions;
  clock?: Partial<Clock>;
}

export interface SubscribeOptions {
  /** shown to others in presence and join/leave, where the namespace allows (at most 1 KiB) */
  info?: Data;
  /** subscription token for private channels */
  token?: string;
  /** start from a known position (recover what came after it) */
  since?: StreamPosition;
}

type Off = () => void;

export class Subscription {
  readonly client: Plexus;
  readonly channel: string;
  readonly state: SubscriptionState;
  /** true when the server made (or took over) this subscription: a `subscribed` push */
  readonly server: boolean;
  /** resolves with the first subscribe reply (or `subscribed` push); rejects when the server refuses */
  readonly ready: Promise<SubscribeResult>;
  /** the last position seen, or null before the first reply */
  readonly position: StreamPosition | null;

  publish(data: PublishData): Promise<PublishResult>;
  history<T = Data>(options?: HistoryOptions): Promise<HistoryResult<T>>;
  presence(): Promise<PresenceResult>;
  unsubscribe(): Promise<{}>;

  on<T = Data>(event: 'message', fn: (message: Message<T>) => void): Off;
  on(event: 'join', fn: (event: JoinEvent) => void): Off;
  on(event: 'leave', fn: (event: LeaveEvent) => void): Off;
  on(event: 'subscribed', fn: (result: SubscribeResult) => void): Off;
  on(event: 'recovered', fn: (event: RecoveredEvent) => void): Off;
  on(event: 'lost', fn: (event: LostEvent) => void): Off;
  on(event: 'unsubscribed', fn: (event: { reason: string }) => void): Off;
  on(event: 'error', fn: (error: PlexusError) => void): Off;
  off(event: string, fn: (...args: any[]) => void): void;
}

export class Plexus {
  /**
   * @param url `ws(s)://host:port/ws`; http(s) URLs and, in a page, relative
   *   paths are accepted; omitted in a page: the page's own server.
   */
  constructor(url?: string, options?: PlexusOptions);

  static readonly VERSION: string;
  static readonly PlexusError: typeof PlexusError;

  readonly url: string;
  readonly state: ConnectionState;
  /** the transport of the current (or last) connection, null before the first */
  readonly transport: 'websocket' | 'sse' | null;
  /** the last `welcome`, null while not connected */
  readonly welcome: Welcome | null;
  readonly clientId: string | null;
  readonly user: string | null;
  /** clock time of the next reconnect attempt, or null */
  readonly retryAt: number | null;
  /**
   * largest outgoing message in UTF-8 bytes (0 = unchecked): the option if
   * given, else `max_message_size` from `welcome` if the server sends it, else 65536
   */
  readonly maxMessageSize: number;

  /** resolves with `welcome` once connected; rejects on close() or 4001 */
  connect(): Promise<Welcome>;
  /** the existing Subscription when there is one (also one the server made) */
  subscribe(channel: string, options?: SubscribeOptions): Subscription;
  /** the live subscription to a channel (the app's or the server's), or undefined */
  getSubscription(channel: string): Subscription | undefined;
  publish(channel: string, data: PublishData): Promise<PublishResult>;
  history<T = Data>(channel: string, options?: HistoryOptions): Promise<HistoryResult<T>>;
  presence(channel: string): Promise<PresenceResult>;
  rpc<T = Data>(method: string, data?: PublishData): Promise<RpcResult<T>>;
  /** new token for later connects; when connected also sent with `auth` */
  setToken(token: string | null): Promise<{ user: string | null } | null>;
  /** skip the rest of the current backoff delay */
  retryNow(): void;
  close(): void;

  on(event: 'state', fn: (state: ConnectionState, previous: ConnectionState) => void): Off;
  on<T = Data>(event: 'message', fn: (message: Message<T>) => void): Off;
  on(event: 'error', fn: (error: PlexusError) => void): Off;
  on(event: 'retry', fn: (event: RetryEvent) => void): Off;
  /**
   * the server subscribed this connection to a channel the app had no
   * Subscription for; emitted once per new Subscription, before its messages
   */
  on(event: 'subscribed', fn: (subscription: Subscription, result: SubscribeResult) => void): Off;
  off(event: string, fn: (...args: any[]) => void): void;
}

/** Replace binary values by `{"$bytes": base64}` (returns a copy). */
export function encodeBytes(value: PublishData): unknown;
/** Replace `{"$bytes": base64}` objects by Uint8Array (in place). */
export function decodeBytes(value: unknown): Data;

export default Plexus;
