-- The Mercury demo on PostgreSQL: the schema and seed data of `changecast demo` (the
-- SQLite one in src/demo/mod.rs), with primary keys (changecast's `key`) and `owner` as
-- jsonb (a nested document: the routes pick `owner._id`).
--
--   createdb mercury && psql -d mercury -f examples/postgres/schema.sql
--
-- Safe to run again: tables are created and rows inserted only when missing. REPLICA
-- IDENTITY FULL (the old row on updates and deletes) is set by changecast itself with
-- `pre_images = "ensure"`, on the tables whose rules need it.

CREATE TABLE IF NOT EXISTS businesses (
    _id text PRIMARY KEY,
    name text NOT NULL,
    owner jsonb NOT NULL              -- {"_id": ..., "name": ...}
);

CREATE TABLE IF NOT EXISTS users (
    _id text PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    business_id text NOT NULL
);

CREATE TABLE IF NOT EXISTS inventory_items (
    _id text PRIMARY KEY,
    name text NOT NULL,
    owned_by text NOT NULL,
    quantity_in_stock integer NOT NULL,
    reorder_point integer NOT NULL
);

CREATE TABLE IF NOT EXISTS orders (
    _id text PRIMARY KEY,
    creator_id text NOT NULL,
    item_id text NOT NULL,
    quantity integer NOT NULL,
    status text NOT NULL
);

INSERT INTO businesses VALUES
    ('b1', 'Kano Grains', '{"_id": "u1", "name": "Amina Bello"}'),
    ('b2', 'Lagos Fresh', '{"_id": "u2", "name": "Tunde Okafor"}'),
    ('b3', 'Abuja Mart', '{"_id": "u3", "name": "Chioma Nwosu"}')
ON CONFLICT DO NOTHING;

INSERT INTO users VALUES
    ('u1', 'amina@kanograins.example', 'Amina Bello', 'b1'),
    ('u4', 'musa@kanograins.example', 'Musa Idris', 'b1'),
    ('u2', 'tunde@lagosfresh.example', 'Tunde Okafor', 'b2'),
    ('u5', 'ngozi@lagosfresh.example', 'Ngozi Eze', 'b2'),
    ('u3', 'chioma@abujamart.example', 'Chioma Nwosu', 'b3'),
    ('u6', 'yusuf@abujamart.example', 'Yusuf Garba', 'b3')
ON CONFLICT DO NOTHING;

INSERT INTO inventory_items VALUES
    ('i1', 'Rice', 'b1', 14, 5),
    ('i2', 'Millet', 'b1', 9, 4),
    ('i3', 'Sorghum', 'b1', 11, 4),
    ('i4', 'Tomatoes', 'b2', 20, 8),
    ('i5', 'Peppers', 'b2', 12, 5),
    ('i6', 'Onions', 'b2', 16, 6),
    ('i7', 'Garri', 'b3', 18, 6),
    ('i8', 'Beans', 'b3', 10, 4),
    ('i9', 'Palm oil', 'b3', 8, 3)
ON CONFLICT DO NOTHING;
