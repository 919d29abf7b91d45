"""The Generator service: the public API that runs a strategy over drafters and a verifier."""
