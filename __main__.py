"""`python -m stillhouse ...` is the same as the `stillhouse` command."""

from stillhouse.cli import main

main()
