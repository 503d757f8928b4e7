// Tether beside its peers, interleaved in one run: graphile-worker, a raw SKIP LOCKED loop, and a real
// `tether serve` on SQLite and on PostgreSQL, all on the same PostgreSQL cluster and driven from this
// one Node process (undici with keep-alive for Tether, node-postgres for the peers). Each figure is
// printed with its ratio to graphile-worker's in the same run; on a shared machine only ratios mean much.
//
//   node bench.mjs --tether BIN --pg URL --pg-data DIR [options] (USAGE, below, lists them)
//
// scripts/bench-peers starts the cluster, installs this directory's locked dependencies and builds the
// server; run that. Scenarios (each runs every system in turn before the next scenario starts, in an
// order shuffled per scenario, so that no system always runs first or last on a machine whose load
// drifts; `--seed` repeats a run's order; `--rounds N` runs each scenario N times over, every round in an
// order of its own, and prints each figure's median with each round's ratio; `--before BIN` runs every
// Tether system a second time with another build, for a change measured beside the build before it):
//   A  wake latency: one blocked worker, enqueues one at a time
//   B  throughput and CPU per 1,000 items: 16 workers, the full cycle, a preloaded queue (Tether on its
//      own cycles too: claim and stop, two requests per item, and chained claims, each carrying the stop
//      of the item before it, one request per item)
//   C  idle workers: memory, CPU and an unrelated worker's latencies beside many idle long polls
//      (Tether twice: a connection per worker, then the workers sharing 16 HTTP/2 connections)
//   D  poll+ack latency with 1k queued, with 100k queued in another environment, and with 100k queued
//   E  enqueue rate from 32 concurrent clients
import { spawn, fork, execFileSync } from "node:child_process";
import { readFileSync, readdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";
import pg from "pg";
import { Pool } from "undici";
import { runMigrations, Logger } from "graphile-worker";

const here = dirname(fileURLToPath(import.meta.url));
const now = () => Number(process.hrtime.bigint()) / 1e6;

// ---------------------------------------------------------------------------------------------- options
const args = process.argv.slice(2);
const option = (name) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
};
const quick = args.includes("--quick");
const tetherBin = option("--tether");
// --before BIN: every Tether system once more, served by this other build ("…, before" in the tables).
const beforeBin = option("--before");
const pgUrl = option("--pg");
const pgData = option("--pg-data");
// --big N: the deep queue of D (100,000 by default). Tether fills it through its API, so on a slow disk
// a smaller one keeps the run short.
const big = option("--big");
const only = new Set((option("--only") ?? "a,b,e,c,d").toLowerCase().split(","));
// --systems graphile,sqlite: only these; the ratios need graphile.
const knownSystems = ["graphile", "raw", "sqlite", "postgres", "sqlite-claim", "postgres-claim", "sqlite-chain", "postgres-chain"];
const wanted = new Set((option("--systems") ?? knownSystems.join(",")).toLowerCase().split(","));
const unknownSystems = [...wanted].filter((name) => !knownSystems.includes(name));
if (unknownSystems.length > 0) {
    console.error(`bench-peers: --systems takes some of ${knownSystems.join(",")}, not ${unknownSystems.join(",")}`);
    process.exit(2);
}
const jsonOut = option("--json");
// The systems' order within each scenario comes from this seed (printed, so that a run's order can be
// repeated); a fixed order would give the systems run last whatever the machine's load drifts into.
const seed = option("--seed") === undefined ? randomBytes(4).readUInt32BE(0) : Number(option("--seed"));
if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) {
    console.error("bench-peers: --seed takes an integer from 0 to 4294967295");
    process.exit(2);
}
// --rounds N: each scenario N times over. One run's ratio moves by ±30 % with the shared machine's load;
// the median of several rounds, each of which runs every system, moves much less.
const rounds = option("--rounds") === undefined ? 1 : Number(option("--rounds"));
if (!Number.isInteger(rounds) || rounds < 1 || rounds > 50) {
    console.error("bench-peers: --rounds takes an integer from 1 to 50");
    process.exit(2);
}
/** mulberry32: a small seeded generator of floats in [0, 1). */
function seeded(state) {
    return () => {
        state = (state + 0x6d2b79f5) >>> 0;
        let t = state;
        t = Math.imul(t ^ (t >>> 15), t | 1);
        t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
        return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
}
/** A copy of `list` in an order drawn from the run's seed, `key` (a scenario's letter) and `round`, so
 * that `--seed` repeats a scenario's order (for the same systems) whichever other scenarios the run has
 * (Fisher-Yates). Round 0 draws the order a run of one round does. */
function shuffled(list, key, round = 0) {
    const nextRandom = seeded((seed ^ Math.imul(key.charCodeAt(0), 0x9e3779b1) ^ Math.imul(round, 0x85ebca6b)) >>> 0);
    const out = [...list];
    for (let i = out.length - 1; i > 0; i--) {
        const j = Math.floor(nextRandom() * (i + 1));
        [out[i], out[j]] = [out[j], out[i]];
    }
    return out;
}
const USAGE =
    "usage: node bench.mjs --tether BIN --pg URL --pg-data DIR [--quick] [--only a,b,c,d,e] [--systems graphile,raw,sqlite,postgres,sqlite-claim,postgres-claim,sqlite-chain,postgres-chain] [--big N] [--seed S] [--rounds N] [--before BIN] [--json FILE]";
if (!tetherBin || !pgUrl || !pgData) {
    console.error(USAGE);
    process.exit(2);
}

const counts = quick
    ? { wake: 10, items: 100, workers: 16, idle: 50, unrelated: 10, small: 30, big: 200, samples: 10, window: 300, enqueue: 100 }
    : { wake: 300, items: 5000, workers: 16, idle: 2000, unrelated: 200, small: 1000, big: 100000, samples: 300, window: 5000, enqueue: 5000 };
if (big) counts.big = Number(big);
if (!Number.isInteger(counts.big) || counts.big <= counts.small) {
    console.error("bench-peers: --big must be an integer above the small queue");
    process.exit(2);
}
// C: the peers' idle workers share a pool of this many database connections; Tether's, in C's second run of
// each Tether system, this many HTTP/2 connections.
const IDLE_CONNECTIONS = 16;

// ------------------------------------------------------------------------------------------------ /proc
const CLK_TCK = Number(execFileSync("getconf", ["CLK_TCK"]).toString().trim());
function stat(pid) {
    try {
        const text = readFileSync(`/proc/${pid}/stat`, "utf8");
        const fields = text.slice(text.lastIndexOf(")") + 2).split(" ");
        // fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17, ppid 4.
        return {
            ppid: Number(fields[1]),
            own: (Number(fields[11]) + Number(fields[12])) / CLK_TCK,
            children: (Number(fields[13]) + Number(fields[14])) / CLK_TCK,
        };
    } catch {
        return null;
    }
}
function postmasterPid() {
    return Number(readFileSync(join(pgData, "data", "postmaster.pid"), "utf8").split("\n")[0]);
}
function pgPids() {
    const root = postmasterPid();
    const pids = [root];
    for (const entry of readdirSync("/proc")) {
        if (!/^\d+$/.test(entry)) continue;
        const s = stat(entry);
        if (s && s.ppid === root) pids.push(Number(entry));
    }
    return pids;
}
// CPU seconds of the database: the postmaster, its live children, and (through the postmaster's
// cutime) every backend that has exited since it started.
function pgCpu() {
    const root = postmasterPid();
    let total = 0;
    for (const pid of pgPids()) {
        const s = stat(pid);
        if (s) total += s.own + (pid === root ? s.children : 0);
    }
    return total;
}
const processCpu = (pid) => stat(pid)?.own ?? 0;
function rssMb(pid) {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) / 1024 : NaN;
}
// The database's memory as the sum of its processes' proportional set sizes (shared buffers counted
// once), when /proc lets us read it.
function pgPssMb() {
    let kb = 0;
    for (const pid of pgPids()) {
        try {
            const m = /Pss:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"));
            if (m) kb += Number(m[1]);
        } catch {
            return NaN;
        }
    }
    return kb / 1024;
}

