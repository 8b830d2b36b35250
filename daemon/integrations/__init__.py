"""Adapters that make sandboxd the sandbox service of another platform.

Each module imports its platform, so nothing imports them but that platform's
process: ``sandboxd.integrations.openhands`` for an OpenHands app server
(docs/openhands.md).
"""
