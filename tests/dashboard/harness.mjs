// Real processes for the browser tests: a `tether serve` on a free loopback port with a throwaway data
// directory and a known admin token, `tether worker`s running the shell agent, and Debian's Chromium.

import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { chromium } from 'playwright-core';

export const TETHER = process.env.TETHER_BIN ?? 'target/debug/tether';
export const SHELL_AGENT = process.env.TETHER_SHELL_AGENT ?? 'target/debug/tether-shell-agent';
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Waits until `probe()` is truthy, checking every 100 ms, for at most `ms`. */
export async function until(what, probe, ms = 30_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(100);
  }
}

function stopProcess(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const force = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.once('exit', () => { clearTimeout(force); resolve(); });
    child.kill('SIGTERM');
  });
}

export async function startServer() {
  const dir = mkdtempSync(join(tmpdir(), 'tether-dashboard-'));
  const adminToken = `tth_adm_dashboard_${randomBytes(20).toString('hex')}`;
  const child = spawn(TETHER, ['serve', '--listen', '127.0.0.1:0', '--data-dir', join(dir, 'data'), '--sample-ms', '500'], {
    env: { ...process.env, TETHER_ADMIN_TOKEN: adminToken, TETHER_LOG: process.env.TETHER_LOG ?? 'warn' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  child.stderr.on('data', (chunk) => { log += chunk; });
  const base = await until('the server to listen', () => {
    if (child.exitCode !== null) throw new Error(`tether serve exited: ${log}`);
    return log.match(/tether listening on (http:\/\/127\.0\.0\.1:\d+)/)?.[1];
  });
  return {
    base, adminToken, dir, log: () => log,
    async stop() { await stopProcess(child); rmSync(dir, { recursive: true, force: true }); },
  };
}

/** Calls the API directly (test setup that is not under test). */
export async function api(server, method, path, body, token = server.adminToken) {
  const response = await fetch(`${server.base}/api/v1/cloud${path}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await response.json();
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${JSON.stringify(json)}`);
  return json;
}

export function startWorker(server, environmentId, key, extraEnv = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'tether-dashboard-worker-'));
  const child = spawn(TETHER, ['worker', '--server', server.base, '--environment', environmentId, '--key', key,
    '--ttl', '10', '--log-format', 'json', '--', SHELL_AGENT], {
    cwd: dir, env: { ...process.env, ...extraEnv }, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  child.stdout.on('data', (chunk) => { log += chunk; });
  child.stderr.on('data', (chunk) => { log += chunk; });
  return {
    pid: child.pid, log: () => log, exited: () => child.exitCode !== null || child.signalCode !== null,
    async stop() { await stopProcess(child); rmSync(dir, { recursive: true, force: true }); },
  };
}

/**
 * Live descendants of `pid` (Linux /proc), as {pid, comm}: the worker's programs run under a guard
 * process of their own, so they are its grandchildren.
 */
export function descendantsOf(pid) {
  const processes = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const close = stat.lastIndexOf(')');
      const comm = stat.slice(stat.indexOf('(') + 1, close);
      const [state, ppid] = stat.slice(close + 2).split(' ');
      if (state !== 'Z') processes.push({ pid: Number(entry), ppid: Number(ppid), comm });
    } catch {
      // the process went away while we looked
    }
  }
  const out = [];
  const parents = new Set([pid]);
  for (let grew = true; grew; ) {
    grew = false;
    for (const p of processes) {
      if (parents.has(p.ppid) && !parents.has(p.pid)) {
        parents.add(p.pid);
        out.push({ pid: p.pid, comm: p.comm });
        grew = true;
      }
    }
  }
  return out;
}

/**
 * Debian's Chromium, headless, with a fresh profile. Playwright takes the profile directory itself
 * (a persistent context) rather than as a `--user-data-dir` argument; the other flags keep the browser
 * from talking to anything but the server under test.
 */
export async function launchBrowser(origin) {
  const profile = mkdtempSync(join(tmpdir(), 'tether-dashboard-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 800 },
    // A zone other than the machine's (UTC on CI), so that the tests see times shown in the viewer's zone.
    locale: 'en-US',
    timezoneId: 'Asia/Kolkata',
  });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin });
  return {
    context,
    async close() { await context.close(); rmSync(profile, { recursive: true, force: true }); },
  };
}

export function screenshotDir() {
  const dir = process.env.SCREENSHOT_DIR ?? 'target/dashboard-screenshots';
  mkdirSync(dir, { recursive: true });
  return dir;
}