// ---------------------------------------------------------------------------------------------- helpers
function percentile(values, q) {
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}
const summary = (values) => ({ p50: percentile(values, 0.5), p99: percentile(values, 0.99), max: Math.max(...values) });
function check(condition, message) {
    if (!condition) throw new Error(`bench-peers: ${message}`);
}
async function parallel(total, concurrency, fn) {
    let next = 0;
    const run = async () => {
        while (next < total) await fn(next++);
    };
    await Promise.all(Array.from({ length: Math.min(concurrency, total) }, run));
}

const admin = new pg.Client({ connectionString: pgUrl });
await admin.connect();
// scripts/pg relaxes durability for the tests; a full run commits with fsync on every system, as
// Tether's SQLite store does. (The quick run is a smoke test and keeps the cluster fast.)
if (!quick) {
    await admin.query("ALTER SYSTEM SET fsync = on");
    await admin.query("ALTER SYSTEM SET full_page_writes = on");
    await admin.query("SELECT pg_reload_conf()");
}
// An idle pooled connection whose database is dropped (DROP DATABASE … WITH (FORCE)) reports an
// error event, which would end this process if nobody listened. Queries in flight reject anyway.
function idleConnectionEnded(error) {
    console.error(`bench-peers: an idle database connection ended: ${error.message}`);
}

let databaseSerial = 0;
async function freshDatabase(prefix) {
    const name = `bench_${prefix}_${process.pid}_${databaseSerial++}`;
    await admin.query(`CREATE DATABASE ${name}`);
    const url = new URL(pgUrl);
    url.pathname = `/${name}`;
    return { name, url: url.toString() };
}
async function dropDatabase(name) {
    await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
}

// Whatever this run started goes with it, also when it fails: servers, worker processes, data dirs.
const leftovers = { children: new Set(), dirs: new Set() };
process.on("exit", () => {
    for (const child of leftovers.children) child.kill("SIGKILL");
    for (const dir of leftovers.dirs) rmSync(dir, { recursive: true, force: true });
});

// ----------------------------------------------------------------------------------------------- Tether
const TOKEN = "tth_adm_benchpeers0123456789abcdef";

class TetherApi {
    constructor(origin, connections) {
        this.pool = new Pool(origin, {
            connections,
            pipelining: 1,
            keepAliveTimeout: 120_000,
            keepAliveMaxTimeout: 600_000,
            headersTimeout: 30_000,
            bodyTimeout: 30_000,
            connectTimeout: 30_000,
        });
    }
    async call(method, path, { body, worker, key } = {}) {
        const headers = { authorization: `Bearer ${TOKEN}` };
        if (worker) headers["worker-id"] = worker;
        if (key) headers["idempotency-key"] = key;
        if (body !== undefined) headers["content-type"] = "application/json";
        const res = await this.pool.request({
            method,
            path: `/api/v1/cloud${path}`,
            headers,
            body: body === undefined ? undefined : JSON.stringify(body),
        });
        const text = await res.body.text();
        if (res.statusCode < 200 || res.statusCode >= 300) {
            throw new Error(`${method} ${path}: ${res.statusCode} ${text.slice(0, 300)}`);
        }
        return JSON.parse(text);
    }
    close() {
        return this.pool.close();
    }
}

// A polled or claimed item's session token: its `secret` is URL-safe base64 of a small JSON object.
const sessionToken = (item) => JSON.parse(Buffer.from(item.secret, "base64url").toString()).sessions_token;

