// Fakes for the unit tests: a manual clock, a scriptable WebSocket and a scriptable
// streaming fetch. Nothing here touches the network.

export class FakeTimers {
  now = 0;
  #next = 1;
  #due = new Map(); // id -> { at, fn }
  setTimeout = (fn, ms) => {
    const id = this.#next++;
    this.#due.set(id, { at: this.now + Math.max(0, ms | 0), fn });
    return id;
  };
  clearTimeout = (id) => {
    this.#due.delete(id);
  };
  get pending() {
    return this.#due.size;
  }
  /** The delays (from now) of the pending timers. */
  delays() {
    return [...this.#due.values()].map((t) => t.at - this.now);
  }
  /** Advances the clock, running due timers in order (and the microtasks they queue). */
  async tick(ms) {
    const end = this.now + ms;
    for (;;) {
      let best = null;
      for (const [id, t] of this.#due) if (t.at <= end && (!best || t.at < best[1].at)) best = [id, t];
      if (!best) break;
      this.#due.delete(best[0]);
      this.now = best[1].at;
      best[1].fn();
      await flush();
    }
    this.now = end;
    await flush();
  }
}

/** Lets pending promise callbacks run. */
export async function flush() {
  for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
}

export function fakeWebSocket() {
  const sockets = [];
  class FakeWS {
    readyState = 0;
    onopen = null;
    onmessage = null;
    onclose = null;
    onerror = null;
    sent = [];
    closedByClient = null;
    constructor(url) {
      this.url = url;
      sockets.push(this);
    }
    get query() {
      return new URL(this.url).searchParams;
    }
    send(data) {
      if (this.readyState !== 1) throw new Error('not open');
      this.sent.push(JSON.parse(data));
    }
    close(code = 1000) {
      this.closedByClient = code;
      this.readyState = 3;
    }
    // Server side:
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    receive(obj) {
      this.onmessage?.({ data: typeof obj === 'string' ? obj : JSON.stringify(obj) });
    }
    /** The server closes (after an open) or the connection fails (code 1006). */
    serverClose(code, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
  }
  return { WebSocket: FakeWS, sockets };
}

/** A streaming fetch: each call returns a response whose body the test writes. */
export function fakeFetch() {
  const calls = [];
  async function fetch(url, init) {
    const call = {
      url,
      init,
      query: new URL(url).searchParams,
      chunks: [],
      waiters: [],
      ended: false,
      cancelled: false,
      respond: null,
    };
    calls.push(call);
    const enc = new TextEncoder();
    call.write = (text) => {
      const w = call.waiters.shift();
      if (w) w({ done: false, value: enc.encode(text) });
      else call.chunks.push(text);
    };
    call.end = () => {
      call.ended = true;
      for (const w of call.waiters.splice(0)) w({ done: true });
    };
    return new Promise((resolve, reject) => {
      call.fail = (e) => reject(e ?? new TypeError('Failed to fetch'));
      call.respond = (status = 200) =>
        resolve({
          status,
          ok: status >= 200 && status < 300,
          body: {
            getReader: () => ({
              read: () => {
                if (call.chunks.length) return Promise.resolve({ done: false, value: enc.encode(call.chunks.shift()) });
                if (call.ended || call.cancelled) return Promise.resolve({ done: true });
                return new Promise((r) => call.waiters.push(r));
              },
              cancel: () => {
                call.cancelled = true;
                for (const w of call.waiters.splice(0)) w({ done: true });
              },
            }),
          },
        });
    });
  }
  return { fetch, calls };
}

export function sse(obj) {
  const id = obj.id ? `id: ${obj.id}\n` : '';
  return `${id}data: ${JSON.stringify(obj)}\n\n`;
}
