-- The layouts of scripts/bench-pg-cycle of the work-item row, each holding :items queued items of one environment. See
-- scripts/bench-pg-cycle for what each stands for.
DROP TABLE IF EXISTS today_items, today_history, hot_items, hot_history, lean_items, lean_leases,
    lean_history, bare_items, bare_leases, grouped_leases, inline_items, nohist_items;
DROP SEQUENCE IF EXISTS pick;
-- The cycles take items in order, each once.
CREATE SEQUENCE pick;

-- today: the schema Tether runs (crates/store/src/sql.rs): one row with the whole document, six indexes.
CREATE TABLE today_items (id TEXT PRIMARY KEY, version BIGINT NOT NULL, environment_id TEXT NOT NULL,
    session_id TEXT NOT NULL, state TEXT NOT NULL, enqueued_at BIGINT NOT NULL, delivered_at BIGINT,
    lease_expires_at BIGINT, token_hash TEXT, doc TEXT NOT NULL);
CREATE INDEX ON today_items (environment_id, id);
CREATE INDEX ON today_items (environment_id, state, enqueued_at, id);
CREATE UNIQUE INDEX ON today_items (session_id) WHERE state <> 'stopped';
CREATE INDEX ON today_items (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
CREATE INDEX ON today_items (token_hash) WHERE token_hash IS NOT NULL;
CREATE TABLE today_history (work_id TEXT NOT NULL, seq BIGINT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (work_id, seq));

-- inline: today's row and indexes, the history appended to a column of the row instead of written as
-- rows of its own.
CREATE TABLE inline_items (LIKE today_items INCLUDING ALL);
ALTER TABLE inline_items ADD COLUMN history TEXT NOT NULL DEFAULT '';

-- nohist: today's row and indexes, no history at all.
CREATE TABLE nohist_items (LIKE today_items INCLUDING ALL);

-- hot: the same row, but the indexes name a coarse phase (queued, leased, stopped) instead of the state,
-- and a review time set at ack instead of the lease's end: a heartbeat changes no indexed column and is
-- a HOT update (fillfactor leaves room on the page for it).
CREATE TABLE hot_items (id TEXT PRIMARY KEY, version BIGINT NOT NULL, environment_id TEXT NOT NULL,
    session_id TEXT NOT NULL, state TEXT NOT NULL, phase TEXT NOT NULL, enqueued_at BIGINT NOT NULL,
    delivered_at BIGINT, lease_expires_at BIGINT, review_at BIGINT, token_hash TEXT, doc TEXT NOT NULL)
    WITH (fillfactor = 80);
CREATE INDEX ON hot_items (environment_id, id);
CREATE INDEX ON hot_items (environment_id, phase, enqueued_at, id) WHERE phase <> 'stopped';
CREATE UNIQUE INDEX ON hot_items (session_id) WHERE phase <> 'stopped';
CREATE INDEX ON hot_items (review_at) WHERE review_at IS NOT NULL;
CREATE INDEX ON hot_items (token_hash) WHERE token_hash IS NOT NULL;
CREATE TABLE hot_history (work_id TEXT NOT NULL, seq BIGINT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (work_id, seq));

-- lean: hot's indexes on a narrow row of its own (state, lease, delivery, counters: about 150 bytes);
-- the document's unchanging part is written once, at enqueue.
CREATE TABLE lean_items (id TEXT PRIMARY KEY, environment_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE lean_leases (id TEXT PRIMARY KEY, version BIGINT NOT NULL, environment_id TEXT NOT NULL,
    session_id TEXT NOT NULL, state TEXT NOT NULL, phase TEXT NOT NULL, enqueued_at BIGINT NOT NULL,
    delivered_at BIGINT, lease_expires_at BIGINT, review_at BIGINT, token_hash TEXT, worker_id TEXT,
    counters TEXT NOT NULL) WITH (fillfactor = 80);
CREATE INDEX ON lean_leases (environment_id, id);
CREATE INDEX ON lean_leases (environment_id, phase, enqueued_at, id) WHERE phase <> 'stopped';
CREATE UNIQUE INDEX ON lean_leases (session_id) WHERE phase <> 'stopped';
CREATE INDEX ON lean_leases (review_at) WHERE review_at IS NOT NULL;
CREATE INDEX ON lean_leases (token_hash) WHERE token_hash IS NOT NULL;
CREATE TABLE lean_history (work_id TEXT NOT NULL, seq BIGINT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (work_id, seq));

-- bare: lean without a history row per transition (history kept some other way).
CREATE TABLE bare_items (id TEXT PRIMARY KEY, environment_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE bare_leases (LIKE lean_leases INCLUDING ALL) WITH (fillfactor = 80);

-- grouped: bare's tables, its four updates under one commit (bench/pg-cycle/grouped.sql).
CREATE TABLE grouped_leases (LIKE lean_leases INCLUDING ALL) WITH (fillfactor = 80);

INSERT INTO today_items SELECT 'work_' || md5(i::text), 1, 'env_1', 'sess_' || md5(i::text), 'queued', i,
    NULL, NULL, NULL, repeat('d', 590) FROM generate_series(1, :items) i;
INSERT INTO inline_items SELECT *, '' FROM today_items;
INSERT INTO nohist_items SELECT * FROM today_items;
INSERT INTO hot_items SELECT 'work_' || md5(i::text), 1, 'env_1', 'sess_' || md5(i::text), 'queued',
    'queued', i, NULL, NULL, NULL, NULL, repeat('d', 590) FROM generate_series(1, :items) i;
INSERT INTO lean_items SELECT 'work_' || md5(i::text), 'env_1', repeat('d', 440) FROM generate_series(1, :items) i;
INSERT INTO lean_leases SELECT 'work_' || md5(i::text), 1, 'env_1', 'sess_' || md5(i::text), 'queued',
    'queued', i, NULL, NULL, NULL, NULL, NULL, repeat('c', 60) FROM generate_series(1, :items) i;
INSERT INTO bare_items SELECT * FROM lean_items;
INSERT INTO bare_leases SELECT * FROM lean_leases;
INSERT INTO grouped_leases SELECT * FROM lean_leases;
VACUUM ANALYZE;
