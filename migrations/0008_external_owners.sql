-- Owners vouched for by an external identity service (Better Auth): the
-- service's user id maps to exactly one owner row, made the first time one of
-- the user's keys is accepted, so everything owner-scoped works unchanged.
CREATE TABLE external_owners (
    provider     TEXT NOT NULL,
    external_id  TEXT NOT NULL,
    owner_id     TEXT NOT NULL UNIQUE REFERENCES owners(id),
    created_at   TEXT NOT NULL,
    PRIMARY KEY (provider, external_id)
);
