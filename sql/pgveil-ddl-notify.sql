-- pgveil: tell pgveil at once when the schema changes, wherever the DDL comes from.
--
-- pgveil re-reads a database's catalog after DDL that passes through it. DDL made
-- around it (a direct connection, a migration tool, a function or procedure that runs
-- DDL) is otherwise only noticed by the periodic refresh, up to 60 s later; meanwhile a
-- redefined view could be read with the old view's rules. This event trigger sends a
-- notification on channel pgveil_ddl after every committed schema change; pgveil's
-- catalog login listens on it and re-reads the catalog before the next statement of
-- every session. Changes to temporary objects are ignored.
--
-- Install once per database, as a superuser (event triggers require it):
--   psql -d yourdb -f sql/pgveil-ddl-notify.sql
-- Remove with:
--   DROP EVENT TRIGGER pgveil_ddl_notify; DROP EVENT TRIGGER pgveil_ddl_drop_notify;
--   DROP FUNCTION pgveil_notify_ddl(); DROP FUNCTION pgveil_notify_drop();

CREATE OR REPLACE FUNCTION pgveil_notify_ddl() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() AS command
                WHERE command.schema_name IS NULL
                   OR command.schema_name NOT LIKE 'pg\_temp\_%') THEN
        PERFORM pg_notify('pgveil_ddl', '');
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION pgveil_notify_drop() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() AS dropped
                WHERE NOT dropped.is_temporary) THEN
        PERFORM pg_notify('pgveil_ddl', '');
    END IF;
END
$$;

DROP EVENT TRIGGER IF EXISTS pgveil_ddl_notify;
CREATE EVENT TRIGGER pgveil_ddl_notify ON ddl_command_end
    EXECUTE FUNCTION pgveil_notify_ddl();

DROP EVENT TRIGGER IF EXISTS pgveil_ddl_drop_notify;
CREATE EVENT TRIGGER pgveil_ddl_drop_notify ON sql_drop
    EXECUTE FUNCTION pgveil_notify_drop();
