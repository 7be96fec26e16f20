"""nixd-server: a team's binary cache, shared by organizations that must not trust each other.

The tenancy model
    An **organization** owns **projects**; a project is a **slice** of the cache
    (``org/project``), the unit that policy talks about and that ``nix copy --to
    /cache/<org>/<project>`` uploads to. Names are compared ignoring case: ``acme`` and
    ``ACME`` cannot both exist. An **identity** is ``kind:subject`` and is scoped to its
    organization where names could collide: API tokens are ``token:<org>/<name>``; users,
    CI and AWS identities carry an ``org`` attribute from the server config. An
    identity's attributes come from its credential, never its permissions.

    Each (slice, store path) has **its own record**: the NarHash, NarSize, References,
    Deriver, System and CA that slice's writer uploaded, and who uploaded it. NAR bytes
    are shared by hash (a record names a NarHash, and the bytes of one NarHash are one
    thing); metadata never is. A second upload of a path a slice already holds must be
    identical, or come from an identity with ``cache:admin`` there (409 otherwise).

    The **unified view** of an organization O — ``/cache/<O>/``, and ``/cache/`` for a
    caller whose own organization is O — answers a path from the slices the reader may
    read, in a trust order an admin can see (``nixd-server org view``) and set: O's own
    slices first (by ``project priority``, lower first; then the record that arrived
    first; then by name), then other organizations' slices O opted in to (``org
    trust``, in that order), then slices granted to this reader by an explicit policy
    rule. Another organization's slice that is readable only because it is public is
    never asked unless O opted in to it. The answer is deterministic, and its audit line
    names the slice that served it and the rule that allowed it.

    **Why one view per organization**, rather than one for the whole server: trust is an
    organization's decision. A server-wide view would have to order organizations
    against each other, and any order lets one of them shadow the others. ``/cache/``
    stays the URL the daemon configures (it is the caller's own organization's view);
    a caller without an organization (anonymous) reads public slices through
    ``/cache/<org>/``.

The invariant every change must keep
    For any reader R and store path P, what R receives for P (narinfo fields, NAR bytes,
    log) was uploaded by an identity allowed to write a slice that R may read; no other
    identity can change it, and nothing R cannot see changes R's answers: a hidden path,
    slice or organization answers exactly as an absent one (same status, same body),
    and the reason goes to the audit log only.

    Within one organization, the writers of every slice a reader may read are trusted
    by that reader as far as this view goes: a writer of ``acme/app`` who uploads a path
    before ``acme/ci`` does is answered first for readers of both unless the admin ranks
    ``acme/ci`` higher (``project priority acme/ci 10``) or keeps those readers out of
    ``acme/app`` by policy.

Retention
    What a slice keeps is per slice (``[[retention]]``: everything, the closures read
    within N days, or those of its N latest releases) plus every pinned closure; the
    garbage collector (:mod:`nixd.server.storage.gc`) removes the rest online and never
    a path that a kept closure references, from whichever slice could serve it. Removing
    a record is one slice's business: another slice's record of the same path stays.

Mirrors
    ``[[mirror]]`` upstream caches (:mod:`nixd.server.mirror`) complete the closures of
    the slices they list: after an upload, references the slice lacks are fetched,
    checked against the upstream's keys and through the upload path's NAR checks, and
    become records of that slice whose writer is the server (``mirror:<name>``), with
    their provenance and the upstream's ``Sig`` served next to the server's. The
    invariant holds with the admin as the trusted writer: only slices a mirror lists get
    its paths, and a slice no mirror lists never contacts an upstream. Pull-through
    (opt-in) does the same for a reader's miss, answering 503 — never 404 — while an
    upstream is slow.

Policy
    Deny beats allow everywhere; a project's ``--public`` flag is an allow rule for
    every caller, anonymous included, on ``cache:read`` of that slice, and nothing more
    (a matching deny still wins); a flake published ``public`` is likewise an allow for
    every caller on ``flake:read`` of that flake (rule ``public-flake``). One decision
    function (:meth:`~nixd.server.access.policy.Policy.decide`) serves requests and
    ``nixd-server policy explain``.

Several instances
    With ``[storage] database`` on PostgreSQL, any number of ``serve`` processes on any
    number of hosts are one server: metadata, credentials and revocations, device codes,
    the signing keyrings (:mod:`~nixd.server.access.keys`), the policy
    (:mod:`~nixd.server.access.shared_policy`) and the audit log are rows of that
    database, every commit is announced (NOTIFY) and seen by every instance on its next
    request, and writes are serialized by one advisory lock. An instance keeps only its
    ``config.toml`` (and, while the blobs are a directory, that directory must be shared).

The audit log
    Every decision and admin change is one hash-chained line, durable before the answer
    leaves (allowed reads too, unless ``audit.durable_reads = false``): a decision that
    cannot be recorded is not answered (503). One chain per
    deployment: a file in the state directory on SQLite; on PostgreSQL a table of the
    shared database, extended by every instance under one row lock, so several instances
    behind a load balancer keep one tamper-evident history (``nixd-server audit verify``,
    ``audit export`` to the file format). See :mod:`nixd.server.access.audit`.

Rooms
    ``http/`` (routes as an ASGI app, the HTTP/1.1 front, and ``ops``: health, readiness,
    metrics and the access log), ``access/`` (identity, policy, audit in a file or a
    PostgreSQL table, credentials, access tokens, keys), ``login/`` (exchanges: OIDC,
    AWS, device code, accounts, web pages), ``storage/`` (metadata on SQLite or
    PostgreSQL, blobs in a directory or an S3 bucket, and retention: pins and the garbage
    collector), ``flakes/`` (private flakes: releases by semantic version, their
    tarballs and source trees, and the closures of the outputs they record, which
    deploy-only tokens read: :mod:`nixd.server.flakes`), ``mirror/`` (upstream caches:
    closure completion, pull-through, provenance), ``cli/`` (one module per command
    group). Imports run cli → http → access, login, flakes, mirror → storage; the room
    root holds config, errors, the metrics every room may count into and the ASGI types
    that every room shares.
"""
