"""Mirror: complete closures in the server's own slices, copied from upstream caches.

The model
    A **mirror** (``[[mirror]]`` in the config, :class:`~nixd.server.config.MirrorSection`)
    is an upstream binary cache — cache.nixos.org, or another team's — with the keys its
    narinfos must be signed by, a priority (lower first), the slices that may use it
    (``org/project`` or ``org/*``; none by default) and its limits (requests in flight,
    requests per second, a timeout). A slice no mirror lists never makes the server
    contact an upstream: no request, no store path name leaves through it.

    A **mirrored path** is an ordinary slice record (``slice_records``) whose writer is the
    server itself (uploader ``mirror:<name>``), plus its **provenance** (``mirror_paths``):
    which upstream, the narinfo URL, when, and the upstream's ``Sig`` lines that verified.
    The served narinfo carries the upstream's signature next to the server's, so a client
    that trusts only the upstream's key accepts it too. It got there exactly like an
    upload: the narinfo's signature is checked against the mirror's keys, then the NAR is
    streamed through the store's :class:`~nixd.server.storage.store.NarIngest` (the
    decompression its ``Compression`` names, the strict NAR parser, NarHash and NarSize
    compared with the signed narinfo, recompression into the blob store) and committed
    only if every check held; nothing unverified is kept. Every size from the upstream is
    bounded before it is used (the narinfo's body, its References, NarSize, the NAR body).

    **Closure completion.** A closure of a slice is *complete* when every path it
    references, transitively, is a record of that same slice (:func:`.closure.
    closure_missing`, which the deployment work reads). After a narinfo upload to a slice
    that may use a mirror, the path becomes a **root** (``mirror_roots``, pending): a
    background task in the server process fetches the references the slice does not hold
    from the allowed upstreams by priority, recursively through what it fetched, a
    bounded number at a time, and then marks the root complete or incomplete. Pending
    roots are rows, so a restart resumes them. What could not be had is a **want**
    (``mirror_wants``): ``missing`` (no upstream has it: each answered 404) or
    ``failed`` (an upstream had it but it failed verification, or did not answer), with
    the reason; ``nixd-server mirror status`` lists them, ``mirror complete`` retries.

    **Pull-through** (``pull_through = true`` on a mirror): a reader's narinfo miss in a
    slice that may use it — a slice read, or a view of which some readable slice may —
    is fetched, verified and stored in that slice, then answered as a hit. Concurrent
    misses of one path make one upstream fetch (single flight). An upstream that is slow
    or down answers 503 (:class:`~nixd.server.errors.UpstreamUnavailable`), never 404:
    Nix remembers a 404 for ``narinfo-cache-negative-ttl`` (an hour), a 5xx it retries.
    Only "no allowed upstream has it" is a 404.

    **Retention.** Mirrored records are records: the GC (:mod:`nixd.server.storage.gc`)
    keeps them while a retained or pinned closure references them and collects them
    like any other; provenance of a record that is gone (or was replaced: provenance
    names the NarHash it vouches for) is ignored.

Rooms: :mod:`.records` (schema, provenance, wants, roots), :mod:`.upstream` (the HTTP
client of one upstream, its limits and checks), :mod:`.closure` (walks a slice's
closure), :mod:`.service` (completion, pull-through, the background runner, verify).
Imports: mirror → storage, nix; http imports mirror, never back.
"""
