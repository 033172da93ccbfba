"""`python -m cai_engine.cli`."""

from cai_engine.cli import main

main()
