"""The OpenAI-compatible HTTP gateway of specd (`python -m gateway`)."""
