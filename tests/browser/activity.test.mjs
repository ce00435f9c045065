// The activity page in headless Chromium against the real changecast binary.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import {
  ROOT, launchBrowser, tempDir, removeDir, startDemo, stopDemo, sql, insertOrder, writeOrders,
  pageEvents, waitForKeys, openPage, sleep,
} from './harness.mjs';

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/** One demo + one page for a test; everything is stopped and removed afterwards. */
async function session(t, { user = 'u1', env = {}, query = '' } = {}) {
  const data = tempDir();
  const s = { data, demo: await startDemo(data, { env }) };
  t.after(async () => {
    await s.page?.context().close().catch(() => {});
    await stopDemo(s.demo);
    removeDir(data);
  });
  const opened = await openPage(browser, s.demo, user, query);
  s.page = opened.page;
  s.logs = opened.logs;
  return s;
}

function assertExactlyOnce(events, keys) {
  const ids = events.map((e) => e.id);
  assert.equal(new Set(ids).size, ids.length, 'no event id twice');
  for (const k of keys) {
    assert.equal(events.filter((e) => e.key === k).length, 1, `${k} exactly once`);
  }
}

test('the page shows live events for its user and none for others', { timeout: 60_000 }, async (t) => {
  const s = await session(t);
  insertOrder(s.data, 'ob2x', 'b2'); // u2's
  insertOrder(s.data, 'ob1x', 'b1'); // u1's
  await waitForKeys(s.page, ['ob1x']);
  await sleep(500);
  const events = await pageEvents(s.page);
  assert.deepEqual(events.map((e) => e.key), ['ob1x']);
  assert.equal(await s.page.textContent('#count'), '1');
  assert.match(await s.page.textContent('#feed'), /Order ob1x created/);
  assert.equal(await s.page.getAttribute('#status', 'data-state'), 'live');
  assert.equal(await s.page.evaluate(() => window.changecast.transport), 'ws');
});

test('kill -9 and restart mid-stream: every event exactly once', { timeout: 120_000 }, async (t) => {
  const s = await session(t);
  const n = 60;
  const keys = Array.from({ length: n }, (_, i) => `ok${i + 1}`);
  const writing = writeOrders(s.data, 'ok', n, 'b1', 40);
  // Wait until some arrived, then crash changecast while the app keeps writing.
  await s.page.waitForFunction(() => window.changecast.events.length >= 10, null, { timeout: 30_000 });
  const port = s.demo.port;
  await stopDemo(s.demo, 'SIGKILL');
  await s.page.waitForFunction(() => window.changecast.state === 'reconnecting', null, { timeout: 10_000 });
  await sleep(1_000);
  s.demo = await startDemo(s.data, { port });
  await writing;
  await waitForKeys(s.page, keys, 60_000);
  await sleep(500);
  const events = await pageEvents(s.page);
  assert.equal(events.length, n, 'nothing more than the inserted orders');
  assertExactlyOnce(events, keys);
  assert.equal(await s.page.evaluate(() => window.changecast.state), 'live');
  assert.equal(await s.page.evaluate(() => window.changecast.gaps), 0);
});

