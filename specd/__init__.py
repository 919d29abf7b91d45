"""The specd command line and the helpers behind it."""
