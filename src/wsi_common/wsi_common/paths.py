"""Output locations that goals may name, confined to a node's configured root."""
from pathlib import Path


class OutsideRootError(ValueError):
    """A requested path resolves outside the directory the node is allowed to write to."""


def resolve_under(root: str | Path, requested: str) -> Path:
    """`requested` (relative to root, or absolute) resolved, if it lies under root; root if empty.

    `..` components and symbolic links are resolved first, so neither can lead outside the root.
    """
    root = Path(root).resolve()
    path = (root / requested).resolve() if requested else root
    if path != root and root not in path.parents:
        raise OutsideRootError(f"{requested!r} is outside the output root {root}")
    return path
