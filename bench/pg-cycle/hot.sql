-- today's cycle on hot's indexes: the first heartbeat changes no indexed column.
-- Each update commits on its own, as the server commits a request's write; each cycle takes a
-- fresh queued item.
SELECT nextval('pick') AS i \gset
UPDATE hot_items SET version = version + 1, history = history || repeat('h', 99), delivered_at = :i, token_hash = md5(:i::text), doc = repeat('d', 640) WHERE id = 'work_' || md5(:i::text) AND version = 1;
UPDATE hot_items SET version = version + 1, history = history || repeat('h', 99), state = 'starting', phase = 'leased', review_at = :i + 60, delivered_at = NULL, lease_expires_at = :i + 60, doc = repeat('d', 660) WHERE id = 'work_' || md5(:i::text) AND version = 2;
UPDATE hot_items SET version = version + 1, history = history || repeat('h', 99), state = 'active', lease_expires_at = :i + 120, doc = repeat('d', 680) WHERE id = 'work_' || md5(:i::text) AND version = 3;
UPDATE hot_items SET version = version + 1, history = history || repeat('h', 99), state = 'stopped', phase = 'stopped', review_at = NULL, lease_expires_at = NULL, token_hash = NULL, doc = repeat('d', 690) WHERE id = 'work_' || md5(:i::text) AND version = 4;
