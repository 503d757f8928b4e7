-- One work item's cycle as Tether's server writes it: poll (delivery), ack, first heartbeat, stop, each
-- an autocommitted conditional update with its history row. The item is a fresh queued one each time.
SELECT nextval('pick') AS i \gset
WITH w AS (UPDATE today_items SET version = version + 1, delivered_at = :i, token_hash = md5(:i::text), doc = repeat('d', 640) WHERE id = 'work_' || md5(:i::text) AND version = 1 RETURNING id) INSERT INTO today_history SELECT id, :i * 4 + 0, repeat('h', 99) FROM w;;
WITH w AS (UPDATE today_items SET version = version + 1, state = 'starting', delivered_at = NULL, lease_expires_at = :i + 60, doc = repeat('d', 660) WHERE id = 'work_' || md5(:i::text) AND version = 2 RETURNING id) INSERT INTO today_history SELECT id, :i * 4 + 1, repeat('h', 99) FROM w;;
WITH w AS (UPDATE today_items SET version = version + 1, state = 'active', lease_expires_at = :i + 120, doc = repeat('d', 680) WHERE id = 'work_' || md5(:i::text) AND version = 3 RETURNING id) INSERT INTO today_history SELECT id, :i * 4 + 2, repeat('h', 99) FROM w;;
WITH w AS (UPDATE today_items SET version = version + 1, state = 'stopped', lease_expires_at = NULL, token_hash = NULL, doc = repeat('d', 690) WHERE id = 'work_' || md5(:i::text) AND version = 4 RETURNING id) INSERT INTO today_history SELECT id, :i * 4 + 3, repeat('h', 99) FROM w;;