test('a stalled tab resumes without loss or duplicates (offline, then frozen past its queue)', { timeout: 120_000 }, async (t) => {
  const s = await session(t);
  insertOrder(s.data, 'os0', 'b1');
  await waitForKeys(s.page, ['os0']);
  const keys = ['os0'];

  // Offline: nothing arrives meanwhile; back online, everything does, once.
  await s.page.context().setOffline(true);
  for (let i = 1; i <= 10; i++) {
    insertOrder(s.data, `os${i}`, 'b1');
    keys.push(`os${i}`);
    await sleep(100);
  }
  await sleep(1_500);
  await s.page.context().setOffline(false);
  for (let i = 11; i <= 15; i++) {
    insertOrder(s.data, `os${i}`, 'b1');
    keys.push(`os${i}`);
  }
  await waitForKeys(s.page, keys, 30_000);

  // Frozen (a background tab the browser stopped): a burst larger than the server's
  // per-connection queue (256) gets the connection closed with 4008; the page resumes.
  const cdp = await s.page.context().newCDPSession(s.page);
  await cdp.send('Page.setWebLifecycleState', { state: 'frozen' });
  const burst = [];
  for (let i = 0; i < 800; i++) burst.push(`('ob${i}', 'b1', 'i1', 1, 'pending')`);
  sql(s.data, 'BEGIN; INSERT INTO orders VALUES ' + burst.join(', ') + '; COMMIT;');
  for (let i = 0; i < 800; i++) keys.push(`ob${i}`);
  await sleep(3_000);
  await cdp.send('Page.setWebLifecycleState', { state: 'active' });
  await waitForKeys(s.page, keys, 60_000);
  await sleep(500);

  const events = await pageEvents(s.page);
  assert.equal(events.length, keys.length);
  assertExactlyOnce(events, keys);
  assert.equal(await s.page.evaluate(() => window.changecast.gaps), 0);
  const states = await s.page.evaluate(() => window.changecast.states);
  t.diagnostic('states: ' + JSON.stringify(states));
  assert.ok(states.some((x) => x.code === 4008), 'the frozen tab was disconnected as too slow and resumed');
  assert.equal(await s.page.evaluate(() => window.changecast.state), 'live');
});

test('an expiring token is refreshed through the provider', { timeout: 90_000 }, async (t) => {
  const s = await session(t, { env: { CHANGECAST_DEMO_TOKEN_TTL: '4' } });
  insertOrder(s.data, 'ot1', 'b1');
  await waitForKeys(s.page, ['ot1']);
  await sleep(9_000); // two token lifetimes and more (plus the server's 5 s leeway)
  insertOrder(s.data, 'ot2', 'b1');
  await waitForKeys(s.page, ['ot2']);
  await sleep(3_000);
  insertOrder(s.data, 'ot3', 'b1');
  await waitForKeys(s.page, ['ot3']);
  const states = await s.page.evaluate(() => window.changecast.states);
  assert.ok(!states.some((x) => x.state === 'stopped'), JSON.stringify(states));
  assert.ok(!states.some((x) => x.code === 4001), 'refreshed before expiry: ' + JSON.stringify(states));
  assert.equal(await s.page.evaluate(() => window.changecast.state), 'live');
  assertExactlyOnce(await pageEvents(s.page), ['ot1', 'ot2', 'ot3']);
  t.diagnostic('states: ' + JSON.stringify(states));
});

test('SSE transport: same events, resumed after a restart', { timeout: 90_000 }, async (t) => {
  const s = await session(t, { query: '&transport=sse' });
  assert.equal(await s.page.evaluate(() => window.changecast.transport), 'sse');
  insertOrder(s.data, 'oe1', 'b1');
  await waitForKeys(s.page, ['oe1']);
  // Every `ready` from now on: the reconnections after the restart.
  await s.page.evaluate(() => {
    window.readies = [];
    window.changecast.client.on('ready', (m) => window.readies.push(m));
  });
  const port = s.demo.port;
  await stopDemo(s.demo, 'SIGKILL');
  insertOrder(s.data, 'oe2', 'b1');
  s.demo = await startDemo(s.data, { port });
  insertOrder(s.data, 'oe3', 'b1');
  await waitForKeys(s.page, ['oe1', 'oe2', 'oe3'], 60_000);
  assertExactlyOnce(await pageEvents(s.page), ['oe1', 'oe2', 'oe3']);
  // Resumed, not started over: the server honoured the position and reported no gap.
  const readies = await s.page.evaluate(() => window.readies);
  t.diagnostic('readies: ' + JSON.stringify(readies));
  assert.ok(readies.length >= 1, 'reconnected after the restart');
  assert.ok(readies.every((r) => r.resumed === true), 'every reconnection resumed: ' + JSON.stringify(readies));
  assert.equal(await s.page.evaluate(() => window.changecast.gaps), 0);
  assert.equal(await s.page.evaluate(() => window.changecast.transport), 'sse');
});

