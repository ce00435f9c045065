/**
 * changecast client: one live stream of a user's events over WebSocket, or Server-Sent
 * Events where WebSockets are blocked, with automatic reconnect, resume without loss, and
 * token refresh. No runtime dependencies; runs in browsers and in Node (>= 20, with an
 * injected WebSocket for the WebSocket transport).
 */

// ---------------------------------------------------------------------------------------
// Events

/** First event of every connection. */
export interface ReadyEvent {
  type: 'ready';
  user: string;
  /** Id of the newest event the user could have had (null before any). */
  position: string | null;
  /** Whether everything after `since` was replayed. */
  resumed: boolean;
  /** With the `last` option on a connection without a resume point: how many of the
   * user's newest events follow (oldest first), before live ones. */
  last?: number;
}

/** A routed database change. */
export interface ChangeEvent<Doc = Record<string, unknown>> {
  type: 'change';
  id: string;
  route: string;
  op: 'insert' | 'update' | 'replace' | 'delete';
  collection: string;
  key: string;
  at: string;
  doc: Doc;
}

/** An alert whose condition became true. */
export interface AlertEvent<Doc = Record<string, unknown>> {
  type: 'alert';
  id: string;
  alert: string;
  collection: string;
  key: string;
  at: string;
  message: string;
  doc: Doc;
}

/** A server-side published message. */
export interface MessageEvent<T = unknown> {
  type: 'message';
  id: string;
  event: T;
}

/** Events were missed (history no longer has them): refetch your state. */
export interface GapEvent {
  type: 'gap';
  since: string | null;
  position: string | null;
}

export type State = 'connecting' | 'live' | 'reconnecting' | 'stopped';
export type TransportName = 'ws' | 'sse';

/** Emitted on every state change. */
export interface StateEvent {
  state: State;
  transport: TransportName;
  /** Close code (WebSocket), or the equivalent for SSE (401 → 1008, 403 → 4003, 429 → 1013). */
  code?: number;
  reason?: string;
  /** For `reconnecting`: the wait before the next attempt, in ms. */
  delay?: number;
  /** For `reconnecting`: consecutive failed attempts so far. */
  attempt?: number;
}

export interface EventMap {
  ready: ReadyEvent;
  change: ChangeEvent;
  alert: AlertEvent;
  message: MessageEvent;
  gap: GapEvent;
  state: StateEvent;
  /** Non-fatal problems (token provider failed, unparsable frame, listener threw). */
  error: Error;
}

// ---------------------------------------------------------------------------------------
// Injectable environment

/** The part of the WebSocket API the client uses. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** The part of `fetch` the SSE transport uses (a streaming response body). */
export type FetchLike = (
  url: string,
  init: { headers: Record<string, string>; signal: AbortSignal; cache?: string },
) => Promise<{
  status: number;
  ok: boolean;
  body: { getReader(): { read(): Promise<{ done: boolean; value?: Uint8Array }>; cancel(): Promise<void> | void } } | null;
}>;

export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface BackoffOptions {
  /** First retry waits up to this (ms). Default 500. */
  base?: number;
  /** No wait is longer than this (ms). Default 10 000. */
  cap?: number;
  /** A connection live this long (ms) resets the backoff. Default 5 000. */
  stableAfter?: number;
}

export interface ChangecastOptions {
  /** Server base URL (`https://host:port`, `ws://…` also accepted). Default: the page's origin. */
  url?: string;
  /** A token, or a provider called on every connect, on 4001 and on `expiring`. */
  token: string | (() => string | Promise<string>);
  /** `auto` (default): WebSocket, SSE after `sseAfter` failed WebSocket attempts in a row. */
  transport?: 'auto' | 'ws' | 'sse';
  /** Resume after this event id. */
  since?: string | null;
  /**
   * Open on the user's recent activity: with no resume point yet (no `since`, no event
   * seen), ask for the newest N events (`?last=N`, at most 1000 are served), which arrive
   * oldest first before live ones. Reconnects resume with `since` as usual. A whole
   * number; default none.
   */
  last?: number;
  backoff?: BackoffOptions;
  /** `client_id` query parameter. */
  clientId?: string;
  /** Failed WebSocket connection attempts in a row (never opened) before SSE. Default 3. */
  sseAfter?: number;
  /** WebSocket: send `{"type":"ping"}` after this long without a frame (ms). Default 20 000. */
  pingInterval?: number;
  /** WebSocket: give up on the connection this long after a ping without an answer. Default 10 000. */
  pingTimeout?: number;
  /** SSE: give up after this long without any bytes (the server comments every 15 s). Default 45 000. */
  sseIdleTimeout?: number;
  /** Connect in the constructor. Default true; otherwise call `connect()`. */
  autoConnect?: boolean;
  WebSocket?: WebSocketConstructor;
  fetch?: FetchLike;
  timers?: Timers;
  /** Uniform in [0, 1): the jitter source. */
  random?: () => number;
}

