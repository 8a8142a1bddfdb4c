"""The state's schema, as ordered migrations every implementation follows."""

from __future__ import annotations

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
        "CREATE INDEX IF NOT EXISTS tasks_newest "
        "ON tasks (COALESCE(created_at, first_seen), task_id)",
        "CREATE INDEX IF NOT EXISTS tasks_by_type_newest "
        "ON tasks (task_type, COALESCE(created_at, first_seen), task_id)",
        "CREATE INDEX IF NOT EXISTS tasks_by_state_newest "
        "ON tasks (state, COALESCE(created_at, first_seen), task_id)",
        # Answers recorded before this migration are indexed by fetcher/index.py, under
        # the lock, with a progress bar: not here, where a big archive would sit silent.
        "INSERT OR REPLACE INTO meta VALUES ('text_index', CASE WHEN EXISTS "
        "(SELECT 1 FROM tasks WHERE detail IS NOT NULL) THEN 'partial' ELSE 'whole' END)",
    ),
    # 5: the runs working on the state and their leases on tasks (fetcher/lease.py).
    # Times are Unix seconds; a run or a lease not renewed by then has lapsed.
    (
        """CREATE TABLE IF NOT EXISTS runs (
            run_id      TEXT PRIMARY KEY,
            host        TEXT NOT NULL,
            pid         INTEGER NOT NULL,
            started_at  TEXT NOT NULL,
            alive_until REAL NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS leases (
            task_id    TEXT PRIMARY KEY,
            run_id     TEXT NOT NULL,
            expires_at REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS leases_by_run ON leases (run_id)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
#: The first schema with the search index (task_text, task_search).
TEXT_SCHEMA = 4
