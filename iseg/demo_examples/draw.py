"""How the demo's example pictures were made: simple synthetic scenes drawn with PIL (no photo,
no licence to track). ``python -m iseg.demo_examples.draw`` redraws them next to this file.

Each scene has soft shading and a little seeded noise, so that the attention has texture to
group, while the JPEGs stay small (about 16 kB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = (512, 384)  # W, H


def _finish(image: Image.Image, seed: int) -> Image.Image:
    """Soften the edges and add a little grain."""
    soft = np.asarray(image.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float64)
    grain = np.random.default_rng(seed).normal(0.0, 4.0, soft.shape)
    return Image.fromarray(np.clip(np.rint(soft + grain), 0, 255).astype(np.uint8))


def _sky_and_ground(sky: tuple, ground: tuple, horizon: int) -> Image.Image:
    w, h = SIZE
    rows = np.arange(h, dtype=np.float64)[:, None, None]
    top = np.array(sky, dtype=np.float64)
    low = np.array(ground, dtype=np.float64)
    pixels = np.where(rows < horizon, top * (0.75 + 0.25 * rows / horizon), low * (1.1 - 0.2 * rows / h))
    return Image.fromarray(np.clip(np.broadcast_to(pixels, (h, w, 3)), 0, 255).astype(np.uint8))


def ball_on_grass() -> Image.Image:
    image = _sky_and_ground((110, 170, 235), (70, 150, 60), horizon=230)
    draw = ImageDraw.Draw(image)
    draw.ellipse((400, 30, 470, 100), fill=(255, 220, 70))  # sun
    draw.ellipse((150, 190, 290, 330), fill=(215, 40, 40))  # ball
    draw.ellipse((185, 215, 225, 250), fill=(240, 120, 110))  # its highlight
    return _finish(image, 1)


def house_and_tree() -> Image.Image:
    image = _sky_and_ground((125, 180, 240), (95, 160, 80), horizon=260)
    draw = ImageDraw.Draw(image)
    draw.polygon([(0, 384), (512, 384), (330, 300), (260, 300)], fill=(120, 120, 125))  # road
    draw.rectangle((60, 150, 240, 280), fill=(190, 150, 100))  # house
    draw.polygon([(40, 155), (260, 155), (150, 70)], fill=(170, 50, 40))  # roof
    draw.rectangle((130, 210, 170, 280), fill=(90, 60, 40))  # door
    draw.rectangle((370, 180, 395, 290), fill=(100, 70, 40))  # trunk
    draw.ellipse((320, 80, 450, 210), fill=(40, 120, 45))  # crown
    return _finish(image, 2)


def fruit_on_a_table() -> Image.Image:
    image = _sky_and_ground((225, 215, 195), (150, 100, 60), horizon=200)  # wall, table
    draw = ImageDraw.Draw(image)
    draw.chord((120, 170, 400, 330), 0, 180, fill=(60, 90, 170))  # bowl
    draw.ellipse((150, 150, 240, 240), fill=(200, 30, 35))  # apple
    draw.ellipse((250, 140, 350, 240), fill=(245, 150, 30))  # orange
    draw.ellipse((420, 240, 490, 310), fill=(190, 35, 40))  # an apple on the table
    return _finish(image, 3)


SCENES = {"ball-on-grass": ball_on_grass, "house-and-tree": house_and_tree, "fruit-on-a-table": fruit_on_a_table}

if __name__ == "__main__":
    for name, draw_scene in SCENES.items():
        draw_scene().save(Path(__file__).with_name(f"{name}.jpg"), quality=80)
