"""Private flakes: releases published from CI, resolved by semantic version, fetched by Nix.

The model
    A **flake** is ``org/name`` (names as for slices, unique ignoring case), with a
    **visibility** (``private``: readable by whom the policy grants ``flake:read`` on
    ``org/name``; ``public``: also by anyone, anonymous included — an allow that any
    matching deny rule still overrides) and a description; both are those of its latest
    published release. A **release** is one version of it (SemVer 2.0, build metadata
    refused, :mod:`nixd.semver`) and is **immutable**: publishing a version again with the
    same source tree is a no-op, with another one a conflict that names the version.

    A release keeps the flake's source as a **canonical tarball** (:mod:`nixd.nix.
    flaketarball`: sorted entries, one top directory ``source``, fixed mtimes and owners,
    so the same tree is the same bytes), its NAR hash as Nix computes it when it unpacks
    the tarball, the commit and ref it was built from, the ``flake.lock`` and the output
    paths CI chose to record, who published it and when. Only CI identities publish
    (``flake:publish``; the default policy grants it to the org's configured GitHub and
    GitLab repositories and to no API token, person or machine).

Why the source tree is also a store path
    Nix 2.8 locks a tarball input as ``{type = "tarball"; url; narHash}`` with the URL as
    written (a constraint such as ``0.*`` included) and, to fetch a locked input, first
    substitutes the fixed-output path of that NAR hash (``/nix/store/<h>-source``) from
    its binary caches; only if that fails does it download the URL again (and, when the
    constraint now resolves to a newer release, fails on the hash). So each release's
    unpacked tree is served as a content-addressed store path (``ca = fixed:r:sha256:``,
    no references, signed by the server's keys) in the cache view of every caller with
    ``flake:read`` on the flake, which keeps a ``flake.lock`` made with ``0.*``
    reproducible after ``0.3.0`` appears, on a fresh machine too. A caller without
    ``flake:read`` gets the answer of an absent path, byte for byte.

Storage
    Rows in the metadata database (component ``flakes``: :mod:`.releases`), bytes in the
    server's blob store under keys of their own (``flakes/<sha256>.tar.gz``,
    ``flakes/<filehash>.nar.zst``), which the cache's garbage collector never names and
    so never removes. Releases are kept as long as the server keeps its data.

Deploying a recorded output
    An output recorded at publish is a store path CI built and pushed; a target deploys
    it without evaluating anything by resolving it (``.../releases/V/outputs/ATTR``) and
    substituting its closure. The server refuses to record an output, and to resolve
    one, whose closure is not all in the organization's deploy view (:mod:`.deploy`), so
    what resolves can be fetched whole; a deploy-only token
    (:mod:`nixd.server.access.deploy`) reads exactly those closures and nothing else.

Modules
    :mod:`.releases` (schema, rows, blobs), :mod:`.metadata` (the publish request's JSON,
    checked and bounded), :mod:`.deploy` (closures of recorded outputs, their
    completeness). The routes are :mod:`nixd.server.http.flakes` and
    :mod:`nixd.server.http.deploy`.
"""
