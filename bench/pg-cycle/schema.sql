-- The layouts of scripts/bench-pg-cycle, each holding :items queued items of one environment.
DROP TABLE IF EXISTS rows_items, rows_history, today_items, nohist_items, hot_items, lean_items,
    lean_leases, bare_items, bare_leases, grouped_leases;
DROP SEQUENCE IF EXISTS pick;
-- The cycles take items in order, each once.
CREATE SEQUENCE pick;

-- today: Tether's schema (crates/store/src/sql.rs): one row with the whole document, six indexes, the
-- history appended to a column of the row.
CREATE TABLE today_items (id TEXT PRIMARY KEY, version BIGINT NOT NULL, environment_id TEXT NOT NULL,
    session_id TEXT NOT NULL, state TEXT NOT NULL, enqueued_at BIGINT NOT NULL, delivered_at BIGINT,
    lease_expires_at BIGINT, token_hash TEXT, doc TEXT NOT NULL, history TEXT NOT NULL DEFAULT '');
CREATE INDEX ON today_items (environment_id, id);
CREATE INDEX ON today_items (environment_id, state, enqueued_at, id);
CREATE UNIQUE INDEX ON today_items (session_id) WHERE state <> 'stopped';
CREATE INDEX ON today_items (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
CREATE INDEX ON today_items (token_hash) WHERE token_hash IS NOT NULL;

-- rows: the schema before migration 3, a history row of its own per transition.
CREATE TABLE rows_items (LIKE today_items INCLUDING ALL);
ALTER TABLE rows_items DROP COLUMN history;
CREATE TABLE rows_history (work_id TEXT NOT NULL, seq BIGINT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (work_id, seq));

-- nohist: today's row and indexes, no history at all.
CREATE TABLE nohist_items (LIKE today_items INCLUDING ALL);

-- hot: today's row, but the indexes name a coarse phase (queued, leased, stopped) instead of the state,
-- and a review time set at ack instead of the lease's end: the first heartbeat (active from starting)
-- changes no indexed column and is a HOT update (fillfactor leaves room on the page for it).
CREATE TABLE hot_items (id TEXT PRIMARY KEY, version BIGINT NOT NULL, environment_id TEXT NOT NULL,
    session_id TEXT NOT NULL, state TEXT NOT NULL, phase TEXT NOT NULL, enqueued_at BIGINT NOT NULL,
    delivered_at BIGINT, lease_expires_at BIGINT, review_at BIGINT, token_hash TEXT, doc TEXT NOT NULL,
    history TEXT NOT NULL DEFAULT '') WITH (fillfactor = 80);
CREATE INDEX ON hot_items (environment_id, id);
CREATE INDEX ON hot_items (environment_id, phase, enqueued_at, id) WHERE phase <> 'stopped';
CREATE UNIQUE INDEX ON hot_items (session_id) WHERE phase <> 'stopped';
CREATE INDEX ON hot_items (review_at) WHERE review_at IS NOT NULL;
CREATE INDEX ON hot_items (token_hash) WHERE token_hash IS NOT NULL;

-- lean: hot's indexes on a narrow row of its own (state, lease, delivery, counters, history); the
-- document's unchanging part is written once, at enqueue.
CREATE TABLE lean_items (id TEXT PRIMARY KEY, environment_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE lean_leases (id TEXT PRIMARY KEY, version BIGINT NOT NULL, environment_id TEXT NOT NULL,
    session_id TEXT NOT NULL, state TEXT NOT NULL, phase TEXT NOT NULL, enqueued_at BIGINT NOT NULL,
    delivered_at BIGINT, lease_expires_at BIGINT, review_at BIGINT, token_hash TEXT, worker_id TEXT,
    counters TEXT NOT NULL, history TEXT NOT NULL DEFAULT '') WITH (fillfactor = 80);
CREATE INDEX ON lean_leases (environment_id, id);
CREATE INDEX ON lean_leases (environment_id, phase, enqueued_at, id) WHERE phase <> 'stopped';
CREATE UNIQUE INDEX ON lean_leases (session_id) WHERE phase <> 'stopped';
CREATE INDEX ON lean_leases (review_at) WHERE review_at IS NOT NULL;
CREATE INDEX ON lean_leases (token_hash) WHERE token_hash IS NOT NULL;

-- bare: lean without any history. grouped: bare's tables, its four updates under one commit.
CREATE TABLE bare_items (LIKE lean_items INCLUDING ALL);
CREATE TABLE bare_leases (LIKE lean_leases INCLUDING ALL) WITH (fillfactor = 80);
CREATE TABLE grouped_leases (LIKE lean_leases INCLUDING ALL) WITH (fillfactor = 80);

INSERT INTO today_items SELECT 'work_' || md5(i::text), 1, 'env_1', 'sess_' || md5(i::text), 'queued', i,
    NULL, NULL, NULL, repeat('d', 590), repeat('h', 99) FROM generate_series(1, :items) i;
INSERT INTO rows_items SELECT id, version, environment_id, session_id, state, enqueued_at, delivered_at,
    lease_expires_at, token_hash, doc FROM today_items;
INSERT INTO nohist_items SELECT * FROM today_items;
INSERT INTO hot_items SELECT id, version, environment_id, session_id, state, 'queued', enqueued_at,
    delivered_at, lease_expires_at, NULL, token_hash, doc, history FROM today_items;
INSERT INTO lean_items SELECT 'work_' || md5(i::text), 'env_1', repeat('d', 440) FROM generate_series(1, :items) i;
INSERT INTO lean_leases SELECT 'work_' || md5(i::text), 1, 'env_1', 'sess_' || md5(i::text), 'queued',
    'queued', i, NULL, NULL, NULL, NULL, NULL, repeat('c', 60), repeat('h', 99) FROM generate_series(1, :items) i;
INSERT INTO bare_items SELECT * FROM lean_items;
INSERT INTO bare_leases SELECT * FROM lean_leases;
INSERT INTO grouped_leases SELECT * FROM lean_leases;
VACUUM ANALYZE;
