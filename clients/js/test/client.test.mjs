import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { Changecast, backoffDelay, isAfter, reactionTo } from '../dist/changecast.js';
import { FakeTimers, fakeWebSocket, fakeFetch, flush, sse } from './fakes.mjs';

const URL_ = 'http://127.0.0.1:9999';
const MAX = () => 0.999999;

/** A client on fakes; `tokens` is what the provider returns, in order (the last repeats). */
function setup(opts = {}) {
  const timers = new FakeTimers();
  const ws = fakeWebSocket();
  const f = fakeFetch();
  const tokens = opts.tokens ?? ['t1'];
  let calls = 0;
  const provider = async () => tokens[Math.min(calls++, tokens.length - 1)];
  const states = [];
  const events = [];
  const cc = new Changecast({
    url: URL_,
    token: opts.token ?? provider,
    timers,
    WebSocket: ws.WebSocket,
    fetch: f.fetch,
    random: opts.random ?? MAX,
    ...opts.options,
  });
  cc.on('state', (s) => states.push(s));
  for (const t of ['ready', 'change', 'alert', 'message', 'gap']) cc.on(t, (e) => events.push(e));
  return {
    cc, timers, ws, f, states, events,
    get providerCalls() { return calls; },
    last: () => ws.sockets[ws.sockets.length - 1],
  };
}

const ready = (position = null, resumed = false) => ({ type: 'ready', user: 'u1', position, resumed });
const change = (id, key = 'o1') => ({ type: 'change', id, route: 'orders', op: 'insert', collection: 'orders', key, at: '2026-01-01T00:00:00Z', doc: { _id: key } });

describe('helpers', () => {
  test('backoff grows exponentially from 500 ms and is capped at 10 s', () => {
    const ceilings = [0, 1, 2, 3, 4, 5, 6, 10, 50].map((a) => backoffDelay(a, 500, 10_000, () => 1));
    assert.deepEqual(ceilings, [500, 1000, 2000, 4000, 8000, 10000, 10000, 10000, 10000]);
  });

  test('full jitter: delays lie in [0, ceiling) and use the whole range', () => {
    let seed = 42;
    const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    for (let attempt = 0; attempt < 8; attempt++) {
      const ceiling = Math.min(10_000, 500 * 2 ** attempt);
      const ds = Array.from({ length: 500 }, () => backoffDelay(attempt, 500, 10_000, rnd));
      assert.ok(ds.every((d) => d >= 0 && d < ceiling), `attempt ${attempt}`);
      assert.ok(Math.min(...ds) < ceiling * 0.1 && Math.max(...ds) > ceiling * 0.9, `spread at attempt ${attempt}`);
    }
    assert.equal(backoffDelay(3, 500, 10_000, () => 0), 0);
  });

  test('ids compare by sequence within an epoch, numerically', () => {
    assert.ok(isAfter('e1-10', 'e1-9'));
    assert.ok(!isAfter('e1-9', 'e1-10'));
    assert.ok(!isAfter('e1-10', 'e1-10'));
    assert.ok(isAfter('ecb628y3a-100', 'ecb628y3a-99'));
    assert.ok(isAfter('e2-1', 'e1-500'), 'another epoch counts as newer');
    assert.ok(isAfter('e1-1', null));
  });

  test('close-code reactions', () => {
    assert.equal(reactionTo(1008), 'stop');
    assert.equal(reactionTo(4003), 'stop');
    assert.equal(reactionTo(4001), 'refresh');
    for (const c of [4008, 1012, 1011, 1006]) assert.equal(reactionTo(c), 'resume');
    assert.equal(reactionTo(1013), 'later');
  });
});