// `cycle`: how the workers take and end an item. `contract`: the contract's four requests (poll, ack,
// heartbeat, stop). `claim`: Tether's own two (claim, stop). `chain`: Tether's claim carrying the stop of
// the item before it (the body's `stop`: its id and session token), one request per item (the last
// stop rides on the claim that finds nothing). A system on Tether's own cycles takes part in B only. A, C and D keep the contract's polls
// (C's idle workers and A's blocked one wait in a poll; a claim's wait is the same, its answer one
// write larger), so they measure the official SDKs' workers rather than `tether worker`'s own cycle.
// `binary`: the build that serves it; `before` marks a run of the build given by `--before`.
const cycleLabels = { contract: "", claim: ", claim", chain: ", chained claim" };
class TetherSystem {
    constructor(backend, { cycle = "contract", binary = tetherBin, before = false } = {}) {
        this.backend = backend;
        this.cycle = cycle;
        this.binary = binary;
        const suffix = `${cycle === "contract" ? "" : `-${cycle}`}${before ? "-before" : ""}`;
        this.name = `tether-${backend}${suffix}`;
        this.label = `Tether on ${backend === "sqlite" ? "SQLite" : "PostgreSQL"}${cycleLabels[cycle]}${before ? ", before" : ""}`;
    }
    // What `--systems` names this system by, as a peer's `kind`.
    get kind() {
        return this.cycle === "contract" ? this.backend : `${this.backend}-${this.cycle}`;
    }
    runs(scenario) {
        return this.cycle === "contract" || scenario === "b";
    }
    async start(connections = 64) {
        this.dir = mkdtempSync(join(tmpdir(), "tether-bench-"));
        leftovers.dirs.add(this.dir);
        const serveArgs = ["serve", "--listen", "127.0.0.1:0", "--data-dir", this.dir];
        if (this.backend === "postgres") {
            this.db = await freshDatabase("tether");
            serveArgs.push("--database", this.db.url);
        }
        this.child = spawn(this.binary, serveArgs, {
            env: { ...process.env, TETHER_ADMIN_TOKEN: TOKEN, TETHER_LOG: "warn" },
            stdio: ["ignore", "ignore", "pipe"],
        });
        leftovers.children.add(this.child);
        let log = "";
        const origin = await new Promise((resolve, reject) => {
            const timer = setTimeout(() => reject(new Error(`tether serve did not start:\n${log}`)), 60_000);
            this.child.stderr.on("data", (chunk) => {
                log += chunk;
                if (log.length > 100_000) log = log.slice(-50_000);
                const m = /listening on (http:\/\/[0-9.:]+) /.exec(log);
                if (m) {
                    clearTimeout(timer);
                    resolve(m[1]);
                }
            });
            this.child.on("exit", (code) => reject(new Error(`tether serve exited (${code}):\n${log}`)));
        });
        this.exited = new Promise((resolve) => this.child.on("exit", resolve));
        this.origin = origin;
        this.api = new TetherApi(origin, connections);
        this.agent = (await this.api.call("POST", "/agents", { body: { name: "bench", model: "m" } })).id;
    }
    async environment(name) {
        const env = await this.api.call("POST", "/environments", {
            body: { name, config: { type: "self_hosted" } },
        });
        return env.id;
    }
    cpu() {
        return processCpu(this.child.pid) + this.dbCpu();
    }
    dbCpu() {
        return this.backend === "postgres" ? pgCpu() : 0;
    }
    serverPid() {
        return this.child.pid;
    }
    enqueue(env) {
        return this.api.call("POST", "/sessions", { body: { agent: this.agent, environment_id: env } });
    }
    // Loading goes through the API (session creation), 32 requests at a time.
    async load(env, n) {
        await parallel(n, 32, () => this.enqueue(env));
    }
    poll(env, worker, blockMs) {
        const query = blockMs ? `?block_ms=${blockMs}` : "";
        return this.api.call("GET", `/environments/${env}/work/poll${query}`, { worker });
    }
    ack(env, id, worker) {
        return this.api.call("POST", `/environments/${env}/work/${id}/ack`, { worker });
    }
    heartbeat(env, id, worker) {
        return this.api.call(
            "POST",
            `/environments/${env}/work/${id}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT`,
            { worker },
        );
    }
    stop(env, id) {
        return this.api.call("POST", `/environments/${env}/work/${id}/stop`, { body: { force: true } });
    }
    // Tether's claim: poll, ack and first heartbeat in one request; `null` when the queue is empty.
    // With a fresh idempotency key each, as `tether worker` sends them (a lost answer is then sent
    // again with it).
    // `stopping`: the claim's answer for the item whose program has ended, stopped by this claim before
    // it takes the next (a chained claim), with the item's session token from its `secret`.
    claim(env, worker, stopping = null) {
        const key = randomBytes(16).toString("hex");
        const body = stopping ? { stop: { work_id: stopping.work.id, session_token: sessionToken(stopping.work) } } : undefined;
        return this.api.call("POST", `/environments/${env}/work/claim`, { worker, key, body });
    }
    // What a worker does with an item: ack, first heartbeat, stop.
    async finish(env, id, worker) {
        await this.ack(env, id, worker);
        await this.heartbeat(env, id, worker);
        await this.stop(env, id);
    }
    async shutdown() {
        await this.api?.close();
        this.child.kill("SIGTERM");
        await this.exited;
        leftovers.children.delete(this.child);
        rmSync(this.dir, { recursive: true, force: true });
        leftovers.dirs.delete(this.dir);
        if (this.db) await dropDatabase(this.db.name);
    }

    // A: one worker blocked in a long poll; each enqueue is timed until the worker holds the item.
    async wake(n) {
        await this.start();
        const env = await this.environment("wake");
        let got = null;
        let stopping = false;
        let polling = false;
        const worker = (async () => {
            while (!stopping) {
                polling = true;
                const item = await this.poll(env, "wake-worker", 999);
                polling = false;
                if (!item) continue;
                got?.(now());
                await this.finish(env, item.id, "wake-worker");
            }
        })();
        const latencies = [];
        for (let i = 0; i < n; i++) {
            while (!polling) await sleep(1);
            await sleep(15 + Math.random() * 10); // let the poll reach the server and block there
            const held = new Promise((resolve) => (got = resolve));
            const started = now();
            await this.enqueue(env);
            latencies.push((await held) - started);
        }
        stopping = true;
        await worker;
        await this.shutdown();
        return latencies;
    }

