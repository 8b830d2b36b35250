"""Labels: what a starter tags a sandbox with (string to string), and how filters match them.

The bounds are the protocol's (docs/protocol.md): at most ``MAX_LABELS`` keys, each
``[a-z0-9_.-]{1,63}`` (a Kubernetes label's name part, lower case), each value at most
``MAX_VALUE`` characters. They bound what one sandbox costs the projection and each
snapshot (32 x (63 + 256) characters at most). A filter is a set of labels too, held
to the same bounds: a sandbox (or event) matches it if it has every one of them.
Plain functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MAX_LABELS = 32
MAX_VALUE = 256
LABEL_KEY = re.compile(r"[a-z0-9_.-]{1,63}")


def _show(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def labels_problem(field: str, labels: Mapping[str, str]) -> str | None:
    """Why ``labels`` (given as ``field``) cannot be a sandbox's labels; None if they can.

    One sentence naming the field and the offending key. The JSON types (an object
    of strings) are the caller's to have checked.
    """
    if len(labels) > MAX_LABELS:
        return f"'{field}' may hold at most {MAX_LABELS} labels, not {len(labels)}."
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            return (
                f"'{field}' has the key {_show(key)}: a label's key must be 1 to 63 of"
                " a-z 0-9 _ . -"
            )
        if len(value) > MAX_VALUE:
            return (
                f"'{field}[{_show(key)}]' is {len(value)} characters long; a label's value"
                f" may be at most {MAX_VALUE}."
            )
    return None


def matches(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    """Whether ``labels`` has every label of ``wanted`` (each key with the same value)."""
    return all(labels.get(key) == value for key, value in wanted.items())