describe('WebSocket client', () => {
  test('connects with the token from the provider and goes live on ready', async () => {
    const t = setup();
    await flush();
    assert.equal(t.ws.sockets.length, 1);
    const s = t.last();
    assert.equal(new URL(s.url).pathname, '/v1/ws');
    assert.equal(new URL(s.url).protocol, 'ws:');
    assert.equal(s.query.get('token'), 't1');
    assert.equal(s.query.get('since'), null);
    s.open();
    s.receive(ready('e1-4'));
    s.receive(change('e1-5'));
    assert.equal(t.cc.state, 'live');
    assert.deepEqual(t.events.map((e) => e.type), ['ready', 'change']);
    assert.equal(t.cc.lastEventId, 'e1-5');
    t.cc.close();
  });

  test('reconnect delays grow, are capped, and reset after a stable connection', async () => {
    const t = setup();
    await flush();
    const delays = [];
    for (let i = 0; i < 7; i++) {
      const s = t.last();
      s.open();
      s.receive(ready('e1-1'));
      s.serverClose(1012, 'restarting');
      const st = t.states.at(-1);
      assert.equal(st.state, 'reconnecting');
      delays.push(st.delay);
      await t.timers.tick(st.delay);
      assert.equal(t.ws.sockets.length, i + 2, 'reconnected after the delay');
    }
    assert.deepEqual(delays, [499, 999, 1999, 3999, 7999, 9999, 9999]);
    // Stable for stableAfter: the next failure starts again at the base.
    const s = t.last();
    s.open();
    s.receive(ready('e1-1'));
    await t.timers.tick(5_000);
    s.serverClose(1012);
    assert.equal(t.states.at(-1).delay, 499);
    t.cc.close();
  });

  test('waits the whole delay before reconnecting', async () => {
    const t = setup({ random: () => 0.5 });
    await flush();
    t.last().open();
    t.last().serverClose(1011);
    assert.equal(t.states.at(-1).delay, 250);
    await t.timers.tick(249);
    assert.equal(t.ws.sockets.length, 1);
    await t.timers.tick(1);
    assert.equal(t.ws.sockets.length, 2);
    t.cc.close();
  });

  test('resume uses the last event id', async () => {
    const t = setup();
    await flush();
    let s = t.last();
    s.open();
    s.receive(ready('e1-1'));
    s.receive(change('e1-2'));
    s.receive({ type: 'alert', id: 'e1-3', alert: 'stock_low', collection: 'inventory_items', key: 'i1', at: '', message: 'low', doc: {} });
    s.receive({ type: 'message', id: 'e1-4', event: { hi: 1 } });
    s.serverClose(4008, 'too slow');
    await t.timers.tick(10_000);
    s = t.last();
    assert.equal(s.query.get('since'), 'e1-4');
    t.cc.close();
  });

  test('resume uses the ready position when no event arrived yet', async () => {
    const t = setup();
    await flush();
    let s = t.last();
    s.open();
    s.receive(ready('e1-41'));
    s.serverClose(1012);
    await t.timers.tick(10_000);
    assert.equal(t.last().query.get('since'), 'e1-41');
    t.cc.close();
  });

  test('the since option is the first resume point, and gap moves it to the position', async () => {
    const t = setup({ options: { since: 'e1-7' } });
    await flush();
    let s = t.last();
    assert.equal(s.query.get('since'), 'e1-7');
    s.open();
    s.receive(ready('e1-90', false));
    s.receive({ type: 'gap', since: 'e1-7', position: 'e1-90' });
    assert.equal(t.events.at(-1).type, 'gap');
    s.serverClose(1012);
    await t.timers.tick(10_000);
    assert.equal(t.last().query.get('since'), 'e1-90');
    t.cc.close();
  });

  test('an event whose id is not after the last one is ignored', async () => {
    const t = setup();
    await flush();
    const s = t.last();
    s.open();
    s.receive(ready(null));
    s.receive(change('e1-9'));
    s.receive(change('e1-10'));
    s.receive(change('e1-10'));
    s.receive(change('e1-9'));
    s.receive(change('e1-11'));
    assert.deepEqual(t.events.filter((e) => e.type === 'change').map((e) => e.id), ['e1-9', 'e1-10', 'e1-11']);
    t.cc.close();
  });

  for (const code of [1008, 4003]) {
    test(`close ${code}: stops for good`, async () => {
      const t = setup();
      await flush();
      const s = t.last();
      s.open();
      s.serverClose(code, 'no');
      assert.equal(t.cc.state, 'stopped');
      assert.equal(t.states.at(-1).code, code);
      await t.timers.tick(60_000);
      assert.equal(t.ws.sockets.length, 1);
      assert.equal(t.timers.pending, 0);
    });
  }

  test('close 4001: asks the provider for a fresh token and resumes', async () => {
    const t = setup({ tokens: ['old', 'fresh'] });
    await flush();
    let s = t.last();
    s.open();
    s.receive(ready('e1-1'));
    s.receive(change('e1-2'));
    s.serverClose(4001, 'token expired');
    assert.equal(t.cc.state, 'reconnecting');
    await t.timers.tick(10_000);
    s = t.last();
    assert.equal(t.ws.sockets.length, 2);
    assert.equal(s.query.get('token'), 'fresh');
    assert.equal(s.query.get('since'), 'e1-2');
    assert.equal(t.providerCalls, 2);
    t.cc.close();
  });

  for (const code of [4008, 1012, 1011, 1006]) {
    test(`close ${code}: reconnects with since after a backoff`, async () => {
      const t = setup();
      await flush();
      let s = t.last();
      s.open();
      s.receive(ready('e1-1'));
      s.receive(change('e1-3'));
      s.serverClose(code);
      assert.equal(t.cc.state, 'reconnecting');
      assert.ok(t.states.at(-1).delay < 500);
      await t.timers.tick(500);
      s = t.last();
      assert.equal(t.ws.sockets.length, 2);
      assert.equal(s.query.get('since'), 'e1-3');
      s.open();
      s.receive(ready('e1-5', true));
      assert.equal(t.cc.state, 'live');
      t.cc.close();
    });
  }

  test('close 1013: reconnects later (at least the 4th backoff step), with since', async () => {
    const t = setup();
    await flush();
    let s = t.last();
    s.open();
    s.receive(ready('e1-2'));
    s.serverClose(1013, 'too many connections');
    assert.equal(t.states.at(-1).delay, 3999);
    await t.timers.tick(3_999);
    assert.equal(t.last().query.get('since'), 'e1-2');
    t.cc.close();
  });

  test('expiring: the provider is asked again and a refresh frame is sent', async () => {
    const t = setup({ tokens: ['t1', 't2'] });
    await flush();
    const s = t.last();
    s.open();
    s.receive(ready(null));
    s.receive({ type: 'expiring', expires_in: 60 });
    await t.timers.tick(5_000);
    assert.deepEqual(s.sent.filter((f) => f.type === 'refresh'), [{ type: 'refresh', token: 't2' }]);
    // A short-lived token: refreshed at half its remaining time, not in a tight loop.
    s.receive({ type: 'expiring', expires_in: 4 });
    await t.timers.tick(1_999);
    assert.equal(s.sent.filter((f) => f.type === 'refresh').length, 1);
    await t.timers.tick(1);
    assert.equal(s.sent.filter((f) => f.type === 'refresh').length, 2);
    assert.equal(t.ws.sockets.length, 1, 'no reconnect');
    t.cc.close();
  });

  test('a fixed string token is used as is on every connect', async () => {
    const t = setup({ token: 'static' });
    await flush();
    t.last().open();
    t.last().serverClose(1012);
    await t.timers.tick(1_000);
    assert.equal(t.last().query.get('token'), 'static');
    t.cc.close();
  });

  test('a failing token provider is retried with backoff', async () => {
    let n = 0;
    const t = setup({ token: async () => { if (n++ === 0) throw new Error('offline'); return 'ok'; } });
    const errors = [];
    t.cc.on('error', (e) => errors.push(e));
    await flush();
    assert.equal(t.ws.sockets.length, 0);
    assert.equal(t.cc.state, 'reconnecting');
    await t.timers.tick(500);
    assert.equal(t.last().query.get('token'), 'ok');
    assert.equal(errors.length, 1);
    t.cc.close();
  });

  test('a silent connection is pinged, then dropped and resumed', async () => {
    const t = setup({ options: { pingInterval: 20_000, pingTimeout: 10_000 } });
    await flush();
    const s = t.last();
    s.open();
    s.receive(ready('e1-8'));
    await t.timers.tick(20_000);
    assert.deepEqual(s.sent, [{ type: 'ping' }]);
    s.receive({ type: 'pong' });
    await t.timers.tick(20_000);
    assert.equal(s.sent.length, 2);
    await t.timers.tick(10_000);
    assert.equal(t.cc.state, 'reconnecting');
    assert.equal(s.closedByClient, 1000);
    await t.timers.tick(500);
    assert.equal(t.last().query.get('since'), 'e1-8');
    t.cc.close();
  });

  test('close() stops for good: socket closed, no timers, no reconnect', async () => {
    const t = setup();
    await flush();
    const s = t.last();
    s.open();
    s.receive(ready('e1-1'));
    s.receive({ type: 'expiring', expires_in: 60 });
    t.cc.close();
    assert.equal(t.cc.state, 'stopped');
    assert.equal(s.closedByClient, 1000);
    assert.equal(t.timers.pending, 0);
    s.serverClose(1006); // late events from the old socket change nothing
    s.receive(change('e1-2'));
    await t.timers.tick(60_000);
    assert.equal(t.ws.sockets.length, 1);
    assert.equal(t.events.filter((e) => e.type === 'change').length, 0);
  });

  test('close() while waiting to reconnect cancels the reconnect', async () => {
    const t = setup();
    await flush();
    t.last().open();
    t.last().serverClose(1012);
    t.cc.close();
    await t.timers.tick(60_000);
    assert.equal(t.ws.sockets.length, 1);
    assert.equal(t.timers.pending, 0);
  });
});

