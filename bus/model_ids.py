"""What a model id may look like: a Hugging Face repo id that cannot escape a folder."""

from __future__ import annotations

import re

# "org/name" (or a bare "name"), each part made of letters, digits and "-_.",
# not starting with "." so that no id can climb out of the models directory.
_REPO_PART = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,95}"
_REPO_ID = re.compile(rf"^(?:{_REPO_PART}/)?{_REPO_PART}$")


def model_id_problem(model_id: object) -> str | None:
    """None if `model_id` is a safe repo id, else why it is not, in words."""
    if isinstance(model_id, str) and _REPO_ID.match(model_id) and ".." not in model_id:
        return None
    return (
        f"model id {model_id!r} is not a valid repo id (expected 'org/name' made of "
        "letters, digits, '-', '_' and '.', not starting with '.', no '..')"
    )
