"""The server's HTTP side: the routes (:mod:`.app`, an ASGI app) and the front that serves them.

Routes decide nothing about access themselves: they ask :mod:`nixd.server.access` who
the caller is and what the policy says, resolve paths through the organization's
unified view (the trust order in :mod:`nixd.server`), and answer hidden exactly as
absent. Errors become answers in one place, :func:`nixd.server.errors.into_client`.
"""