test('lost history (new epoch): the page shows the "refresh your data" notice', { timeout: 90_000 }, async (t) => {
  const s = await session(t);
  insertOrder(s.data, 'og1', 'b1');
  await waitForKeys(s.page, ['og1']);
  assert.ok(!(await s.page.isVisible('#notice')));
  const port = s.demo.port;
  await stopDemo(s.demo, 'SIGKILL');
  for (const f of ['history.db', 'history.db-wal', 'history.db-shm']) rmSync(join(s.data, f), { force: true });
  s.demo = await startDemo(s.data, { port });
  await s.page.waitForFunction(() => window.changecast.gaps > 0, null, { timeout: 30_000 });
  assert.ok(await s.page.isVisible('#notice'));
  assert.match(await s.page.textContent('#notice'), /Some events were missed — refresh your data/);
  insertOrder(s.data, 'og2', 'b1');
  await waitForKeys(s.page, ['og2']);
  assertExactlyOnce(await pageEvents(s.page), ['og1', 'og2']);
});

test('the page opens on the recent activity at once, also after a restart', { timeout: 90_000 }, async (t) => {
  const s = await session(t);
  // Some activity: u1's orders, and one of u2's that u1 must not see.
  const keys = [];
  for (let i = 1; i <= 5; i++) {
    insertOrder(s.data, `or${i}`, 'b1');
    keys.push(`or${i}`);
  }
  insertOrder(s.data, 'orx', 'b2');
  await waitForKeys(s.page, keys); // routed and stored
  await s.page.context().close();

  // A fresh page load, with no new activity: the recent events are there at once, in
  // order (the newest on top), then live ones follow with nothing repeated.
  const check = async (label) => {
    const opened = await openPage(browser, s.demo);
    s.page = opened.page;
    await waitForKeys(s.page, keys, 5_000);
    const shown = await pageEvents(s.page);
    assert.deepEqual(shown.map((e) => e.key), keys, label);
    const feed = await s.page.$$eval('#feed .event', (els) => els.map((e) => e.querySelector('.summary').textContent));
    assert.equal(feed.length, keys.length, label);
    assert.match(feed[0], new RegExp(`Order ${keys.at(-1)} created`), label);
    assert.match(feed.at(-1), new RegExp(`Order ${keys[0]} created`), label);
    const readies = await s.page.evaluate(() => window.changecast.states.filter((x) => x.state === 'live').length);
    assert.equal(readies, 1, label + ': one connection');
  };
  await check('after activity');
  insertOrder(s.data, 'or6', 'b1');
  keys.push('or6');
  await waitForKeys(s.page, keys);
  assertExactlyOnce(await pageEvents(s.page), keys);
  await s.page.context().close();

  // Restarted: the recent activity comes from the history file.
  const port = s.demo.port;
  await stopDemo(s.demo, 'SIGKILL');
  s.demo = await startDemo(s.data, { port });
  await check('after a restart');
  insertOrder(s.data, 'or7', 'b1');
  keys.push('or7');
  await waitForKeys(s.page, keys);
  assertExactlyOnce(await pageEvents(s.page), keys);
  assert.equal(await s.page.evaluate(() => window.changecast.gaps), 0);
});

// The screenshot goes to a temporary folder, so the test run leaves the clone clean;
// SCREENSHOT=docs/activity-page.png refreshes the README's image.
test('screenshot of the activity page', { timeout: 60_000 }, async (t) => {
  const s = await session(t);
  const keys = [];
  for (let i = 1; i <= 4; i++) {
    insertOrder(s.data, `o${100 + i}`, 'b1', i);
    keys.push(`o${100 + i}`);
  }
  sql(s.data, "UPDATE orders SET status = 'paid' WHERE _id = 'o101';");
  sql(s.data, "UPDATE inventory_items SET quantity_in_stock = 3 WHERE _id = 'i1';"); // Rice: stock low
  await waitForKeys(s.page, [...keys, 'i1']);
  await s.page.waitForFunction(() => window.changecast.events.some((e) => e.type === 'alert'));
  await sleep(300);
  const path = process.env.SCREENSHOT
    ? resolve(ROOT, process.env.SCREENSHOT)
    : join(mkdtempSync(join(tmpdir(), 'changecast-shot-')), 'activity-page.png');
  mkdirSync(dirname(path), { recursive: true });
  await s.page.screenshot({ path, fullPage: true });
  assert.ok(await s.page.isVisible('.event.alert'));
});
