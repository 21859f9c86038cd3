-- The life of a spray after its receive window: settlement, retention, idempotent retries.

-- Settlement. `settled_at` is set once, by the one sweeper whose conditional update wins,
-- in the same transaction as the REFUND of `refunded_amount` (0 for a spray received in
-- full, which gets no REFUND). Both stay NULL until then. A claim re-checks `settled_at`
-- inside its own transaction, so no share is both received and refunded.
ALTER TABLE sprays ADD COLUMN settled_at INTEGER NULL;
ALTER TABLE sprays ADD COLUMN refunded_amount INTEGER NULL
    CHECK (refunded_amount >= 0 AND refunded_amount <= total_amount
           AND (settled_at IS NULL) = (refunded_amount IS NULL));

-- The settlement sweep walks the unsettled sprays whose window has closed, oldest first.
CREATE INDEX sprays_unsettled ON sprays (receive_until) WHERE settled_at IS NULL;
-- The retention sweep walks the sprays whose lookup window has closed, oldest first.
CREATE INDEX sprays_lookup_until ON sprays (lookup_until);

-- Idempotent retries of the POST endpoints, scoped by user and endpoint. A row is
-- "pending" (status_code NULL) while its first request runs, and holds the answer once it
-- is known. `lease` fences a pending row: only the request that holds the current lease
-- may complete or release it, so a request that took over an abandoned row and the slow
-- original can never both record an effect. `touched_at` is the last time the row was
-- inserted, taken over or completed: rows are kept 24 hours past it.
CREATE TABLE idempotency (
    user_id      INTEGER NOT NULL CHECK (user_id >= 1),
    endpoint     TEXT    NOT NULL CHECK (endpoint IN ('spray', 'receive')),
    idem_key     TEXT    NOT NULL CHECK (length(idem_key) BETWEEN 1 AND 255),
    fingerprint  BLOB    NOT NULL CHECK (length(fingerprint) = 32),
    lease        INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    touched_at   INTEGER NOT NULL,
    status_code  INTEGER NULL CHECK (status_code BETWEEN 100 AND 499),
    content_type TEXT    NULL,
    location     TEXT    NULL,
    body         BLOB    NULL,
    PRIMARY KEY (user_id, endpoint, idem_key),
    CHECK ((status_code IS NULL) = (body IS NULL) AND (status_code IS NULL) = (content_type IS NULL))
);
CREATE INDEX idempotency_touched ON idempotency (touched_at);