// ---------------------------------------------------------------------------------------
// Helpers (exported for tests and advanced use)

/**
 * Whether event id `a` comes after `b`. Ids are `<epoch>-<seq>`: within one epoch compare
 * the sequence numbers; a different epoch (or an unknown shape) counts as newer.
 */
export function isAfter(a: string, b: string | null | undefined): boolean {
  if (!b) return true;
  const pa = splitId(a);
  const pb = splitId(b);
  if (!pa || !pb || pa.epoch !== pb.epoch) return a !== b;
  if (pa.seq.length !== pb.seq.length) return pa.seq.length > pb.seq.length;
  return pa.seq > pb.seq;
}

function splitId(id: string): { epoch: string; seq: string } | null {
  const i = id.lastIndexOf('-');
  if (i < 0) return null;
  const seq = id.slice(i + 1).replace(/^0+(?=\d)/, '');
  if (!/^\d+$/.test(seq)) return null;
  return { epoch: id.slice(0, i), seq };
}

/** Full-jitter exponential backoff: uniform in [0, min(cap, base * 2^attempt)). */
export function backoffDelay(attempt: number, base = 500, cap = 10_000, random: () => number = Math.random): number {
  const ceiling = Math.min(cap, base * Math.pow(2, Math.max(0, attempt)));
  return Math.floor(random() * ceiling);
}

/** What the client does after a close code. */
export type Reaction = 'stop' | 'refresh' | 'resume' | 'later';
export function reactionTo(code: number): Reaction {
  switch (code) {
    case 1008: // bad credentials
    case 4003: // unknown user or client id not allowed
      return 'stop';
    case 4001: // token expired: new token, then resume
      return 'refresh';
    case 1013: // too many connections
      return 'later';
    default: // 4008 too slow, 1012 restarting, 1011 internal, 1006 network, ...
      return 'resume';
  }
}

const STOP_REASONS: Record<number, string> = {
  1008: 'invalid credentials',
  4003: 'unknown user or client id not allowed',
};
const CLOSE_REASONS: Record<number, string> = {
  4001: 'token expired',
  4008: 'connection too slow',
  1012: 'server restarting',
  1011: 'server error',
  1013: 'too many connections',
  1006: 'connection lost',
};

const realTimers: Timers = {
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (h) => globalThis.clearTimeout(h as ReturnType<typeof setTimeout>),
};

type Listener<K extends keyof EventMap> = (ev: EventMap[K]) => void;

interface Connection {
  kind: TransportName;
  opened: boolean;
  send(text: string): boolean;
  abandon(): void;
}

// ---------------------------------------------------------------------------------------
// The client

export class Changecast {
  /** Current state. */
  state: State = 'connecting';
  /** Id of the last event received (or the ready position before any): the resume point. */
  lastEventId: string | null;
  /** Transport in use (or next to be used). */
  transport: TransportName;

  private readonly opts: ChangecastOptions;
  private readonly timers: Timers;
  private readonly random: () => number;
  private readonly base: number;
  private readonly cap: number;
  private readonly stableAfter: number;
  private readonly listeners = new Map<keyof EventMap, Set<Listener<any>>>();

  private stopped = false;
  private started = false;
  private gen = 0;
  private attempt = 0;
  private wsFailures = 0;
  private wsEverOpened = false;
  private conn: Connection | null = null;
  private retryTimer: unknown = null;
  private stableTimer: unknown = null;
  private watchdog: unknown = null;
  private refreshTimer: unknown = null;

