"""``python -m deploypipe`` = the ``deploypipe`` command."""

from deploypipe.cli import main

main()
