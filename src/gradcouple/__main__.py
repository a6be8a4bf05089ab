"""``python -m gradcouple`` (and ``torchrun -m gradcouple``): the command line."""

import sys

from .cli import main
from .ranks import runs_here

if runs_here(sys.argv[1:]):  # under torchrun: extract and couple on every rank, other commands on rank 0 alone
    main()
