"""`python -m stillhouse ...` is the same as the `stillhouse` command."""

from stillhouse.cli.main import main

main()
