"""The state's schema, as ordered migrations every implementation follows."""

from __future__ import annotations

#: Migration 4's indexes that list tasks newest first, the same on both databases.
_NEWEST = (
    "CREATE INDEX IF NOT EXISTS tasks_newest ON tasks (COALESCE(created_at, first_seen), task_id)",
    "CREATE INDEX IF NOT EXISTS tasks_by_type_newest "
    "ON tasks (task_type, COALESCE(created_at, first_seen), task_id)",
    "CREATE INDEX IF NOT EXISTS tasks_by_state_newest "
    "ON tasks (state, COALESCE(created_at, first_seen), task_id)",
)

#: Migration 5, the same on both databases: the runs working on the state and their
#: leases on tasks (fetcher/lease.py). Times are Unix seconds (a double: PostgreSQL's
#: REAL would round them to minutes); a run or a lease not renewed by then has lapsed.
_RUNS = (
    """CREATE TABLE IF NOT EXISTS runs (
        run_id      TEXT PRIMARY KEY,
        host        TEXT NOT NULL,
        pid         BIGINT NOT NULL,
        started_at  TEXT NOT NULL,
        alive_until DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS leases (
        task_id    TEXT PRIMARY KEY,
        run_id     TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS leases_by_run ON leases (run_id)",
)

#: The schema, as ordered migrations: entry ``n`` brings a database from
#: ``PRAGMA user_version`` ``n`` to ``n + 1``, in one transaction, never dropping
#: data. A change to the schema is a new entry at the end, never an edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: tasks and their files, as the first releases made them.
    (
        """CREATE TABLE IF NOT EXISTS meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
        # Fetchers before user_version read this row and refuse a value over 1; it stays
        # 1 for as long as they can still use the database.
        "INSERT OR IGNORE INTO meta VALUES ('schema_version', '1')",
        """CREATE TABLE IF NOT EXISTS tasks (
            task_id     TEXT PRIMARY KEY,
            state       TEXT NOT NULL,      -- pending | incomplete | archived | failed | expired
            final       INTEGER NOT NULL DEFAULT 0,  -- 1: the API's answer will not change
            task_type   TEXT,
            created_at  TEXT,
            finished_at TEXT,
            dir         TEXT,               -- the task's folder, relative to the archive root
            reason      TEXT,
            first_seen  TEXT NOT NULL,
            updated_at  TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state)",
        "CREATE INDEX IF NOT EXISTS tasks_by_dir ON tasks (dir COLLATE NOCASE)",
        """CREATE TABLE IF NOT EXISTS files (
            task_id      TEXT NOT NULL REFERENCES tasks (task_id),
            idx          INTEGER NOT NULL,
            url          TEXT NOT NULL,
            expire_time  TEXT,
            md5          TEXT,
            state        TEXT NOT NULL,     -- wanted | done | failed | expired
            path         TEXT,              -- relative to the archive root, once done
            size         INTEGER,
            sha256       TEXT,
            content_type TEXT,
            reason       TEXT,
            PRIMARY KEY (task_id, idx)
        )""",
    ),
    # 2: each list file's settled beginning (see fetcher/lists.py).
    (
        """CREATE TABLE IF NOT EXISTS lists (
            source        TEXT PRIMARY KEY,     -- a list file's absolute path
            settled_bytes INTEGER NOT NULL,     -- its beginning whose every task is settled
            lines         INTEGER NOT NULL,
            ids           INTEGER NOT NULL,
            digest        TEXT NOT NULL,        -- SHA-256 of those bytes
            updated_at    TEXT NOT NULL
        )""",
    ),
    # 3: the download queue (fetcher/queue.py). A file row carries what a download
    # needs without its task's answer in memory, and a task row what its sidecar
    # needs; the index hands out the earliest-expiring wanted file, none-expiry last.
    (
        "ALTER TABLE files ADD COLUMN size_hint INTEGER",  # MetaData.Size, to check against
        "ALTER TABLE files ADD COLUMN file_type TEXT",
        "ALTER TABLE tasks ADD COLUMN detail TEXT",  # JSON: the answer's status and Input
        "CREATE INDEX IF NOT EXISTS files_queue ON files (state, expire_time IS NULL, expire_time)",
    ),
    # 4: what the catalog (fetcher/catalog.py) searches and lists. A task's words sit in
    # task_text, written in the step that records the task's answer; task_search is an
    # FTS5 index over them kept by triggers (external content: the words are stored
    # once). Its id is an INTEGER PRIMARY KEY because VACUUM may renumber a plain rowid,
    # which would leave the index pointing at the wrong rows. The trigram tokenizer
    # finds any run of three or more characters: prompts in Chinese have no spaces to
    # split words at, and a piece of a task ID is found too. Tasks are listed newest
    # first by their creation time (the first sighting for a task never answered), by
    # those indexes, so a page deep in the list costs what the first one does.
    (
        """CREATE TABLE IF NOT EXISTS task_text (
            id              INTEGER PRIMARY KEY,
            task_id         TEXT NOT NULL UNIQUE REFERENCES tasks (task_id),
            prompt          TEXT,
            negative_prompt TEXT,
            model           TEXT,
            model_version   TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS task_text_by_model ON task_text (model)",
        """CREATE VIRTUAL TABLE IF NOT EXISTS task_search USING fts5 (
            task_id, prompt, negative_prompt, model, model_version,
            content = 'task_text', content_rowid = 'id', tokenize = 'trigram'
        )""",
        """CREATE TRIGGER IF NOT EXISTS task_text_added AFTER INSERT ON task_text BEGIN
            INSERT INTO task_search (rowid, task_id, prompt, negative_prompt, model, model_version)
            VALUES (new.id, new.task_id, new.prompt, new.negative_prompt, new.model,
                    new.model_version);
        END""",
        """CREATE TRIGGER IF NOT EXISTS task_text_removed AFTER DELETE ON task_text BEGIN
            INSERT INTO task_search
                (task_search, rowid, task_id, prompt, negative_prompt, model, model_version)
            VALUES ('delete', old.id, old.task_id, old.prompt, old.negative_prompt, old.model,
                    old.model_version);
        END""",
        """CREATE TRIGGER IF NOT EXISTS task_text_changed AFTER UPDATE ON task_text BEGIN
            INSERT INTO task_search
                (task_search, rowid, task_id, prompt, negative_prompt, model, model_version)
            VALUES ('delete', old.id, old.task_id, old.prompt, old.negative_prompt, old.model,
                    old.model_version);
            INSERT INTO task_search (rowid, task_id, prompt, negative_prompt, model, model_version)
            VALUES (new.id, new.task_id, new.prompt, new.negative_prompt, new.model,
                    new.model_version);
        END""",
        *_NEWEST,
        # Answers recorded before this migration are indexed by fetcher/index.py, under
        # the lock, with a progress bar: not here, where a big archive would sit silent.
        "INSERT OR REPLACE INTO meta VALUES ('text_index', CASE WHEN EXISTS "
        "(SELECT 1 FROM tasks WHERE detail IS NOT NULL) THEN 'partial' ELSE 'whole' END)",
    ),
    # 5: the runs working on the state and their leases on tasks (fetcher/lease.py).
    _RUNS,
)
SCHEMA_VERSION = len(MIGRATIONS)
#: The first schema with the search index (task_text, task_search).
TEXT_SCHEMA = 4

