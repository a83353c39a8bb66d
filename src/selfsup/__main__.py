import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned worker (parallel decoding) re-imports this module
    sys.exit(main())
