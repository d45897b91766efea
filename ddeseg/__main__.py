"""`python -m ddeseg ...` (and `torchrun -m ddeseg ...`) run the command line."""

from ddeseg.cli.app import main

main()
