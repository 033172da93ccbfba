"""The general-purpose constitutions that ship with the core (``constitutions/``)."""

from __future__ import annotations

from cai_engine import CONSTITUTION_SUFFIXES, data_dir, hookimpl


@hookimpl
def cai_register_constitutions(register):
    for path in sorted(data_dir("constitutions").iterdir()):
        if path.suffix.lower() in CONSTITUTION_SUFFIXES:
            register(path)