    // B: n items queued first, then `workers` workers run the full cycle until the queue is empty.
    async drain(n, workers) {
        await this.start(workers + 8);
        const env = await this.environment("drain");
        await this.load(env, n);
        let done = 0;
        const cpu0 = this.cpu();
        const db0 = this.dbCpu();
        const client0 = process.cpuUsage();
        const started = now();
        await Promise.all(
            Array.from({ length: workers }, async (_, w) => {
                const id = `drain-${w}`;
                let finished = null; // the chained cycle's item, stopped by the next claim
                for (;;) {
                    if (this.cycle === "chain") {
                        const claim = await this.claim(env, id, finished);
                        if (!claim) return;
                        finished = claim;
                    } else if (this.cycle === "claim") {
                        const claim = await this.claim(env, id);
                        if (!claim) return;
                        await this.stop(env, claim.work.id);
                    } else {
                        const item = await this.poll(env, id);
                        if (!item) return;
                        await this.finish(env, item.id, id);
                    }
                    done += 1;
                }
            }),
        );
        const seconds = (now() - started) / 1000;
        const cpu = this.cpu() - cpu0;
        const dbCpu = this.dbCpu() - db0;
        const client = process.cpuUsage(client0);
        // Every item served was stopped, whichever cycle served it (a server that ignored a chained
        // claim's `stop` would have left them active): the queue's statistics count live items only.
        const { states } = await this.api.call("GET", `/environments/${env}/work/stats`);
        await this.shutdown();
        check(done === n, `${this.name} served ${done} of ${n} items`);
        const live = Object.values(states ?? { unknown: 1 }).reduce((a, b) => a + b, 0);
        check(live === 0, `${this.name} left items live: ${JSON.stringify(states)}`);
        return { done, seconds, cpu, dbCpu, clientCpu: (client.user + client.system) / 1e6 };
    }

    // E: enqueues (session creations) from `clients` concurrent clients.
    async enqueueRate(n, clients) {
        await this.start(clients + 8);
        const env = await this.environment("enqueue");
        const cpu0 = this.cpu();
        const db0 = this.dbCpu();
        const started = now();
        await parallel(n, clients, () => this.enqueue(env));
        const seconds = (now() - started) / 1000;
        const cpu = this.cpu() - cpu0;
        const dbCpu = this.dbCpu() - db0;
        await this.shutdown();
        return { n, seconds, cpu, dbCpu };
    }

    // C: an unrelated worker's ack and heartbeat latencies, the server's memory and the CPU of server and
    // database, first alone, then beside `idle` workers long-polling an empty environment: each on an
    // HTTP/1.1 connection of its own, or, with `h2Connections`, all sharing that many HTTP/2 connections.
    async idle(idle, rounds, windowMs, h2Connections = 0) {
        await this.start(16);
        const quietEnv = await this.environment("idle");
        const workEnv = await this.environment("work");
        const measure = async () => {
            const cpu0 = this.cpu();
            const db0 = this.dbCpu();
            const t0 = now();
            await sleep(windowMs);
            const elapsed = (now() - t0) / 1000;
            const cores = (this.cpu() - cpu0) / elapsed;
            const dbCores = (this.dbCpu() - db0) / elapsed;
            const acks = [];
            const heartbeats = [];
            // Bounded in time as well: beside many idle workers a slow server would take minutes.
            const until = now() + (quick ? 5_000 : 60_000);
            for (let i = 0; i < rounds && now() < until; i++) {
                await this.enqueue(workEnv);
                const item = await this.poll(workEnv, "unrelated");
                check(item, `${this.name}: the unrelated worker found no item`);
                let t = now();
                await this.ack(workEnv, item.id, "unrelated");
                acks.push(now() - t);
                t = now();
                await this.heartbeat(workEnv, item.id, "unrelated");
                heartbeats.push(now() - t);
                await this.stop(workEnv, item.id);
            }
            return { rssMb: rssMb(this.serverPid()), cores, dbCores, ack: summary(acks), heartbeat: summary(heartbeats), n: acks.length };
        };
        await sleep(quick ? 200 : 1000);
        const alone = await measure();
        // The idle workers run in a process of their own; each has had one answer before measuring.
        const transport = h2Connections > 0 ? [String(h2Connections)] : [];
        const pollers = fork(join(here, "idle-pollers.mjs"), [this.origin, TOKEN, quietEnv, String(idle), ...transport]);
        leftovers.children.add(pollers);
        const answer = (ev) =>
            new Promise((resolve, reject) => {
                const timer = setTimeout(() => reject(new Error(`${this.name}: idle workers: no ${ev} in 120 s`)), 120_000);
                pollers.on("message", (message) => {
                    if (message.ev === "error") reject(new Error(`${this.name}: idle workers: ${message.error}`));
                    if (message.ev === ev) {
                        clearTimeout(timer);
                        resolve();
                    }
                });
            });
        await answer("ready");
        const beside = await measure();
        const halted = answer("halted");
        pollers.send({ cmd: "halt" });
        await halted;
        pollers.disconnect();
        await this.shutdown();
        return { alone, beside };
    }

    // D: poll+ack time of one worker, with `small` queued; then with `big` queued in another environment;
    // then in the environment holding `big`.
    async depth(small, big, samples) {
        await this.start(40);
        const smallEnv = await this.environment("small");
        const bigEnv = await this.environment("big");
        const timed = async (env) => {
            const times = [];
            for (let i = 0; i < samples; i++) {
                const t = now();
                const item = await this.poll(env, "depth");
                check(item, `${this.name}: poll found no item`);
                await this.ack(env, item.id, "depth");
                times.push(now() - t);
                await this.stop(env, item.id);
            }
            return times;
        };
        await this.load(smallEnv, small);
        const alone = await timed(smallEnv);
        await this.load(smallEnv, samples); // back to `small` queued
        const t = now();
        await this.load(bigEnv, big);
        const loadSeconds = (now() - t) / 1000;
        const otherEnv = await timed(smallEnv);
        const sameEnv = await timed(bigEnv);
        await this.shutdown();
        return { alone, otherEnv, sameEnv, loadSeconds };
    }
}

