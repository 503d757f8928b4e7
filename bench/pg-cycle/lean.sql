-- hot's cycle on a narrow row of its own, the document left alone.
-- Each update commits on its own, as the server commits a request's write; each cycle takes a
-- fresh queued item.
SELECT nextval('pick') AS i \gset
UPDATE lean_leases SET version = version + 1, history = history || repeat('h', 99), delivered_at = :i, token_hash = md5(:i::text), worker_id = 'w', counters = repeat('c', 62) WHERE id = 'work_' || md5(:i::text) AND version = 1;
UPDATE lean_leases SET version = version + 1, history = history || repeat('h', 99), state = 'starting', phase = 'leased', delivered_at = NULL, lease_expires_at = :i + 60, review_at = :i + 60, counters = repeat('c', 64) WHERE id = 'work_' || md5(:i::text) AND version = 2;
UPDATE lean_leases SET version = version + 1, history = history || repeat('h', 99), state = 'active', lease_expires_at = :i + 120, counters = repeat('c', 66) WHERE id = 'work_' || md5(:i::text) AND version = 3;
UPDATE lean_leases SET version = version + 1, history = history || repeat('h', 99), state = 'stopped', phase = 'stopped', lease_expires_at = NULL, review_at = NULL, token_hash = NULL, counters = repeat('c', 68) WHERE id = 'work_' || md5(:i::text) AND version = 4;
