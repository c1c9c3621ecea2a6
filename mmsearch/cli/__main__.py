"""`python -m mmsearch.cli`: the same as the installed `mmsearch` command."""

from . import main

main()
