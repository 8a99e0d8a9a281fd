"""Words for the demo world: caption synonyms, caption word orders, concept phrases.

Captions vary the wording (synonyms), the word order (five sentence forms, shuffled
adjectives) and how much they say (attributes are dropped at random, as in web
captions), so a text tower trained on them learns the concept words themselves rather
than one template. Short captions such as "a red object" or "snow background" come
out of the same generator, so the single-concept phrases used as text concepts are
in the training distribution.
"""

from __future__ import annotations

import numpy as np

# Every renderable value's caption words; the first is the canonical one.
WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "block", "box"),
    "triangle": ("triangle", "three-sided shape", "wedge"),
    "star": ("star", "five-pointed star", "starfish shape"),
    "hexagon": ("hexagon", "six-sided shape"),
    "cross": ("cross", "plus sign"),
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "cobalt", "navy"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet"),
    "orange": ("orange", "tangerine"),
    "white": ("white", "ivory"),
    "black": ("black", "jet"),
    "plain": ("plain", "solid", "unpatterned"),
    "striped": ("striped", "stripy", "banded"),
    "dotted": ("dotted", "spotted", "polka-dot"),
    "checkered": ("checkered", "chequered", "checked"),
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}

# How a caption says where the object lies.
PLACES: dict[str, tuple[str, ...]] = {
    "water": ("on water", "in the water", "floating on a lake", "on the sea", "with a water background"),
    "grass": ("on grass", "on a lawn", "in a meadow", "in the grass", "with a grass background"),
    "sand": ("on sand", "on a beach", "in the desert", "on the sand", "with a sand background"),
    "snow": ("on snow", "in the snow", "on a snowfield", "on white snow", "with a snow background"),
    "rock": ("on rock", "on stone", "on a rocky ground", "with a rock background"),
}

NOUNS = ("object", "shape", "thing")


def concept_phrases(group: str, value: str) -> list[str]:
    """Text phrases for one concept, canonical first (used as text concepts and in the dense loss)."""
    words = WORDS.get(value, (value,))
    if group == "shape":
        return [f"a {w}" for w in words[:2]]
    if group == "background":
        return [f"{value} background", PLACES[value][0], f"a photo {PLACES[value][1]}"]
    return [f"a {words[0]} object", f"a {words[1] if len(words) > 1 else words[0]} thing"]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def make_caption(values: dict[str, str], rng: np.random.Generator, drop: float = 0.3) -> tuple[str, dict[str, bool]]:
    """One caption for an image with the given ``{group: value}``; returns it and which groups it mentions.

    Each group is left out with probability ``drop`` (at least one is always kept), and
    a synonym and one of five word orders are drawn from ``rng``.
    """
    groups = list(values)
    mentioned = {g: bool(rng.random() >= drop) for g in groups}
    if not any(mentioned.values()):
        mentioned[groups[int(rng.integers(len(groups)))]] = True

    def word(group: str) -> str:
        options = WORDS.get(values[group], (values[group],))
        return options[int(rng.integers(len(options)))]

    adjs = [word(g) for g in ("size", "color", "pattern") if g in values and mentioned[g]]
    if rng.random() < 0.4:
        adjs = [adjs[i] for i in rng.permutation(len(adjs))]
    noun = word("shape") if mentioned.get("shape") else NOUNS[int(rng.integers(len(NOUNS)))]
    place = ""
    if mentioned.get("background"):
        options = PLACES[values["background"]]
        place = options[int(rng.integers(len(options)))]
    only_place = place and not adjs and not mentioned.get("shape")

    form = int(rng.integers(5))
    if only_place:
        caption = [f"{values['background']} background", f"a scene {place}", f"a photo {place}"][form % 3]
    elif form == 0:  # adjective stack
        phrase = " ".join(adjs + [noun])
        caption = f"{_article(phrase)} {phrase} {place}".strip()
    elif form == 1 and adjs:  # relative clause
        caption = f"{_article(noun)} {noun} that is {_join(adjs)} {place}".strip()
    elif form == 2 and place:  # place first
        phrase = " ".join(adjs + [noun])
        caption = f"{place}, {_article(phrase)} {phrase}"
    elif form == 3:  # tag list in random order
        tags = adjs + ([word("shape")] if mentioned.get("shape") else [])
        if place:
            tags.append(f"{values['background']} background")
        caption = ", ".join(tags[i] for i in rng.permutation(len(tags)))
    else:  # photo framing
        phrase = " ".join(adjs + [noun])
        caption = f"a photo of {_article(phrase)} {phrase} {place}".strip()
    return caption, mentioned
