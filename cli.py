"""`python cli.py ...` behaves like the installed `mmsearch` command."""

from mmsearch.cli import main

if __name__ == "__main__":
    main()
