import sys

from .cli import main

sys.exit(main(["compare", *sys.argv[1:]]) if sys.argv[1:2] != ["compare"] else main())
