"""``python -m gradcouple`` (and ``torchrun -m gradcouple``): the command line."""

from .cli import main

main()
