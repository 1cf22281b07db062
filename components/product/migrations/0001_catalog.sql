-- The catalog. `stock` is what can still be ordered: reservations take from it, releases
-- give back; the CHECK is the last line against overselling.
CREATE TABLE products (
    id TEXT PRIMARY KEY,
    sku TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    currency TEXT NOT NULL,
    stock BIGINT NOT NULL CHECK (stock >= 0),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX products_by_creation ON products (created_at, id);

-- Stock held for an order, one row per product, at the price it was reserved at.
CREATE TABLE reservations (
    order_id TEXT NOT NULL,
    product_id TEXT NOT NULL REFERENCES products (id),
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    unit_price_cents BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'released')),
    created_at TEXT NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