// ------------------------------------------------------------------------------------------------ peers
class PeerSystem {
    constructor(kind) {
        this.kind = kind;
        this.name = kind === "graphile" ? "graphile-worker" : "raw-skip-locked";
        this.label = kind === "graphile" ? "graphile-worker 0.16" : "raw SKIP LOCKED loop";
    }
    runs() {
        return true;
    }
    async start() {
        this.db = await freshDatabase(this.kind);
        this.client = new pg.Client({ connectionString: this.db.url });
        await this.client.connect();
        if (this.kind === "graphile") {
            await runMigrations({ connectionString: this.db.url, logger: new Logger(() => () => {}) });
        } else {
            await this.client.query(`
                CREATE TABLE raw_jobs (
                    id bigserial PRIMARY KEY,
                    queue text NOT NULL DEFAULT 'main',
                    payload jsonb NOT NULL,
                    locked_by text,
                    locked_at timestamptz
                );
                CREATE INDEX raw_jobs_unclaimed ON raw_jobs (queue, id) WHERE locked_at IS NULL;
                CREATE FUNCTION raw_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS
                    $$ BEGIN PERFORM pg_notify('raw_jobs', ''); RETURN NULL; END $$;
                CREATE TRIGGER raw_jobs_inserted AFTER INSERT ON raw_jobs
                    FOR EACH STATEMENT EXECUTE FUNCTION raw_jobs_notify();`);
        }
        this.child = fork(join(here, "peer-worker.mjs"), [this.kind, this.db.url], { stdio: "inherit" });
        leftovers.children.add(this.child);
        this.exited = new Promise((resolve) => this.child.on("exit", resolve));
        this.handlers = [];
        this.child.on("message", (message) => {
            if (message.ev === "error") {
                console.error(`${this.name} worker: ${message.error}`);
                process.exit(1);
            }
            for (const handler of this.handlers) handler(message);
        });
    }
    // Sends a command and waits for the message it answers with.
    command(cmd, answer) {
        return new Promise((resolve) => {
            const handler = (message) => {
                if (message.ev === answer) {
                    this.handlers.splice(this.handlers.indexOf(handler), 1);
                    resolve(message);
                }
            };
            this.handlers.push(handler);
            this.child.send(cmd);
        });
    }
    cpu() {
        return processCpu(this.child.pid) + this.dbCpu();
    }
    dbCpu() {
        return pgCpu();
    }
    serverPid() {
        return this.child.pid;
    }
    // One item: add_job for graphile-worker, an INSERT for the raw loop.
    enqueue(task = "bench") {
        if (this.kind === "graphile") {
            return this.client.query("SELECT graphile_worker.add_job($1, $2::json)", [task, '{"i":0}']);
        }
        return this.client.query("INSERT INTO raw_jobs (queue, payload) VALUES ($1, $2)", [
            task === "bench" ? "main" : task,
            '{"i":0}',
        ]);
    }
    // Bulk insert in one statement.
    load(n, task = "bench") {
        if (this.kind === "graphile") {
            return this.client.query(
                `SELECT count(*) FROM graphile_worker.add_jobs(array(
                   SELECT row($2, json_build_object('i', g), null, null, null, null, null, null)::graphile_worker.job_spec
                   FROM generate_series(1, $1::int) g))`,
                [n, task],
            );
        }
        return this.client.query(
            `INSERT INTO raw_jobs (queue, payload) SELECT $2, jsonb_build_object('i', g) FROM generate_series(1, $1::int) g`,
            [n, task === "bench" ? "main" : task],
        );
    }
    async remaining(task = "bench") {
        const sql =
            this.kind === "graphile"
                ? "SELECT count(*)::int AS n FROM graphile_worker.jobs WHERE task_identifier = $1"
                : "SELECT count(*)::int AS n FROM raw_jobs WHERE queue = $1";
        const { rows } = await this.client.query(sql, [this.kind === "graphile" || task !== "bench" ? task : "main"]);
        return rows[0].n;
    }
    async shutdown() {
        this.child.disconnect();
        await this.exited;
        await this.client.end();
        await dropDatabase(this.db.name);
    }

    async wake(n) {
        await this.start();
        let got = null;
        this.handlers.push((message) => message.ev === "got" && got?.(message.t));
        await this.command({ cmd: "wake" }, "ready");
        const latencies = [];
        for (let i = 0; i < n; i++) {
            await sleep(15 + Math.random() * 10);
            const held = new Promise((resolve) => (got = resolve));
            const started = now();
            await this.enqueue();
            latencies.push((await held) - started);
        }
        await this.command({ cmd: "halt" }, "halted");
        await this.shutdown();
        return latencies;
    }

    async drain(n, workers) {
        await this.start();
        await this.load(n);
        const cpu0 = this.cpu();
        const db0 = this.dbCpu();
        const result = await this.command({ cmd: "drain", n, concurrency: workers }, "drained");
        const cpu = this.cpu() - cpu0;
        const dbCpu = this.dbCpu() - db0;
        const left = await this.remaining();
        await this.shutdown();
        check(result.done >= n && left === 0, `${this.name} completed ${result.done} of ${n} items, ${left} left`);
        return { done: n, seconds: result.ms / 1000, cpu, dbCpu };
    }

