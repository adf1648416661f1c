"""`python -m workers.preparation`: the weights command (see command.py)."""

from workers.preparation.command import main

if __name__ == "__main__":
    main()
