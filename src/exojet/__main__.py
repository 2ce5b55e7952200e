"""`python -m exojet` is the `exojet` command."""

from exojet.cli.main import main

if __name__ == "__main__":
    main()
