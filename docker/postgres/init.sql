-- Demo source for the local stack: runs once, on the first start of the postgres container.
-- The server runs with wal_level=logical (see docker-compose.yml); cdc_user is the image's
-- superuser, so it may create replication slots and publications.

CREATE TABLE IF NOT EXISTS public.customers (
    id         BIGSERIAL PRIMARY KEY,
    name       TEXT        NOT NULL,
    email      TEXT        NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Full before-images for UPDATE and DELETE events.
ALTER TABLE public.customers REPLICA IDENTITY FULL;

INSERT INTO public.customers (name, email) VALUES
    ('Ada Lovelace', 'ada@example.com'),
    ('Grace Hopper', 'grace@example.com')
ON CONFLICT (email) DO NOTHING;

-- Heartbeat table: lets a low-traffic pipeline advance its slot (prevents WAL bloat).
CREATE TABLE IF NOT EXISTS public.cdc_heartbeat (
    id        INT PRIMARY KEY,
    last_beat TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Destination database of the demo pipeline's PostgreSQL sink.
CREATE DATABASE cdc_sink OWNER cdc_user;
