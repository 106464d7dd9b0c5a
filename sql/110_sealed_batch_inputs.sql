-- With RELAY_ENCRYPTION_KEY set, a batch item's input waits for its create sealed, never in
-- clear: `input_sealed` holds it under the key-encryption key `kek_id` (AES-256-GCM, bound to
-- the batch id and index), and `input` stays NULL. Either is dropped once the prediction exists.
ALTER TABLE batch_items
    ADD COLUMN input_sealed bytea,
    ADD COLUMN kek_id       text,
    ADD CONSTRAINT batch_items_one_input CHECK (input IS NULL OR input_sealed IS NULL);

CREATE INDEX batch_items_sealed ON batch_items (kek_id) WHERE input_sealed IS NOT NULL;
