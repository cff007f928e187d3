"""`python -m minioprd` (and `accelerate launch -m minioprd distill ...`): the `minioprd` command."""

from minioprd.cli import main

if __name__ == "__main__":
    main()
