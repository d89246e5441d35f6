"""``python -m torchkeep`` runs the command line."""

from torchkeep.cli import main

main()
