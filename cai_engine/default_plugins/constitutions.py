"""The general-purpose constitutions that ship with the core (``constitutions/``)."""

from __future__ import annotations

from cai_engine.constitutions import SUFFIXES
from cai_engine.hookspecs import hookimpl
from cai_engine.resources import data_dir


@hookimpl
def cai_register_constitutions(register):
    for path in sorted(data_dir("constitutions").iterdir()):
        if path.suffix.lower() in SUFFIXES:
            register(path)
