"""What the server keeps: metadata in SQLite (:mod:`.db`); blobs and slice records (:mod:`.store`).

Slice records are per (slice, store path) and never shared; NAR bytes are shared by
NarHash. Schema changes are append-only migrations applied when the server opens the
database, so an upgrade needs no separate step.
"""
