"""The one converter of the wire types, configured once, here.

orjson serializes what it knows natively and hands everything else (attrs
instances) to it. Extra keys are allowed when structuring: a client must
survive the new optional fields by which the protocol grows.

The event catalogue's classes (``ExposedUrl`` in ``SandboxInfo``) are msgspec
Structs, not attrs classes: msgspec turns them into builtins and back.
"""

from typing import Any

import msgspec
from cattrs.preconf.orjson import make_converter

converter = make_converter()


def _is_struct(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, msgspec.Struct)


def _structure_struct(value: Any, cls: type[msgspec.Struct]) -> msgspec.Struct:
    if isinstance(value, dict):  # extra keys are allowed here, as for attrs classes
        value = {name: value[name] for name in cls.__struct_fields__ if name in value}
    return msgspec.convert(value, cls)


converter.register_unstructure_hook_func(_is_struct, msgspec.to_builtins)
converter.register_structure_hook_func(_is_struct, _structure_struct)
