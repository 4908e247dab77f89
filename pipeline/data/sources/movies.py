"""An image + text genre set in the MM-IMDB format, built from embedded material, where labels need BOTH modalities.

    python -m jobs.shard make-movies --out raw/movies              # writes the MM-IMDB folder (seconds)
    python -m jobs.shard mmimdb --src raw/movies --out shards/movies --image-size 32

The folder is exactly what :mod:`pipeline.data.sources.mmimdb` reads from the real dataset: ``split.json``
(``train`` / ``dev`` / ``test`` id lists) and ``dataset/{id}.json`` (``title``, ``plot`` (list of str),
``genres``) + ``dataset/{id}.jpeg``, so the real source shards it unchanged.

How the 23 MM-IMDB genres are decided (each genre on with probability ``P_GENRE`` independently; a movie
has at least one):

- **11 image genres** (``IMAGE_GENRES``): each has a motif image shipped with scikit-image (the rocket for
  Sci-Fi, the cat for Family, …). The poster is a 2×2 grid of quadrants; each of the movie's image genres
  fills one quadrant with a random crop of its motif (random scale, flip), the other quadrants get smooth
  random colour fields. Nothing in the plot mentions them.
- **12 text genres** (``TEXT_GENRES``): the plot (real English text) holds one sentence per text genre,
  drawn from that genre's templates (detectives for Crime, a wedding for Romance, …), shuffled, then one or
  two neutral sentences. Nothing in the poster depends on them.

So an image-only model can reach the 11 image genres and a text-only model the 12 text genres; only a
model that reads both can get all 23. **Held-out posters come from disjoint image regions**: train and
dev/test crops lie in the left ``TRAIN_FRACTION`` / the rest of each motif's columns, so no held-out pixel
was seen in training. Plots are new compositions of the shared templates with different names (the
vocabulary a text model must learn is shared, the strings are not). Fully determined by ``seed``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from functools import cache

import numpy as np
import skimage.data
from PIL import Image

from .mmimdb import GENRES

#: image genre → scikit-image motif (skimage.data function name); all ship inside the wheel
IMAGE_GENRES = {
    "Sci-Fi": "rocket",
    "Adventure": "astronaut",
    "Family": "chelsea",
    "Documentary": "hubble_deep_field",
    "Horror": "immunohistochemistry",
    "Mystery": "retina",
    "Animation": "colorwheel",
    "History": "brick",
    "Western": "grass",
    "Music": "coins",
    "Biography": "coffee",
}
TEXT_GENRES = {
    "Drama": [
        "{a} cannot forgive {b} for the years of silence after the funeral.",
        "{a} returns home to face a dying father and a family torn apart by grief.",
        "An estranged sister and {a} must decide who keeps the farm after the tragedy.",
    ],
    "Comedy": [
        "{a} accidentally swaps suitcases with a clown and hilarity follows.",
        "{a} fakes being a chef and every dinner turns into a ridiculous disaster.",
        "A clumsy uncle and {a} stumble through one absurd prank after another.",
    ],
    "Romance": [
        "{a} falls in love with {b} during a summer wedding by the sea.",
        "{a} and {b} share one kiss in Paris and cannot forget each other.",
        "A shy florist and {a} discover their hearts belong together.",
    ],
    "Thriller": [
        "{a} receives anonymous threats and realises someone is watching every move.",
        "A ticking bomb gives {a} one hour to find the hidden hostage.",
        "{a} uncovers a conspiracy and must run before the assassin strikes.",
    ],
    "Crime": [
        "Detective {a} hunts the gang behind a string of bank robberies.",
        "{a} joins the mafia and launders money for a ruthless boss.",
        "A murder in the harbour leads inspector {a} to a corrupt police chief.",
    ],
    "Action": [
        "{a} fights through explosions and car chases to rescue the squad.",
        "A former commando, {a}, battles mercenaries on a speeding train.",
        "{a} leaps from a burning helicopter in a high speed shootout.",
    ],
    "Fantasy": [
        "{a} finds a magic sword and a dragon guarding an enchanted kingdom.",
        "A young wizard named {a} must break the curse of the elven queen.",
        "{a} follows a talking fox into a realm of witches and spells.",
    ],
    "War": [
        "{a} leads soldiers across the trenches during the final battle of the war.",
        "A platoon under sergeant {a} is trapped behind enemy lines.",
        "{a} survives the invasion and the bombing of a village at the front.",
    ],
    "Musical": [
        "{a} sings and dances on broadway while the whole chorus joins the song.",
        "Every argument between {a} and {b} bursts into a duet with tap dancing.",
        "A choir of orphans and {a} stage a singing spectacle with dancing.",
    ],
    "Sport": [
        "{a} trains for the championship and the final match of the season.",
        "The coach pushes {a} to win the marathon against the reigning champion.",
        "{a} and the underdog team fight for the league title in the stadium.",
    ],
    "Short": [
        "In just nine minutes this short film follows {a} through a single morning.",
        "A brief short about {a} told in one continuous shot of a few minutes.",
        "This short vignette captures {a} in one fleeting moment.",
    ],
    "Film-Noir": [
        "In the rain-soaked city a cynical private eye, {a}, meets a femme fatale.",
        "Shadows, cigarette smoke and a double cross trap {a} in the noir underworld.",
        "A hardboiled gumshoe, {a}, is framed by the dame he trusted.",
    ],
}
NEUTRAL = [
    "The story takes place over a few days.",
    "Things change for everyone involved.",
    "Nothing will ever be quite the same again.",
    "It is based on an original screenplay.",
    "Along the way old friends and strangers cross paths.",
    "The film was shot on location.",
]
TRAIN_NAMES = ["Anna", "Marco", "Lena", "Tom", "Sofia", "Jack", "Maya", "Oscar", "Ines", "Paul", "Clara", "Hugo"]
HELDOUT_NAMES = ["Nora", "Felix", "Julia", "Leo", "Greta", "Sam", "Ada", "Victor"]
TRAIN_FRACTION = 0.6
P_GENRE = 0.15
POSTER = 96  # stored poster side in pixels (the shard job resizes with --image-size)
assert set(IMAGE_GENRES) | set(TEXT_GENRES) == set(GENRES) and not set(IMAGE_GENRES) & set(TEXT_GENRES)


@cache
def motif(name: str) -> np.ndarray:
    """The scikit-image picture behind an image genre as uint8 (H, W, 3)."""
    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def motif_crop(name: str, rng: random.Random, heldout: bool, side: int) -> tuple[np.ndarray, list[int]]:
    """A random square crop of motif ``name`` from its train or held-out column range, resized to ``side``."""
    img = motif(name)
    h, w = img.shape[:2]
    cut = int(w * TRAIN_FRACTION)
    x0, x1 = (cut, w) if heldout else (0, cut)
    s = int(min(h, x1 - x0) * rng.uniform(0.6, 1.0))
    y, x = rng.randint(0, h - s), rng.randint(x0, x1 - s)
    tile = Image.fromarray(img[y : y + s, x : x + s]).resize((side, side), Image.Resampling.BICUBIC)
    out = np.asarray(tile)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out, [y, x, s]


def colour_field(rng: random.Random, side: int) -> np.ndarray:
    """Smooth random colour field (bilinear upsampling of a 3×3 colour grid): a quadrant without a motif."""
    grid = np.array([[[rng.randint(0, 255) for _ in range(3)] for _ in range(3)] for _ in range(3)], dtype=np.uint8)
    return np.asarray(Image.fromarray(grid).resize((side, side), Image.Resampling.BILINEAR))


def make_movie(rng: random.Random, heldout: bool) -> tuple[dict, np.ndarray]:
    """(metadata dict in the MM-IMDB JSON layout, poster uint8 (POSTER, POSTER, 3)) of one random movie."""
    genres = [g for g in GENRES if rng.random() < P_GENRE] or [rng.choice(GENRES)]
    image_genres = [g for g in genres if g in IMAGE_GENRES][:4]  # at most one per quadrant
    genres = [g for g in genres if g in TEXT_GENRES] + image_genres
    q = POSTER // 2
    quadrants = rng.sample(range(4), 4)
    poster = np.zeros((POSTER, POSTER, 3), dtype=np.uint8)
    tiles = {}
    for i, quad in enumerate(quadrants):
        r, c = divmod(quad, 2)
        if i < len(image_genres):
            tile, box = motif_crop(IMAGE_GENRES[image_genres[i]], rng, heldout, q)
            tiles[image_genres[i]] = {"quadrant": quad, "crop_yxs": box}
        else:
            tile = colour_field(rng, q)
        poster[r * q : (r + 1) * q, c * q : (c + 1) * q] = tile
    names = HELDOUT_NAMES if heldout else TRAIN_NAMES
    a, b = rng.sample(names, 2)
    sentences = [rng.choice(TEXT_GENRES[g]).format(a=a, b=b) for g in genres if g in TEXT_GENRES]
    rng.shuffle(sentences)
    sentences += rng.sample(NEUTRAL, rng.randint(1, 2))
    plot = " ".join(sentences)
    meta = {
        "title": f"{a} and {b}",
        "plot": [plot, plot.split(".")[0] + "."],
        "genres": sorted(genres, key=GENRES.index),
        "poster_tiles": tiles,
    }
    return meta, poster


def write_movie_folder(out: str, train: int = 512, dev: int = 128, test: int = 128, seed: int = 0) -> dict[str, int]:
    """Write the MM-IMDB-format folder under ``out``; returns the split sizes. Ids are 7-digit strings."""
    if min(train, dev, test) < 1:
        raise ValueError(f"make-movies: every split needs at least one movie, got train={train} dev={dev} test={test}")
    os.makedirs(os.path.join(out, "dataset"), exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    rng = random.Random(f"mango-movies-{seed}")
    next_id = 0
    for split, n in (("train", train), ("dev", dev), ("test", test)):
        for _ in range(n):
            movie_id = f"{next_id:07d}"
            next_id += 1
            meta, poster = make_movie(rng, heldout=split != "train")
            with open(os.path.join(out, "dataset", movie_id + ".json"), "w", encoding="utf-8") as f:
                json.dump(meta, f)
            Image.fromarray(poster).save(os.path.join(out, "dataset", movie_id + ".jpeg"), quality=95)
            splits[split].append(movie_id)
    with open(os.path.join(out, "split.json"), "w", encoding="utf-8") as f:
        json.dump(splits, f)
    return {k: len(v) for k, v in splits.items()}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.shard make-movies", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="raw/movies", help="folder to write the MM-IMDB layout into")
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--dev", type=int, default=128)
    p.add_argument("--test", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    sizes = write_movie_folder(a.out, a.train, a.dev, a.test, a.seed)
    print(
        f"wrote {a.out}: {sizes}; shard it with: python -m jobs.shard mmimdb --src {a.out} --out shards/movies "
        f"--image-size 32"
    )
    return 0
