"""A stand-in of the OpenHands modules that sandboxd.integrations.openhands imports.

OpenHands needs Python 3.12 and cannot be installed where sandboxd's suite runs
(3.11), so its tests run the adapter against these modules instead: the same
module paths, the same classes with the same public signatures, pydantic
models with the same fields, as upstream (OpenHands/OpenHands, openhands/app_server;
OpenHands/software-agent-sdk for openhands.sdk and openhands.agent_server),
written here, not copied, and only as much of each module as the adapter and
its tests touch. Where upstream needs a package this environment lacks
(fastapi, starlette), a small class of the same role stands in, and its
docstring says so. tests/integrations/conftest.py puts this directory on
sys.path; mypy reads it through mypy_path, so the adapter is type-checked
against these signatures.
"""
