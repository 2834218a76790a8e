"""The Grad-CAM overlay a client sees: the film in gray with the heat map on top, as PNG bytes."""

from __future__ import annotations

import io

import numpy as np


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
    """The film in gray with the heat map in the 'jet' colours on top, as PNG bytes."""
    from matplotlib import colormaps
    from PIL import Image

    gray = np.repeat(image[..., :1], 3, axis=-1)
    colours = colormaps["jet"](heatmap)[..., :3]
    blended = (1 - alpha * heatmap[..., None]) * gray + alpha * heatmap[..., None] * colours
    buffer = io.BytesIO()
    Image.fromarray((blended.clip(0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
