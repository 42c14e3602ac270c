"""``python -m mpicellpose.training``: train the demo nuclei model (:mod:`.nuclei`)."""
from .nuclei import main

if __name__ == "__main__":
    raise SystemExit(main())
