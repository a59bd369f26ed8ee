"""`python -m mdlite` is the `mdlite` command."""

from mdlite.cli import cli

if __name__ == "__main__":
    cli(prog_name="mdlite")
