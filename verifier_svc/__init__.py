"""The Verifier service: hosts the target and verifies drafts in one forward pass."""