  constructor(options: ChangecastOptions) {
    this.opts = options;
    this.timers = options.timers ?? realTimers;
    this.random = options.random ?? Math.random;
    this.base = options.backoff?.base ?? 500;
    this.cap = options.backoff?.cap ?? 10_000;
    this.stableAfter = options.backoff?.stableAfter ?? 5_000;
    this.lastEventId = options.since ?? null;
    if (options.last !== undefined && !(Number.isInteger(options.last) && options.last >= 0)) {
      throw new RangeError('changecast: last must be a whole number of events, got ' + String(options.last));
    }
    const hasWs = !!(options.WebSocket ?? (globalThis as any).WebSocket);
    this.transport = options.transport === 'sse' || (options.transport !== 'ws' && !hasWs) ? 'sse' : 'ws';
    if (options.autoConnect !== false) this.connect();
  }

  /** Subscribes to an event; returns the unsubscribe function. */
  on<K extends keyof EventMap>(type: K, fn: Listener<K>): () => void {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }

  off<K extends keyof EventMap>(type: K, fn: Listener<K>): void {
    this.listeners.get(type)?.delete(fn);
  }

  /** Starts connecting (done by the constructor unless `autoConnect: false`). */
  connect(): void {
    if (this.started || this.stopped) return;
    this.started = true;
    // On the next microtask, so that listeners added right after the constructor see it all.
    void Promise.resolve().then(() => this.open());
  }

  /** Closes the connection and stops for good: no reconnect, no timers left. */
  close(): void {
    if (this.stopped) return;
    this.finish('closed by the client');
  }

  // -------------------------------------------------------------------------------------

