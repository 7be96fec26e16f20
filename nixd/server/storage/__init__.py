"""What the server keeps: metadata (:mod:`.db`, on SQLite or PostgreSQL through :mod:`.sql`);
slice records (:mod:`.store`); NAR blobs behind one interface (:mod:`.blobs`: a local
directory, or S3-compatible object storage in :mod:`.s3`), which the store uses for every
blob and never bypasses; and for how long: pins (:mod:`.pins`), retention and the garbage
collector (:mod:`.gc`), which reaches blobs only through the store's
``iter_blobs``/``delete_blob``/``blob_exists``.

Slice records are per (slice, store path) and never shared; NAR bytes are shared by
NarHash. Schema changes are append-only migrations applied when the server opens the
database, so an upgrade needs no separate step (``nixd-server migrate`` applies them ahead,
for several instances on one PostgreSQL). The SQL is written once for both engines; the
PostgreSQL connection keeps SQLite's semantics (one writer at a time, a data version that
changes on every commit, seen by every process), so the code above it does not know which
engine it runs on.
"""