describe('SSE', () => {
  test('auto: falls back to SSE after 3 WebSocket attempts that never opened', async () => {
    const t = setup();
    await flush();
    for (let i = 0; i < 3; i++) {
      t.last().serverClose(1006);
      await t.timers.tick(10_000);
    }
    assert.equal(t.ws.sockets.length, 3);
    assert.equal(t.f.calls.length, 1);
    assert.equal(t.cc.transport, 'sse');
    const c = t.f.calls[0];
    assert.equal(new URL(c.url).pathname, '/v1/sse');
    assert.equal(c.init.headers.Authorization, 'Bearer t1');
    c.respond(200);
    c.write(sse(ready('e1-3')));
    c.write(': keepalive\n\n');
    c.write('id: e1-4\ndata: ' + JSON.stringify(change('e1-4')).slice(0, 20));
    c.write(JSON.stringify(change('e1-4')).slice(20) + '\n\n');
    await flush();
    assert.equal(t.cc.state, 'live');
    assert.deepEqual(t.events.map((e) => e.type), ['ready', 'change']);
    t.cc.close();
    assert.ok(c.cancelled || c.init.signal.aborted);
  });

  test('auto: a WebSocket that worked once is not replaced by SSE when the server is down', async () => {
    const t = setup();
    await flush();
    t.last().open();
    t.last().receive(ready('e1-1'));
    t.last().serverClose(1012);
    for (let i = 0; i < 5; i++) {
      await t.timers.tick(10_000);
      t.last().serverClose(1006);
    }
    assert.equal(t.f.calls.length, 0);
    assert.equal(t.cc.transport, 'ws');
    t.cc.close();
  });

  test("transport 'ws' never falls back", async () => {
    const t = setup({ options: { transport: 'ws' } });
    await flush();
    for (let i = 0; i < 5; i++) {
      t.last().serverClose(1006);
      await t.timers.tick(10_000);
    }
    assert.equal(t.f.calls.length, 0);
    t.cc.close();
  });

  test("transport 'sse': a `: close` comment reconnects with since; 4001 with a fresh token", async () => {
    const t = setup({ tokens: ['a', 'b', 'c'], options: { transport: 'sse' } });
    await flush();
    assert.equal(t.ws.sockets.length, 0);
    let c = t.f.calls[0];
    c.respond(200);
    c.write(sse(ready('e1-1')) + sse(change('e1-2')));
    c.write(': close 4008 too slow\n\n');
    c.end();
    await flush();
    assert.equal(t.cc.state, 'reconnecting');
    assert.equal(t.states.at(-1).code, 4008);
    await t.timers.tick(500);
    c = t.f.calls[1];
    assert.equal(c.query.get('since'), 'e1-2');
    assert.equal(c.init.headers.Authorization, 'Bearer b');
    c.respond(200);
    c.write(sse(ready('e1-2', true)) + ': close 4001 token expired\n\n');
    c.end();
    await flush();
    await t.timers.tick(1_000);
    assert.equal(t.f.calls[2].init.headers.Authorization, 'Bearer c');
    t.cc.close();
  });

  for (const [status, code, state] of [[401, 1008, 'stopped'], [403, 4003, 'stopped'], [429, 1013, 'reconnecting'], [500, 1011, 'reconnecting']]) {
    test(`SSE HTTP ${status} is treated like close ${code}`, async () => {
      const t = setup({ options: { transport: 'sse' } });
      await flush();
      t.f.calls[0].respond(status);
      await flush();
      assert.equal(t.cc.state, state);
      assert.equal(t.states.at(-1).code, code);
      await t.timers.tick(20_000);
      assert.equal(t.f.calls.length, state === 'stopped' ? 1 : 2);
      t.cc.close();
    });
  }

  test('SSE: a network error or an idle stream reconnects', async () => {
    const t = setup({ options: { transport: 'sse', sseIdleTimeout: 45_000 } });
    await flush();
    t.f.calls[0].fail();
    await flush();
    assert.equal(t.cc.state, 'reconnecting');
    await t.timers.tick(500);
    const c = t.f.calls[1];
    c.respond(200);
    c.write(sse(ready('e1-1')));
    await flush();
    await t.timers.tick(45_000);
    assert.equal(t.cc.state, 'reconnecting');
    await t.timers.tick(1_000);
    assert.equal(t.f.calls[2].query.get('since'), 'e1-1');
    t.cc.close();
  });
});

