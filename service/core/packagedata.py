"""Where the files that ship beside the code are: lua/ and migrations/.

In the repository they sit at the top, beside service/; a built wheel carries them inside
the package (pyproject.toml's force-include), so that an installed `boxoffice` needs no
checkout. importlib.resources finds the package wherever it was imported from.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# A regular package on the file system (not a zip): its Traversable is a Path.
PACKAGE = Path(str(files("service")))


def checkout() -> Path | None:
    """The repository the code runs from (a clone, or an editable install of one); None for
    a package installed from a wheel."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() else None


def directory(name: str) -> Path:
    """The directory `name` (lua or migrations): the wheel's copy inside the package, else
    the checkout's."""
    inside = PACKAGE / name
    if inside.is_dir():
        return inside
    root = checkout()
    if root is not None and (root / name).is_dir():
        return root / name
    raise FileNotFoundError(f"{name}/ is neither in the package ({inside}) nor in a checkout")
