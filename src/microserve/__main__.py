"""``python -m microserve`` runs the CLI."""

from microserve.cli import main

main()
