"""The Drafter service: hosts one small model and proposes draft tokens."""
