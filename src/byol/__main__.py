"""`python -m byol ...` is the same as the `byol` command (torchrun uses this form)."""
from byol.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
