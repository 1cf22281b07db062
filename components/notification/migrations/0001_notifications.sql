-- Every notification sent, with how its delivery went. `event_key` (subject and order)
-- makes a redelivered event record nothing twice.
CREATE TABLE notifications (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    channel TEXT NOT NULL,
    template TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    event TEXT,
    event_key TEXT UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('delivered', 'failed')),
    error TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX notifications_by_user ON notifications (user_id, created_at, id);
