// Test harness: the real changecast binary (`changecast demo`), Debian's Chromium through
// playwright-core, and writes to the demo's SQLite database from outside, like an app.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const ROOT = resolve(here, '..', '..');
export const BIN = process.env.CHANGECAST_BIN || join(ROOT, 'target', 'debug', 'changecast');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 30_000,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

export function tempDir() {
  return mkdtempSync(join(tmpdir(), 'changecast-browser-'));
}

export function removeDir(dir) {
  rmSync(dir, { recursive: true, force: true });
}

/**
 * Starts `changecast demo --rate 0` on 127.0.0.1 (port 0: any) with `data` as its folder.
 * Resolves once it printed its address. A fixed port that is still held (a restart right
 * after a kill) is retried for a few seconds.
 */
export async function startDemo(data, { port = 0, env = {}, tries = 40 } = {}) {
  let lastErr;
  for (let i = 0; i < tries; i++) {
    try {
      return await startOnce(data, port, env);
    } catch (e) {
      lastErr = e;
      if (!port) break;
      await sleep(250);
    }
  }
  throw lastErr;
}

function startOnce(data, port, env) {
  return new Promise((resolvePromise, reject) => {
    const proc = spawn(BIN, ['demo', '--listen', `127.0.0.1:${port}`, '--data', data, '--rate', '0'], {
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'changecast=warn', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error('changecast demo did not start in 20 s: ' + err));
    }, 20_000);
    proc.stdout.on('data', (b) => {
      out += b;
      const m = /activity page: http:\/\/([\d.]+):(\d+)\//.exec(out);
      if (m) {
        clearTimeout(timer);
        const p = Number(m[2]);
        resolvePromise({ proc, port: p, url: `http://127.0.0.1:${p}`, stderr: () => err });
      }
    });
    proc.stderr.on('data', (b) => {
      err += b;
      if (err.length > 100_000) err = err.slice(-50_000);
    });
    proc.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`changecast demo exited (${code}) before printing its address: ${err}`));
    });
  });
}

/** Stops a demo: SIGKILL by default (the crash case), waits for the exit. */
export async function stopDemo(demo, signal = 'SIGKILL') {
  if (!demo || demo.proc.exitCode !== null || demo.proc.signalCode !== null) return;
  const exited = new Promise((r) => demo.proc.once('exit', r));
  demo.proc.kill(signal);
  await Promise.race([exited, sleep(10_000)]);
}

/** Runs SQL on the demo's database (sqlite3 CLI, waiting on locks). */
export function sql(data, statements) {
  return execFileSync('sqlite3', ['-cmd', '.timeout 10000', join(data, 'mercury.db'), statements], {
    encoding: 'utf8',
    timeout: 30_000,
  });
}

export function insertOrder(data, id, business, quantity = 1) {
  const item = business === 'b1' ? 'i1' : business === 'b2' ? 'i4' : 'i7';
  sql(data, `INSERT INTO orders VALUES ('${id}', '${business}', '${item}', ${quantity}, 'pending');`);
}

/**
 * Inserts orders `prefix1..prefixN` for `business` from a separate process, `gapMs` apart:
 * the writes go on whatever happens to changecast. Resolves when all are written.
 */
export function writeOrders(data, prefix, n, business, gapMs) {
  const script = `
import sqlite3, sys, time
db, prefix, n, business, gap = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
conn = sqlite3.connect(db, timeout=10)
for i in range(1, n + 1):
    conn.execute("INSERT INTO orders VALUES (?, ?, 'i1', 1, 'pending')", (f"{prefix}{i}", business))
    conn.commit()
    time.sleep(gap / 1000)
`;
  return new Promise((res, rej) => {
    const p = spawn('python3', ['-c', script, join(data, 'mercury.db'), prefix, String(n), business, String(gapMs)], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let err = '';
    p.stderr.on('data', (b) => (err += b));
    const t = setTimeout(() => p.kill('SIGKILL'), 120_000);
    p.on('exit', (code) => {
      clearTimeout(t);
      code === 0 ? res() : rej(new Error('writer failed: ' + err));
    });
  });
}

/** The page's events (window.changecast.events) reduced to id, key, type. */
export async function pageEvents(page) {
  return page.evaluate(() => window.changecast.events.map((e) => ({ id: e.id, key: e.key, type: e.type, op: e.op })));
}

/** Waits until the page has an event for every key in `keys`. */
export async function waitForKeys(page, keys, timeout = 30_000) {
  await page.waitForFunction(
    (keys) => {
      const have = new Set(window.changecast.events.map((e) => e.key));
      return keys.every((k) => have.has(k));
    },
    keys,
    { timeout, polling: 100 },
  );
}

export async function openPage(browser, demo, user = 'u1', query = '') {
  const context = await browser.newContext({ viewport: { width: 900, height: 760 } });
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  const logs = [];
  page.on('console', (m) => logs.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`[pageerror] ${e.message}`));
  await page.goto(`${demo.url}/?user=${user}${query}`);
  await page.waitForFunction(() => window.changecast && window.changecast.state === 'live', null, { timeout: 20_000 });
  return { context, page, logs };
}
