"""Stand-in (see openhands/__init__.py)."""
