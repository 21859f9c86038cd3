-- The life of a spray after its receive window: settlement, retention, idempotent retries.
-- The same columns and constraints as the embedded store (see migrations/sqlite/0002).

-- Settlement. `settled_at` is set once, by the one sweeper whose conditional update wins,
-- in the same transaction as the REFUND of `refunded_amount` (0 for a spray received in
-- full, which gets no REFUND). Both stay NULL until then. A claim reads `settled_at`
-- under a shared lock on the spray row, so no share is both received and refunded.
-- The keys serve the sweeps: unsettled sprays by the end of their receive window, and
-- sprays by the end of their lookup window, oldest first.
ALTER TABLE sprays
    ADD COLUMN settled_at      BIGINT NULL,
    ADD COLUMN refunded_amount BIGINT NULL,
    ADD CONSTRAINT sprays_settlement_whole CHECK ((settled_at IS NULL) = (refunded_amount IS NULL)),
    ADD CONSTRAINT sprays_refund_bounded CHECK (refunded_amount >= 0 AND refunded_amount <= total_amount),
    ADD KEY sprays_unsettled (settled_at, receive_until),
    ADD KEY sprays_lookup_until (lookup_until);

-- Idempotent retries of the POST endpoints, scoped by user and endpoint. A row is
-- "pending" (status_code NULL) while its first request runs, and holds the answer once it
-- is known. `lease` fences a pending row: only the request that holds the current lease
-- may complete or release it. `touched_at` is the last time the row was inserted, taken
-- over or completed: rows are kept 24 hours past it.
CREATE TABLE idempotency (
    user_id      BIGINT       NOT NULL,
    endpoint     VARCHAR(8)   CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    idem_key     VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    fingerprint  BINARY(32)   NOT NULL,
    lease        BIGINT       NOT NULL,
    created_at   BIGINT       NOT NULL,
    touched_at   BIGINT       NOT NULL,
    status_code  SMALLINT     NULL,
    content_type VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NULL,
    location     VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NULL,
    body         MEDIUMBLOB   NULL,
    PRIMARY KEY (user_id, endpoint, idem_key),
    KEY idempotency_touched (touched_at),
    CONSTRAINT idempotency_user_positive CHECK (user_id >= 1),
    CONSTRAINT idempotency_endpoint_known CHECK (endpoint IN ('spray', 'receive')),
    CONSTRAINT idempotency_key_length CHECK (CHAR_LENGTH(idem_key) BETWEEN 1 AND 255),
    CONSTRAINT idempotency_status_kept CHECK (status_code BETWEEN 100 AND 499),
    CONSTRAINT idempotency_answer_whole CHECK ((status_code IS NULL) = (body IS NULL)
                                               AND (status_code IS NULL) = (content_type IS NULL))
) ENGINE = InnoDB;