  private emit<K extends keyof EventMap>(type: K, ev: EventMap[K]): void {
    const set = this.listeners.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(ev);
      } catch (e) {
        if (type !== 'error') this.emit('error', e instanceof Error ? e : new Error(String(e)));
      }
    }
  }

  private setState(state: State, extra: Omit<StateEvent, 'state' | 'transport'> = {}): void {
    this.state = state;
    this.emit('state', { state, transport: this.transport, ...extra });
  }

  private clear(handle: unknown): null {
    if (handle != null) this.timers.clearTimeout(handle);
    return null;
  }

  private clearConnectionTimers(): void {
    this.stableTimer = this.clear(this.stableTimer);
    this.watchdog = this.clear(this.watchdog);
    this.refreshTimer = this.clear(this.refreshTimer);
  }

  private finish(detail: string, code?: number): void {
    this.stopped = true;
    this.gen++;
    this.retryTimer = this.clear(this.retryTimer);
    this.clearConnectionTimers();
    const c = this.conn;
    this.conn = null;
    c?.abandon();
    this.setState('stopped', code === undefined ? { reason: detail } : { code, reason: detail });
  }

  private async token(): Promise<string> {
    const t = this.opts.token;
    return typeof t === 'function' ? await t() : t;
  }

  private baseUrl(): string {
    let url = this.opts.url ?? (globalThis as any).location?.origin;
    if (!url) throw new Error('changecast: no url given');
    return String(url).replace(/\/+$/, '');
  }

  private query(token: string | null): string {
    const q: string[] = [];
    if (token != null) q.push('token=' + encodeURIComponent(token));
    if (this.lastEventId) q.push('since=' + encodeURIComponent(this.lastEventId));
    else if (this.opts.last) q.push('last=' + this.opts.last);
    if (this.opts.clientId) q.push('client_id=' + encodeURIComponent(this.opts.clientId));
    return q.length ? '?' + q.join('&') : '';
  }

  private async open(): Promise<void> {
    if (this.stopped) return;
    const my = ++this.gen;
    this.retryTimer = null;
    if (this.state !== 'reconnecting') this.setState('connecting');
    let token: string;
    try {
      token = await this.token();
    } catch (e) {
      if (my !== this.gen || this.stopped) return;
      this.emit('error', new Error('token provider failed: ' + (e instanceof Error ? e.message : String(e))));
      this.onClosed(my, 1006, 'token provider failed', false);
      return;
    }
    if (my !== this.gen || this.stopped) return;
    if (this.transport === 'ws') this.openWs(my, token);
    else void this.openSse(my, token);
  }

  // ---- WebSocket ----------------------------------------------------------------------

  private openWs(my: number, token: string): void {
    const Ctor = this.opts.WebSocket ?? ((globalThis as any).WebSocket as WebSocketConstructor);
    const base = this.baseUrl().replace(/^http/, 'ws');
    let ws: WebSocketLike;
    try {
      ws = new Ctor(base + '/v1/ws' + this.query(token));
    } catch (e) {
      this.onClosed(my, 1006, 'cannot open a WebSocket', false);
      return;
    }
    const conn: Connection = {
      kind: 'ws',
      opened: false,
      send: (text) => {
        if (ws.readyState !== 1) return false;
        ws.send(text);
        return true;
      },
      abandon: () => {
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        try {
          ws.close(1000);
        } catch {
          /* already closed */
        }
      },
    };
    this.conn = conn;
    ws.onopen = () => {
      if (my !== this.gen) return;
      conn.opened = true;
      this.wsEverOpened = true;
      this.wsFailures = 0;
      this.touch(my);
    };
    ws.onmessage = (e) => {
      if (my !== this.gen) return;
      this.touch(my);
      if (typeof e.data !== 'string') return;
      this.frame(my, e.data);
    };
    ws.onerror = () => {};
    ws.onclose = (e) => {
      if (my !== this.gen) return;
      this.onClosed(my, e.code, e.reason, conn.opened);
    };
  }

  /** Liveness: WebSocket pings when quiet, SSE idle timeout. Any frame re-arms it. */
  private touch(my: number): void {
    this.watchdog = this.clear(this.watchdog);
    if (this.conn?.kind === 'ws') {
      const interval = this.opts.pingInterval ?? 20_000;
      this.watchdog = this.timers.setTimeout(() => {
        if (my !== this.gen) return;
        this.conn?.send('{"type":"ping"}');
        this.watchdog = this.timers.setTimeout(() => {
          if (my !== this.gen) return;
          this.lost(my, 'no answer to ping');
        }, this.opts.pingTimeout ?? 10_000);
      }, interval);
    } else {
      this.watchdog = this.timers.setTimeout(() => {
        if (my !== this.gen) return;
        this.lost(my, 'stream idle');
      }, this.opts.sseIdleTimeout ?? 45_000);
    }
  }

  /** Gives up on a connection that went silent. */
  private lost(my: number, why: string): void {
    const c = this.conn;
    this.conn = null;
    this.gen++;
    c?.abandon();
    this.onClosed(this.gen, 1006, why, true);
    void my;
  }

  // ---- SSE (fetch streaming: unlike EventSource it sees the HTTP status and the
  //      `: close <code>` comments, so it can react to each code like the WebSocket) ----

  private async openSse(my: number, token: string): Promise<void> {
    const doFetch = this.opts.fetch ?? ((globalThis as any).fetch as FetchLike);
    const ctl = new AbortController();
    let reader: { read(): Promise<{ done: boolean; value?: Uint8Array }>; cancel(): Promise<void> | void } | null = null;
    const conn: Connection = {
      kind: 'sse',
      opened: false,
      send: () => false,
      abandon: () => {
        try {
          ctl.abort();
        } catch {
          /* ignore */
        }
        try {
          void Promise.resolve(reader?.cancel()).catch(() => {});
        } catch {
          /* ignore */
        }
      },
    };
    this.conn = conn;
    let res: Awaited<ReturnType<FetchLike>>;
    try {
      res = await doFetch(this.baseUrl() + '/v1/sse' + this.query(null), {
        headers: { Authorization: 'Bearer ' + token, Accept: 'text/event-stream' },
        signal: ctl.signal,
        cache: 'no-store',
      });
    } catch (e) {
      if (my === this.gen) this.onClosed(my, 1006, 'cannot reach the server', false);
      return;
    }
    if (my !== this.gen) return;
    if (!res.ok || !res.body) {
      const code = res.status === 401 ? 1008 : res.status === 403 ? 4003 : res.status === 429 ? 1013 : 1011;
      this.onClosed(my, code, 'HTTP ' + res.status, false);
      return;
    }
    conn.opened = true;
    this.touch(my);
    reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    let data: string[] = [];
    let closeCode: number | null = null;
    let closeReason = '';
    const line = (l: string) => {
      if (l === '') {
        if (data.length) this.frame(my, data.join('\n'));
        data = [];
        return;
      }
      if (l.startsWith(':')) {
        const m = /^:\s*close\s+(\d+)\s*(.*)$/.exec(l);
        if (m) {
          closeCode = Number(m[1]);
          closeReason = m[2];
        }
        return;
      }
      const i = l.indexOf(':');
      const field = i < 0 ? l : l.slice(0, i);
      let value = i < 0 ? '' : l.slice(i + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'data') data.push(value);
      // `id:` repeats the JSON's id, `event:`/`retry:` are not used by changecast.
    };
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (my !== this.gen) return;
        if (done) break;
        this.touch(my);
        buf += decoder.decode(value, { stream: true });
        let nl: number;
        while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
          const l = buf.slice(0, nl);
          buf = buf.slice(nl + (buf.startsWith('\r\n', nl) ? 2 : 1));
          line(l);
          if (my !== this.gen) return;
        }
      }
    } catch {
      if (my !== this.gen) return;
    }
    this.onClosed(my, closeCode ?? 1006, closeCode ? closeReason : 'stream ended', true);
  }

  // ---- Frames ---------------------------------------------------------------------------

  private frame(my: number, text: string): void {
    let msg: any;
    try {
      msg = JSON.parse(text);
    } catch {
      this.emit('error', new Error('unparsable frame'));
      return;
    }
    if (!msg || typeof msg !== 'object') return;
    switch (msg.type) {
      case 'ready': {
        // The resume point before any event: the position, unless recent events follow
        // (their ids are below it; the first of them becomes the resume point).
        if (!this.lastEventId && msg.position && !(msg.last > 0)) this.lastEventId = msg.position;
        this.stableTimer = this.clear(this.stableTimer);
        this.stableTimer = this.timers.setTimeout(() => {
          if (my === this.gen) this.attempt = 0;
        }, this.stableAfter);
        this.setState('live', { attempt: this.attempt });
        this.emit('ready', msg as ReadyEvent);
        break;
      }
      case 'change':
      case 'alert':
      case 'message': {
        if (typeof msg.id === 'string') {
          if (this.lastEventId && !isAfter(msg.id, this.lastEventId)) return; // already seen
          this.lastEventId = msg.id;
        }
        this.emit(msg.type, msg);
        break;
      }
      case 'gap': {
        if (msg.position) this.lastEventId = msg.position;
        this.emit('gap', msg as GapEvent);
        break;
      }
      case 'expiring': {
        const left = Number(msg.expires_in) || 0;
        this.refreshTimer = this.clear(this.refreshTimer);
        // Soon, but not at once: with very short-lived tokens the server warns right after
        // each refresh, and an immediate refresh would spin.
        this.refreshTimer = this.timers.setTimeout(() => void this.refresh(my), Math.min(left * 500, 5_000));
        break;
      }
      default:
        break; // pong and future types
    }
  }

  private async refresh(my: number): Promise<void> {
    this.refreshTimer = null;
    if (typeof this.opts.token !== 'function' || my !== this.gen) return;
    let token: string;
    try {
      token = await this.token();
    } catch (e) {
      this.emit('error', new Error('token provider failed: ' + (e instanceof Error ? e.message : String(e))));
      return; // the server closes with 4001 at expiry; the reconnect asks again
    }
    if (my !== this.gen || !this.conn) return;
    this.conn.send(JSON.stringify({ type: 'refresh', token }));
  }

  // ---- Closes and reconnects ------------------------------------------------------------

  private onClosed(my: number, code: number, reason: string, opened: boolean): void {
    if (my !== this.gen || this.stopped) return;
    this.conn = null;
    this.gen++;
    this.clearConnectionTimers();
    const reaction = reactionTo(code);
    if (reaction === 'stop') {
      this.finish(STOP_REASONS[code] + (reason ? ' (' + reason + ')' : ''), code);
      return;
    }
    if (this.transport === 'ws' && !opened) {
      this.wsFailures++;
      const after = this.opts.sseAfter ?? 3;
      if (this.opts.transport !== 'ws' && !this.wsEverOpened && this.wsFailures >= after) {
        this.transport = 'sse';
        this.attempt = 0;
      }
    }
    let attempt = this.attempt++;
    if (reaction === 'later') attempt = Math.max(attempt, 3);
    const delay = backoffDelay(attempt, this.base, this.cap, this.random);
    this.setState('reconnecting', {
      code,
      reason: CLOSE_REASONS[code] ?? (reason || 'connection closed'),
      delay,
      attempt: this.attempt,
    });
    this.retryTimer = this.clear(this.retryTimer);
    this.retryTimer = this.timers.setTimeout(() => void this.open(), delay);
  }
}

export default Changecast;
