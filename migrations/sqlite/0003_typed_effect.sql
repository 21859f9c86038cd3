-- The effect an idempotent request had (a spray created, a share received), kept typed
-- with its key so that a retry is answered by rendering it again, the same bytes: the
-- store keeps what happened, the HTTP layer decides how it is said. JSON, written and read
-- only by `store/idempotency.rs`. A row is pending while it has neither an effect nor an
-- answer (`status_code`, kept for answers without effect: 4xx).
ALTER TABLE idempotency ADD COLUMN effect TEXT NULL
    CHECK (effect IS NULL OR (status_code IS NULL AND length(effect) BETWEEN 1 AND 512));
