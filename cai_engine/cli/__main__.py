"""`python -m cai_engine.cli`."""

from . import main

main()
