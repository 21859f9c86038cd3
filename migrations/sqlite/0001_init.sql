-- The embedded store. Times are milliseconds since the Unix epoch (UTC); money is an
-- integer number of the smallest currency unit.

-- One row per spray. `token_live` is 1 while the spray holds its token and NULL once a
-- newer spray has taken the token after this one's lookup window: the unique indexes
-- ignore NULLs, so they enforce "unique among live sprays" without deleting history.
CREATE TABLE sprays (
    id              INTEGER PRIMARY KEY,
    room_id         TEXT    NOT NULL CHECK (length(room_id) BETWEEN 1 AND 64),
    token           TEXT    NOT NULL CHECK (length(token) = 3),
    owner_id        INTEGER NOT NULL CHECK (owner_id >= 1),
    mode            TEXT    NOT NULL CHECK (mode IN ('even', 'random')),
    total_amount    INTEGER NOT NULL CHECK (total_amount >= 1),
    recipient_count INTEGER NOT NULL CHECK (recipient_count >= 1 AND recipient_count <= total_amount),
    created_at      INTEGER NOT NULL,
    receive_until   INTEGER NOT NULL CHECK (receive_until > created_at),
    lookup_until    INTEGER NOT NULL CHECK (lookup_until >= receive_until),
    token_live      INTEGER DEFAULT 1 CHECK (token_live = 1)
);
CREATE UNIQUE INDEX sprays_room_token ON sprays (room_id, token, token_live);
CREATE UNIQUE INDEX sprays_owner_token ON sprays (owner_id, token, token_live);

-- One row per share, drawn at creation. `receiver_id` is NULL until the share is
-- received; the unique index makes the database refuse a second share for one user.
CREATE TABLE shares (
    spray_id    INTEGER NOT NULL REFERENCES sprays (id) ON DELETE CASCADE,
    slot        INTEGER NOT NULL CHECK (slot >= 0),
    amount      INTEGER NOT NULL CHECK (amount >= 1),
    receiver_id INTEGER NULL CHECK (receiver_id >= 1),
    received_at INTEGER NULL,
    PRIMARY KEY (spray_id, slot),
    CHECK ((receiver_id IS NULL) = (received_at IS NULL))
) WITHOUT ROWID;
CREATE UNIQUE INDEX shares_one_per_receiver ON shares (spray_id, receiver_id);

-- Append-only money movements. No foreign key to `sprays`: money history outlives the
-- spray rows. One DEBIT and at most one REFUND per spray (both to the sprayer), at
-- most one CREDIT per receiver: the unique index holds all three.
CREATE TABLE ledger (
    id       INTEGER PRIMARY KEY,
    spray_id INTEGER NOT NULL,
    kind     TEXT    NOT NULL CHECK (kind IN ('DEBIT', 'CREDIT', 'REFUND')),
    user_id  INTEGER NOT NULL CHECK (user_id >= 1),
    amount   INTEGER NOT NULL CHECK (amount >= 1),
    at       INTEGER NOT NULL
);
CREATE UNIQUE INDEX ledger_once_per_kind_and_user ON ledger (spray_id, kind, user_id);
