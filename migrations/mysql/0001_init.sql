-- MySQL 8 / MariaDB 10.6+. The same tables and constraints as the embedded store.
-- Times are milliseconds since the Unix epoch (UTC); money is an integer number of the
-- smallest currency unit. Identifiers are ASCII with binary collation: tokens and rooms
-- are case-sensitive.

-- `token_live` is 1 while the spray holds its token and NULL once a newer spray took the
-- token after this one's lookup window: unique indexes ignore NULLs, so they enforce
-- "unique among live sprays" without deleting history.
CREATE TABLE sprays (
    id              BIGINT      NOT NULL AUTO_INCREMENT,
    room_id         VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    token           CHAR(3)     CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    owner_id        BIGINT      NOT NULL,
    mode            VARCHAR(8)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    total_amount    BIGINT      NOT NULL,
    recipient_count BIGINT      NOT NULL,
    created_at      BIGINT      NOT NULL,
    receive_until   BIGINT      NOT NULL,
    lookup_until    BIGINT      NOT NULL,
    token_live      TINYINT     NULL DEFAULT 1,
    PRIMARY KEY (id),
    UNIQUE KEY sprays_room_token (room_id, token, token_live),
    UNIQUE KEY sprays_owner_token (owner_id, token, token_live),
    CONSTRAINT sprays_owner_positive CHECK (owner_id >= 1),
    CONSTRAINT sprays_mode_known CHECK (mode IN ('even', 'random')),
    CONSTRAINT sprays_amount_positive CHECK (total_amount >= 1),
    CONSTRAINT sprays_count_fits CHECK (recipient_count >= 1 AND recipient_count <= total_amount),
    CONSTRAINT sprays_windows_ordered CHECK (receive_until > created_at AND lookup_until >= receive_until),
    CONSTRAINT sprays_token_live_flag CHECK (token_live = 1)
) ENGINE = InnoDB;

-- One row per share, drawn at creation. `receiver_id` is NULL until the share is
-- received; the unique key makes the database refuse a second share for one user.
CREATE TABLE shares (
    spray_id    BIGINT NOT NULL,
    slot        BIGINT NOT NULL,
    amount      BIGINT NOT NULL,
    receiver_id BIGINT NULL,
    received_at BIGINT NULL,
    PRIMARY KEY (spray_id, slot),
    UNIQUE KEY shares_one_per_receiver (spray_id, receiver_id),
    CONSTRAINT shares_spray FOREIGN KEY (spray_id) REFERENCES sprays (id) ON DELETE CASCADE,
    CONSTRAINT shares_slot_positive CHECK (slot >= 0),
    CONSTRAINT shares_amount_positive CHECK (amount >= 1),
    CONSTRAINT shares_receiver_positive CHECK (receiver_id >= 1),
    CONSTRAINT shares_receipt_complete CHECK ((receiver_id IS NULL) = (received_at IS NULL))
) ENGINE = InnoDB;

-- Append-only money movements, kept after the sprays are purged (no foreign key). One
-- DEBIT and at most one REFUND per spray (both to the sprayer), at most one CREDIT per
-- receiver: the unique key holds all three.
CREATE TABLE ledger (
    id       BIGINT     NOT NULL AUTO_INCREMENT,
    spray_id BIGINT     NOT NULL,
    kind     VARCHAR(6) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    user_id  BIGINT     NOT NULL,
    amount   BIGINT     NOT NULL,
    at       BIGINT     NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY ledger_once_per_kind_and_user (spray_id, kind, user_id),
    CONSTRAINT ledger_kind_known CHECK (kind IN ('DEBIT', 'CREDIT', 'REFUND')),
    CONSTRAINT ledger_user_positive CHECK (user_id >= 1),
    CONSTRAINT ledger_amount_positive CHECK (amount >= 1)
) ENGINE = InnoDB;