describe('recent activity (last)', () => {
  const readyLast = (position, last) => ({ type: 'ready', user: 'u1', position, resumed: false, last });

  test('the first connection asks for the newest N; the replay is shown; reconnects resume with since', async () => {
    const t = setup({ options: { last: 20 } });
    await flush();
    let s = t.last();
    assert.equal(s.query.get('last'), '20');
    assert.equal(s.query.get('since'), null);
    s.open();
    s.receive(readyLast('e1-9', 2));
    s.receive(change('e1-5', 'o5'));
    s.receive(change('e1-9', 'o9'));
    s.receive(change('e1-10', 'o10'));
    assert.deepEqual(t.events.filter((e) => e.type === 'change').map((e) => e.id), ['e1-5', 'e1-9', 'e1-10'],
      'replayed events older than the ready position are shown, not taken as seen');
    assert.equal(t.events[0].last, 2);
    s.serverClose(1012);
    await t.timers.tick(10_000);
    s = t.last();
    assert.equal(s.query.get('since'), 'e1-10');
    assert.equal(s.query.get('last'), null, 'a resume, not the recent events again');
    t.cc.close();
  });

  test('lost during the replay: resumes after the last replayed event', async () => {
    const t = setup({ options: { last: 5 } });
    await flush();
    const s = t.last();
    s.open();
    s.receive(readyLast('e1-9', 3));
    s.receive(change('e1-3'));
    s.serverClose(1006);
    await t.timers.tick(10_000);
    assert.equal(t.last().query.get('since'), 'e1-3');
    assert.equal(t.last().query.get('last'), null);
    t.cc.close();
  });

  test('nothing to replay: resumes from the ready position; lost before ready: asks again', async () => {
    const t = setup({ options: { last: 5 } });
    await flush();
    let s = t.last();
    s.open();
    s.serverClose(1006); // before ready
    await t.timers.tick(10_000);
    s = t.last();
    assert.equal(s.query.get('last'), '5');
    s.open();
    s.receive(readyLast('e1-9', 0));
    s.serverClose(1012);
    await t.timers.tick(10_000);
    assert.equal(t.last().query.get('since'), 'e1-9');
    assert.equal(t.last().query.get('last'), null);
    t.cc.close();
  });

  test('with a since option, last is not sent (since wins)', async () => {
    const t = setup({ options: { last: 5, since: 'e1-7' } });
    await flush();
    assert.equal(t.last().query.get('since'), 'e1-7');
    assert.equal(t.last().query.get('last'), null);
    t.cc.close();
  });

  test('SSE asks for it the same way', async () => {
    const t = setup({ options: { last: 7, transport: 'sse' } });
    await flush();
    const c = t.f.calls[0];
    assert.equal(c.query.get('last'), '7');
    c.respond(200);
    c.write(sse(readyLast('e1-4', 1)) + sse(change('e1-2')));
    await flush();
    assert.deepEqual(t.events.map((e) => e.type), ['ready', 'change']);
    assert.equal(t.cc.lastEventId, 'e1-2');
    t.cc.close();
  });

  test('last must be a whole number of events', () => {
    for (const bad of [-1, 1.5, NaN, '3']) {
      assert.throws(() => new Changecast({ url: URL_, token: 't', last: bad, autoConnect: false }), RangeError, String(bad));
    }
    const ok = new Changecast({ url: URL_, token: 't', last: 0, autoConnect: false });
    ok.close();
  });
});