    // E: add_job calls or INSERTs from `clients` concurrent connections, one item each.
    async enqueueRate(n, clients) {
        await this.start();
        const pool = new pg.Pool({ connectionString: this.db.url, max: clients });
        pool.on("error", idleConnectionEnded);
        await parallel(clients, clients, () => pool.query("SELECT 1")); // connect first
        const sql =
            this.kind === "graphile"
                ? "SELECT graphile_worker.add_job('bench', $1::json)"
                : "INSERT INTO raw_jobs (payload) VALUES ($1)";
        const cpu0 = this.cpu();
        const started = now();
        await parallel(n, clients, () => pool.query(sql, ['{"i":0}']));
        const seconds = (now() - started) / 1000;
        const cpu = this.cpu() - cpu0;
        await pool.end();
        const queued = await this.remaining();
        await this.shutdown();
        check(queued === n, `${this.name}: ${queued} of ${n} enqueued items are in the queue`);
        return { n, seconds, cpu };
    }

    // The unrelated operation: the timed enqueue (add_job or INSERT) and, for the raw loop, a claim and
    // delete from another queue, beside idle workers sharing a pool of 16 connections.
    async idle(idle, rounds, windowMs) {
        await this.start();
        const measure = async () => {
            const cpu0 = this.cpu();
            const db0 = this.dbCpu();
            const t0 = now();
            await sleep(windowMs);
            const elapsed = (now() - t0) / 1000;
            const cores = (this.cpu() - cpu0) / elapsed;
            const dbCores = (this.dbCpu() - db0) / elapsed;
            const enqueues = [];
            const until = now() + (quick ? 5_000 : 60_000);
            for (let i = 0; i < rounds && now() < until; i++) {
                const t = now();
                await this.enqueue("unrelated");
                enqueues.push(now() - t);
            }
            return { rssMb: rssMb(this.serverPid()), cores, dbCores, ack: summary(enqueues), heartbeat: null, n: enqueues.length };
        };
        await sleep(quick ? 200 : 1000);
        const alone = await measure();
        await this.command({ cmd: "idle", concurrency: idle, pool: IDLE_CONNECTIONS }, "ready");
        await sleep(quick ? 300 : 2000);
        const beside = await measure();
        await this.command({ cmd: "halt" }, "halted");
        await this.shutdown();
        return { alone, beside };
    }

    async depth(small, big, samples) {
        await this.start();
        const timed = async () => (await this.command({ cmd: "cycle", n: samples }, "cycled")).samples;
        await this.load(small);
        const alone = await timed();
        await this.load(small - (await this.remaining()));
        const t = now();
        await this.load(big, "other");
        const loadSeconds = (now() - t) / 1000;
        const otherEnv = await timed();
        // Then `big` in its own queue, the other one emptied, as for Tether.
        await this.client.query(
            this.kind === "graphile"
                ? `DELETE FROM graphile_worker._private_jobs
                   WHERE task_id = (SELECT id FROM graphile_worker._private_tasks WHERE identifier = 'other')`
                : "DELETE FROM raw_jobs WHERE queue = 'other'",
        );
        await this.load(big - (await this.remaining()));
        const sameEnv = await timed();
        await this.shutdown();
        return { alone, otherEnv, sameEnv, loadSeconds };
    }
}

// ------------------------------------------------------------------------------------------------ output
// Each Tether system, and right after it the same system served by the build before (`--before`).
const tether = (backend, options = {}) =>
    beforeBin
        ? [new TetherSystem(backend, options), new TetherSystem(backend, { ...options, binary: beforeBin, before: true })]
        : [new TetherSystem(backend, options)];
const systems = [
    new PeerSystem("graphile"),
    new PeerSystem("raw"),
    ...tether("sqlite"),
    ...tether("postgres"),
    ...tether("sqlite", { cycle: "claim" }),
    ...tether("postgres", { cycle: "claim" }),
    ...tether("sqlite", { cycle: "chain" }),
    ...tether("postgres", { cycle: "chain" }),
].filter((system) => wanted.has(system.kind));
// The systems with a result in a scenario's `out`.
const ran = (out) => systems.filter((s) => s.name in out);
const results = { quick, counts, seed, rounds, tether: tetherBin, before: beforeBin ?? null, started: new Date().toISOString(), scenarios: {}, byRound: {} };
// The first column fits every label ("Tether on PostgreSQL, claim, before" with `--before`).
const labelWidth = Math.max(24, ...systems.map((s) => s.label.length + 1));
const fmt = (v, digits = 1) => (v === null || v === undefined || Number.isNaN(v) ? "—" : v.toFixed(digits));
/** A figure's ratio to graphile-worker's, `pick` of each: with several rounds, the median of the rounds'
 * own ratios (`r.ratios`, kept figure by figure), which a drift in the machine's load from round to round
 * moves less than the ratio of the two medians would. */
const ratio = (r, base, pick) => {
    const v = r.ratios ? pick(r.ratios) : base && pick(base) ? pick(r) / pick(base) : undefined;
    return v === undefined || Number.isNaN(v) ? "—" : `${v.toFixed(2)}x`;
};
/** `r`'s figures, each divided by the same figure of `base`'s. */
function ratiosTo(r, base) {
    if (typeof r === "number") return typeof base === "number" && base !== 0 ? r / base : undefined;
    if (r && typeof r === "object" && !Array.isArray(r)) {
        return Object.fromEntries(Object.keys(r).filter((k) => k !== "ratios").map((k) => [k, ratiosTo(r[k], base?.[k])]));
    }
    return undefined;
}
const row = (cells, widths) => cells.map((c, i) => (i === 0 ? String(c).padEnd(widths[i]) : String(c).padStart(widths[i]))).join(" ");

/** B's and E's table: items/s and CPU per 1000 items, each with its ratio to graphile-worker, the
 * database's share, and (B) the CPU of Tether's HTTP clients. */
