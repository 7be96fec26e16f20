"""Who a request is and what it may do: identity, policy, audit, credentials, tokens, keys.

An :class:`~.identity.Identity` is what a credential proved (API token, access token,
OIDC, AWS, device login). The policy decides on identity attributes, never on what a token
claims to be allowed; every decision, allowed or not, becomes one line of the
hash-chained audit log, whatever the client sent. A deploy-only token (attribute
``deploy``: :mod:`.deploy`) is refused every action but ``deploy:read``.
"""
