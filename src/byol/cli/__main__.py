"""`python -m byol.cli ...` is the `byol` command too (as it was when the CLI was one module)."""
from byol.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
