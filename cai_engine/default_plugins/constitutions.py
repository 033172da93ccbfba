"""The general-purpose constitutions that ship with the core (``constitutions/``)."""

from __future__ import annotations

from cai_engine.constitution.load import SUFFIXES
from cai_engine.files.resources import data_dir
from cai_engine.plugins.hookspecs import hookimpl


@hookimpl
def cai_register_constitutions(register):
    for path in sorted(data_dir("constitutions").iterdir()):
        if path.suffix.lower() in SUFFIXES:
            register(path)