function printRates(out, withClient) {
    const base = out["graphile-worker"] ?? {};
    const w = [labelWidth, 10, 10, 16, 10, 12, 12];
    const head = ["", "items/s", "ratio", "CPU-s/1000 items", "ratio", "of it db", "client CPU-s"];
    const columns = withClient ? head.length : head.length - 1;
    console.log(row(head.slice(0, columns), w));
    for (const s of ran(out)) {
        const r = out[s.name];
        const cells = [
            s.label,
            fmt(r.perSecond, 0),
            ratio(r, base, (x) => x.perSecond),
            fmt(r.cpuPer1000, 2),
            ratio(r, base, (x) => x.cpuPer1000),
            fmt(r.dbCpuPer1000, 2),
            fmt(r.clientCpuPer1000, 2),
        ];
        console.log(row(cells.slice(0, columns), w));
    }
}

console.log(
    `bench-peers (${quick ? "quick" : "full"} run, --seed ${seed}${rounds > 1 ? `, --rounds ${rounds}` : ""}): ratios are to graphile-worker in this run` +
        `${rounds > 1 ? `; each figure is the median of ${rounds} rounds` : ""}\n`,
);

/** The median of the numbers among `values` (undefined when there are none). */
function median(values) {
    const v = values.filter((x) => typeof x === "number" && !Number.isNaN(x)).sort((a, b) => a - b);
    if (v.length === 0) return undefined;
    const m = v.length >> 1;
    return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}
/** Results of the same shape from several rounds, as one: each number the median of its rounds' (a
 * figure some round could not measure, say a percentile of no samples, is the median of the others). */
function medianResult(results) {
    const first = results.find((r) => r !== undefined && r !== null);
    if (typeof first === "number") return median(results);
    if (first && typeof first === "object" && !Array.isArray(first)) {
        const keys = new Set(results.flatMap((r) => (r && typeof r === "object" ? Object.keys(r) : [])));
        return Object.fromEntries([...keys].map((k) => [k, medianResult(results.map((r) => r?.[k]))]));
    }
    return first;
}

// `byRound(r, base)`: a scenario's headline figure for one system in one round (`base`: graphile-worker's
// result in that round), printed round by round when there are several. `[headline, what]`: the figure
// that `--before` compares, build against build, round by round, and its name.
async function scenario(key, title, fn, print, byRound, [headline, what] = []) {
    if (!only.has(key)) return;
    console.log(title);
    const outs = [];
    const orders = [];
    for (let round = 0; round < rounds; round++) {
        const out = {};
        const order = shuffled(systems.filter((s) => s.runs(key)), key, round);
        for (const system of order) {
            const t = now();
            out[system.name] = await fn(system);
            out[system.name].wallSeconds = (now() - t) / 1000;
        }
        if (rounds > 1 && out["graphile-worker"]) {
            for (const name of Object.keys(out)) out[name].ratios = ratiosTo(out[name], out["graphile-worker"]);
        }
        outs.push(out);
        orders.push(order);
    }
    const out = rounds === 1 ? outs[0] : Object.fromEntries(Object.keys(outs[0]).map((name) => [name, medianResult(outs.map((o) => o[name]))]));
    results.scenarios[key] = out;
    if (rounds > 1) results.byRound[key] = outs;
    print(out);
    if (rounds > 1 && byRound) {
        console.log("   each round:");
        for (const s of ran(out).filter((s) => s.name !== "graphile-worker")) {
            console.log(`     ${s.label.padEnd(labelWidth)}${outs.map((o) => byRound(o[s.name], o["graphile-worker"])).join("  ")}`);
        }
    }
    if (beforeBin && headline) {
        console.log(`   ${what}, this build / the build before: the median, then each round's`);
        for (const s of ran(out).filter((s) => s instanceof TetherSystem && !s.name.endsWith("-before"))) {
            const twin = `${s.name}-before`;
            if (!(twin in out)) continue;
            const each = outs.map((o) => headline(o[s.name]) / headline(o[twin]));
            console.log(`     ${s.label.padEnd(labelWidth)}${fmt(median(each), 2)}x  (${each.map((v) => `${fmt(v, 2)}x`).join("  ")})`);
        }
    }
    orders.forEach((order, round) => {
        const walls = order.map((s) => `${s.name} ${outs[round][s.name].wallSeconds.toFixed(0)} s`).join(", ");
        console.log(`   (${rounds > 1 ? `round ${round + 1} ran` : "run"} in this order: ${walls} of wall time)`);
    });
    console.log("");
}
/** A round's ratio of `pick` to graphile-worker's, as printed by `--rounds`. */
const roundRatio = (pick) => (r, base) => (base ? `${(pick(r) / pick(base)).toFixed(2)}x` : fmt(pick(r), 2));

await scenario(
    "a",
    `A. wake latency: one worker blocked in a long poll, ${counts.wake} enqueues one at a time (ms, enqueue call to worker holding the item)`,
    async (system) => ({ ...summary(await system.wake(counts.wake)), n: counts.wake }),
    (out) => {
        const base = out["graphile-worker"] ?? {};
        const w = [labelWidth, 8, 8, 8, 12];
        console.log(row(["", "p50", "p99", "max", "p99 ratio"], w));
        for (const s of ran(out)) {
            const r = out[s.name];
            console.log(row([s.label, fmt(r.p50, 2), fmt(r.p99, 2), fmt(r.max, 2), ratio(r, base, (x) => x.p99)], w));
        }
    },
    roundRatio((r) => r.p99),
    [(r) => r.p99, "p99 (lower is better)"],
);

await scenario(
    "b",
    `B. throughput: ${counts.workers} workers, full cycle, ${counts.items} queued items (CPU = server or worker process + database)`,
    async (system) => {
        const r = await system.drain(counts.items, counts.workers);
        return {
            ...r,
            perSecond: r.done / r.seconds,
            cpuPer1000: (r.cpu / r.done) * 1000,
            dbCpuPer1000: (r.dbCpu / r.done) * 1000,
            clientCpuPer1000: r.clientCpu === undefined ? null : (r.clientCpu / r.done) * 1000,
        };
    },
    (out) => {
        printRates(out, true);
        console.log(
            "   (the peers' CPU includes their worker process, where their queue logic runs; Tether's excludes its HTTP clients, whose CPU per 1000 items is the last column; \"of it db\" is the database's share)",
        );
    },
    roundRatio((r) => r.perSecond),
    [(r) => r.perSecond, "items/s (higher is better)"],
);

