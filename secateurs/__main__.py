"""``python -m secateurs``: the same command line as the ``secateurs`` console script."""

from secateurs.workers.cli import main

if __name__ == "__main__":
    main()
