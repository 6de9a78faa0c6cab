-- Distributor Chat schema: the whole current one, applied to a new database (and
-- after the upgrade steps to an older one, see SCHEMA_UPGRADES); every statement is
-- idempotent. Counters that the room list needs (newest message, unread
-- count) are kept by triggers, so whichever code inserts a message, the
-- counts stay exact and no query ever scans a room's history.

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS users (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('trainer', 'member')),
    created_at TEXT NOT NULL
) WITHOUT ROWID;

-- One PT session is one room; its room id is 'pt_' || id.
CREATE TABLE IF NOT EXISTS pt_sessions (
    id              INTEGER PRIMARY KEY,
    trainer_id      TEXT NOT NULL REFERENCES users (id),
    member_id       TEXT NOT NULL REFERENCES users (id),
    status          TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'ended')),
    created_at      TEXT NOT NULL,
    last_message_id INTEGER
);
CREATE INDEX IF NOT EXISTS pt_sessions_by_trainer ON pt_sessions (trainer_id);
CREATE INDEX IF NOT EXISTS pt_sessions_by_member ON pt_sessions (member_id);

-- content is '' only for a photo sent without a caption.
CREATE TABLE IF NOT EXISTS messages (
    id         INTEGER PRIMARY KEY,
    session_id INTEGER NOT NULL REFERENCES pt_sessions (id),
    user_id    TEXT NOT NULL REFERENCES users (id),
    type       TEXT NOT NULL CHECK (type IN ('chat', 'spread')),
    content    TEXT NOT NULL,
    client_id  TEXT NOT NULL,
    created_at TEXT NOT NULL,
    photo_id   TEXT REFERENCES photos (id)
);
-- A resent client_id finds the message it already stored.
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_client_id
    ON messages (session_id, user_id, client_id);
-- Pages of a room and unread ranges read this index, never the whole table.
CREATE INDEX IF NOT EXISTS messages_by_room ON messages (session_id, id);
-- A photo is sent once; finding whether it was sent reads this index.
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_photo
    ON messages (photo_id) WHERE photo_id IS NOT NULL;

-- A photo as the server re-encoded it (SPEC 9), in the database itself: it is
-- durable with the same COMMIT as any write, and a backup holds it. The id is
-- random, never a counter. Until a message carries it, it is "unsent", and an
-- unsent photo goes after a day. The two images come last in the row, so a
-- query for the other columns never reads them.
CREATE TABLE IF NOT EXISTS photos (
    id         TEXT PRIMARY KEY,
    session_id INTEGER NOT NULL REFERENCES pt_sessions (id),
    user_id    TEXT NOT NULL REFERENCES users (id),
    media_type TEXT NOT NULL CHECK (media_type IN ('image/jpeg', 'image/png')),
    width      INTEGER NOT NULL,
    height     INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    thumb      BLOB NOT NULL,
    image      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS photos_by_age ON photos (created_at);

-- Each participant's read pointer and the exact count of others' messages
-- after it.
CREATE TABLE IF NOT EXISTS read_state (
    session_id   INTEGER NOT NULL REFERENCES pt_sessions (id),
    user_id      TEXT NOT NULL REFERENCES users (id),
    last_read_id INTEGER NOT NULL DEFAULT 0,
    unread_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, user_id)
) WITHOUT ROWID;

CREATE TRIGGER IF NOT EXISTS pt_sessions_open_read_state
AFTER INSERT ON pt_sessions
BEGIN
    INSERT OR IGNORE INTO read_state (session_id, user_id)
    VALUES (NEW.id, NEW.trainer_id), (NEW.id, NEW.member_id);
END;

-- An import may hand a session to another trainer or member: the newcomer
-- starts with everything the others sent unread.
CREATE TRIGGER IF NOT EXISTS pt_sessions_move_read_state
AFTER UPDATE OF trainer_id, member_id ON pt_sessions
BEGIN
    DELETE FROM read_state
     WHERE session_id = NEW.id AND user_id NOT IN (NEW.trainer_id, NEW.member_id);
    INSERT OR IGNORE INTO read_state (session_id, user_id, last_read_id, unread_count)
    SELECT NEW.id, participant.user_id, 0,
           (SELECT count(*) FROM messages
             WHERE session_id = NEW.id AND user_id != participant.user_id)
      FROM (SELECT NEW.trainer_id AS user_id UNION SELECT NEW.member_id) AS participant;
END;

CREATE TRIGGER IF NOT EXISTS messages_count_unread
AFTER INSERT ON messages
BEGIN
    UPDATE pt_sessions SET last_message_id = NEW.id WHERE id = NEW.session_id;
    UPDATE read_state SET unread_count = unread_count + 1
     WHERE session_id = NEW.session_id AND user_id != NEW.user_id;
END;

-- Tokens signed out of (a hash, never the token): refused until they would
-- have expired anyway, then forgotten.
CREATE TABLE IF NOT EXISTS revoked_tokens (
    token_hash TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;

-- Web Push subscriptions (a browser's PushSubscription), at most 10 a user:
-- the oldest (lowest id) go first. The same endpoint again replaces its row.
CREATE TABLE IF NOT EXISTS push_subscriptions (
    id         INTEGER PRIMARY KEY,
    endpoint   TEXT NOT NULL UNIQUE,
    user_id    TEXT NOT NULL REFERENCES users (id),
    p256dh     TEXT NOT NULL,
    auth       TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS push_subscriptions_by_user ON push_subscriptions (user_id, id);