await scenario(
    "e",
    `E. enqueue: ${counts.enqueue} items from 32 concurrent clients (session create, add_job, INSERT; CPU = server + database)`,
    async (system) => {
        const r = await system.enqueueRate(counts.enqueue, 32);
        return {
            ...r,
            perSecond: r.n / r.seconds,
            cpuPer1000: (r.cpu / r.n) * 1000,
            dbCpuPer1000: r.dbCpu === undefined ? null : (r.dbCpu / r.n) * 1000,
        };
    },
    (out) => {
        printRates(out, false);
    },
    roundRatio((r) => r.perSecond),
    [(r) => r.perSecond, "items/s (higher is better)"],
);

await scenario(
    "c",
    `C. ${counts.idle} idle long-polling workers: server memory, CPU of server and database, an unrelated worker's p99 (ms)`,
    async (system) => {
        const r = await system.idle(counts.idle, counts.unrelated, counts.window);
        // Tether again with the same workers sharing HTTP/2 connections, as many as graphile-worker's pool:
        // what a connection per worker costs, measured rather than estimated.
        if (system instanceof TetherSystem) r.shared = await system.idle(counts.idle, counts.unrelated, counts.window, IDLE_CONNECTIONS);
        for (const run of [r, r.shared].filter(Boolean)) run.growth = run.beside.ack.p99 / run.alone.ack.p99;
        return r;
    },
    (out) => {
        const base = out["graphile-worker"] ?? {};
        const slowdown = (r) => r.growth;
        const w = [labelWidth, 9, 9, 9, 9, 9, 10, 10, 10, 10, 10, 8];
        console.log(row(["", "RSS idle", "RSS busy", "+MB", "cores", "of it", "ack p99", "ack p99", "hb p99", "hb p99", "ack p99", "rounds"], w));
        console.log(row(["", "MB", "MB", "", "", "db", "alone", "beside", "alone", "beside", "growth", ""], w));
        const lines = ran(out).flatMap((s) => {
            const r = out[s.name];
            return r.shared ? [[s.label, r], [`  on ${IDLE_CONNECTIONS} HTTP/2 conns`, r.shared]] : [[s.label, r]];
        });
        for (const [label, r] of lines) {
            console.log(
                row(
                    [
                        label,
                        fmt(r.alone.rssMb, 0),
                        fmt(r.beside.rssMb, 0),
                        fmt(r.beside.rssMb - r.alone.rssMb, 0),
                        fmt(r.beside.cores, 2),
                        fmt(r.beside.dbCores, 2),
                        fmt(r.alone.ack.p99, 2),
                        fmt(r.beside.ack.p99, 2),
                        fmt(r.alone.heartbeat?.p99, 2),
                        fmt(r.beside.heartbeat?.p99, 2),
                        `${fmt(slowdown(r), 2)}x`,
                        `${r.alone.n}/${r.beside.n}`,
                    ],
                    w,
                ),
            );
        }
        console.log(
            `   (the peers have no ack: their "ack" is the enqueue call, add_job or INSERT; growth is p99 beside / alone, graphile-worker's is ${base.alone ? `${fmt(slowdown(base), 2)}x` : "—"};\n` +
                `    cores: server or worker process + database beside the idle workers, "of it db" the database's share; rounds: unrelated cycles measured alone/beside, at most 60 s each;\n` +
                `    each Tether worker has an HTTP/1.1 connection of its own, and then, on the line below, the same workers share ${IDLE_CONNECTIONS} HTTP/2 connections, as graphile-worker's share a pool of ${IDLE_CONNECTIONS})`,
        );
    },
    (r) => `+${fmt(r.beside.rssMb - r.alone.rssMb, 0)} MB ${fmt(r.beside.cores, 2)} cores ${fmt(r.growth, 2)}x`,
);

await scenario(
    "d",
    `D. poll+ack of one worker (ms): ${counts.small} queued, then ${counts.big} more in another environment, then ${counts.big} in its own (${counts.samples} samples each)`,
    async (system) => {
        const r = await system.depth(counts.small, counts.big, counts.samples);
        const [alone, otherEnv, sameEnv] = [summary(r.alone), summary(r.otherEnv), summary(r.sameEnv)];
        return { alone, otherEnv, sameEnv, growth: sameEnv.p50 / alone.p50, loadSeconds: r.loadSeconds };
    },
    (out) => {
        const base = out["graphile-worker"] ?? {};
        const w = [labelWidth, 8, 8, 9, 9, 9, 9, 10, 10, 8];
        console.log(row(["", "1k p50", "1k p99", "other p50", "other p99", "same p50", "same p99", "same/1k", "ratio", "load s"], w));
        for (const s of ran(out)) {
            const r = out[s.name];
            const growth = r.growth;
            console.log(
                row(
                    [
                        s.label,
                        fmt(r.alone.p50, 2),
                        fmt(r.alone.p99, 2),
                        fmt(r.otherEnv.p50, 2),
                        fmt(r.otherEnv.p99, 2),
                        fmt(r.sameEnv.p50, 2),
                        fmt(r.sameEnv.p99, 2),
                        `${fmt(growth, 2)}x`,
                        ratio(r, base, (x) => x.alone?.p50),
                        fmt(r.loadSeconds, 1),
                    ],
                    w,
                ),
            );
        }
        console.log("   (graphile-worker's time per item is the interval between job starts; same/1k = p50 with the deep queue in its own environment / p50 at 1k)");
    },
    (r) => `${fmt(r.growth, 2)}x`,
);

results.finished = new Date().toISOString();
if (jsonOut) writeFileSync(jsonOut, JSON.stringify(results, null, 2));
await admin.end();
console.log("bench-peers: every system completed every item");
