"""``python -m vtprune ...``: the ``vtprune`` command from any interpreter, without the script on PATH."""

from vtprune.cli import app

if __name__ == "__main__":
    app(prog_name="vtprune")
