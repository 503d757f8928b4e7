-- The previous layout: the cycle's four conditional updates, each with a history row of its own.
-- Each update commits on its own, as the server commits a request's write; each cycle takes a
-- fresh queued item.
SELECT nextval('pick') AS i \gset
WITH w AS (UPDATE rows_items SET version = version + 1, delivered_at = :i, token_hash = md5(:i::text), doc = repeat('d', 640) WHERE id = 'work_' || md5(:i::text) AND version = 1 RETURNING id) INSERT INTO rows_history SELECT id, :i * 4 + 0, repeat('h', 99) FROM w;
WITH w AS (UPDATE rows_items SET version = version + 1, state = 'starting', delivered_at = NULL, lease_expires_at = :i + 60, doc = repeat('d', 660) WHERE id = 'work_' || md5(:i::text) AND version = 2 RETURNING id) INSERT INTO rows_history SELECT id, :i * 4 + 1, repeat('h', 99) FROM w;
WITH w AS (UPDATE rows_items SET version = version + 1, state = 'active', lease_expires_at = :i + 120, doc = repeat('d', 680) WHERE id = 'work_' || md5(:i::text) AND version = 3 RETURNING id) INSERT INTO rows_history SELECT id, :i * 4 + 2, repeat('h', 99) FROM w;
WITH w AS (UPDATE rows_items SET version = version + 1, state = 'stopped', lease_expires_at = NULL, token_hash = NULL, doc = repeat('d', 690) WHERE id = 'work_' || md5(:i::text) AND version = 4 RETURNING id) INSERT INTO rows_history SELECT id, :i * 4 + 3, repeat('h', 99) FROM w;
