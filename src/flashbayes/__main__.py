"""`python -m flashbayes` runs the CLI."""

from flashbayes.cli import main

if __name__ == "__main__":
    main()
