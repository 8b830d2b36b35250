"""The one converter of the wire types, configured once, here.

orjson serializes what it knows natively and hands everything else (attrs
instances) to it. Extra keys are allowed when structuring: a client must
survive the new optional fields by which the protocol grows.
"""

from cattrs.preconf.orjson import make_converter

converter = make_converter()
