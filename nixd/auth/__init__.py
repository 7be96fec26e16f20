"""Client-side identity: the token model and one module per login method."""
