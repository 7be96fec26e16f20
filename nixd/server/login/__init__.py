"""How an identity the caller already has becomes a short-lived access token.

Each exchanger (:mod:`.oidc` for GitHub and GitLab, :mod:`.aws` for STS, :mod:`.device`
for the interactive login with :mod:`.accounts` and :mod:`.web`) proves *who*, never
*what*; :mod:`.exchangers` lists the ones a config enables. Every exchange is audited.
"""