#: :data:`MIGRATIONS` as PostgreSQL spells them, entry for entry: the same tables and
#: columns, so every statement outside the schema runs on either. Each table has a
#: ``rowid`` of its own (SQLite's is implicit): the run's de-duplication and the
#: download queue order and mark rows by it. The version is kept in ``fetcher_schema``.
POSTGRES_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: tasks and their files.
    (
        """CREATE TABLE IF NOT EXISTS meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
        "INSERT INTO meta VALUES ('schema_version', '1') ON CONFLICT DO NOTHING",
        """CREATE TABLE IF NOT EXISTS tasks (
            rowid       BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
            task_id     TEXT PRIMARY KEY,
            state       TEXT NOT NULL,
            final       INTEGER NOT NULL DEFAULT 0,
            task_type   TEXT,
            created_at  TEXT,
            finished_at TEXT,
            dir         TEXT,
            reason      TEXT,
            first_seen  TEXT NOT NULL,
            updated_at  TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state)",
        # SQLite compares folders with COLLATE NOCASE; PostgreSQL by lower() and this index.
        "CREATE INDEX IF NOT EXISTS tasks_by_dir ON tasks (lower(dir))",
        """CREATE TABLE IF NOT EXISTS files (
            rowid        BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
            task_id      TEXT NOT NULL REFERENCES tasks (task_id),
            idx          INTEGER NOT NULL,
            url          TEXT NOT NULL,
            expire_time  TEXT,
            md5          TEXT,
            state        TEXT NOT NULL,
            path         TEXT,
            size         BIGINT,
            sha256       TEXT,
            content_type TEXT,
            reason       TEXT,
            PRIMARY KEY (task_id, idx)
        )""",
    ),
    # 2: each list file's settled beginning.
    (
        """CREATE TABLE IF NOT EXISTS lists (
            source        TEXT PRIMARY KEY,
            settled_bytes BIGINT NOT NULL,
            lines         BIGINT NOT NULL,
            ids           BIGINT NOT NULL,
            digest        TEXT NOT NULL,
            updated_at    TEXT NOT NULL
        )""",
    ),
    # 3: the download queue.
    (
        "ALTER TABLE files ADD COLUMN IF NOT EXISTS size_hint BIGINT",
        "ALTER TABLE files ADD COLUMN IF NOT EXISTS file_type TEXT",
        "ALTER TABLE tasks ADD COLUMN IF NOT EXISTS detail TEXT",
        "CREATE INDEX IF NOT EXISTS files_queue "
        "ON files (state, (expire_time IS NULL), expire_time, rowid)",
    ),
    # 4: what the catalog searches and lists. Where SQLite keeps an FTS5 trigram index,
    # PostgreSQL keeps pg_trgm's GIN index over the same words (POSTGRES_WORDS), which
    # answers ILIKE '%word%' for any run of three or more characters just the same.
    (
        "CREATE EXTENSION IF NOT EXISTS pg_trgm",
        """CREATE TABLE IF NOT EXISTS task_text (
            id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            task_id         TEXT NOT NULL UNIQUE REFERENCES tasks (task_id),
            prompt          TEXT,
            negative_prompt TEXT,
            model           TEXT,
            model_version   TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS task_text_by_model ON task_text (model)",
        "CREATE INDEX IF NOT EXISTS task_search ON task_text "
        "USING gin ((lower(task_id || ' ' || COALESCE(prompt, '') || ' ' || "
        "COALESCE(negative_prompt, '') || ' ' || COALESCE(model, '') || ' ' || "
        "COALESCE(model_version, ''))) gin_trgm_ops)",
        *_NEWEST,
        "INSERT INTO meta VALUES ('text_index', CASE WHEN EXISTS "
        "(SELECT 1 FROM tasks WHERE detail IS NOT NULL) THEN 'partial' ELSE 'whole' END) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    ),
    # 5: runs and their leases.
    _RUNS,
)
#: The words a task is found by on PostgreSQL, as migration 4's GIN index holds them
#: (``x``: task_text), lower-cased: ``LIKE`` on it is what SQLite's trigram index does.
POSTGRES_WORDS = (
    "lower(x.task_id || ' ' || COALESCE(x.prompt, '') || ' ' || "
    "COALESCE(x.negative_prompt, '') || ' ' || COALESCE(x.model, '') || ' ' || "
    "COALESCE(x.model_version, ''))"
)
