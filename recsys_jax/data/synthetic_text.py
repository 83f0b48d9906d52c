"""Word lists and templates for the synthetic catalogue (see synthetic.py).

The named taxonomy below gives 6 top categories with 8 leaf sub-categories
each, listed in the order of the shopping routine the generator's Markov chain
follows (cleanser -> toner -> serum -> moisturizer -> ...). Larger catalogues
get extra categories with made-up names and words, so any size works.
"""

import random
import re
from typing import Dict, List, Sequence, Tuple

# top category -> (words shared by its items, [(mid, leaf, head noun, words)]).
# Leaves are in routine order: leaf k is usually followed by leaf k + 1.
TAXONOMY: List[Tuple[str, List[str], List[Tuple[str, str, str, List[str]]]]] = [
    ("Beauty", ["gentle", "radiant", "botanical", "nourishing", "skin"], [
        ("Skin Care", "Cleansers", "Cleanser",
         ["foaming", "micellar", "purifying", "gel", "clarifying", "salicylic",
          "pore", "wash"]),
        ("Skin Care", "Toners", "Toner",
         ["witch", "hazel", "astringent", "balancing", "rosewater",
          "exfoliating", "essence", "mist"]),
        ("Skin Care", "Serums", "Serum",
         ["vitamin", "retinol", "niacinamide", "peptide", "brightening",
          "concentrate", "ampoule", "antioxidant"]),
        ("Skin Care", "Moisturizers", "Moisturizer",
         ["hydrating", "ceramide", "hyaluronic", "whipped", "cream",
          "overnight", "barrier", "lotion"]),
        ("Skin Care", "Sunscreens", "Sunscreen",
         ["SPF", "mineral", "zinc", "broad", "spectrum", "UV", "sheer",
          "sunblock"]),
        ("Makeup", "Foundations", "Foundation",
         ["liquid", "coverage", "matte", "buildable", "shade", "longwear",
          "poreless", "flawless"]),
        ("Makeup", "Mascaras", "Mascara",
         ["lash", "volumizing", "lengthening", "waterproof", "curling", "wand",
          "fiber", "smudgeproof"]),
        ("Makeup", "Lipsticks", "Lipstick",
         ["lip", "satin", "velvet", "tint", "creamy", "bold", "nude",
          "gloss"]),
    ]),
    ("Office Products", ["office", "professional", "school", "work",
                         "assorted"], [
        ("Paper", "Notebooks", "Notebook",
         ["spiral", "ruled", "college", "journal", "composition", "dotted",
          "hardcover", "pages"]),
        ("Writing", "Pens", "Pen",
         ["ballpoint", "rollerball", "ink", "retractable", "fine", "point",
          "smooth", "refill"]),
        ("Writing", "Highlighters", "Highlighter",
         ["fluorescent", "chisel", "tip", "pastel", "highlight", "smear",
          "marking", "neon"]),
        ("Paper", "Sticky Notes", "Sticky Notes",
         ["sticky", "adhesive", "pads", "repositionable", "memo", "flags",
          "cube", "lined"]),
        ("Writing", "Markers", "Marker",
         ["permanent", "dry", "erase", "whiteboard", "felt", "washable",
          "bullet", "jumbo"]),
        ("Paper", "Printer Paper", "Printer Paper",
         ["copy", "printer", "multipurpose", "letter", "ream", "sheets",
          "bright", "laser"]),
        ("Desk Accessories", "Staplers", "Stapler",
         ["staples", "heavy", "duty", "jam", "spring", "stapling", "capacity",
          "desktop"]),
        ("Desk Accessories", "Desk Organizers", "Desk Organizer",
         ["mesh", "drawer", "tray", "caddy", "file", "sorter", "holder",
          "compartment"]),
    ]),
    ("Kitchen", ["kitchen", "home", "cooking", "durable", "dishwasher"], [
        ("Cutlery", "Knives", "Knife",
         ["chef", "santoku", "paring", "blade", "stainless", "forged",
          "serrated", "sharpening"]),
        ("Cutlery", "Cutting Boards", "Cutting Board",
         ["bamboo", "wood", "chopping", "board", "reversible", "groove",
          "butcher", "block"]),
        ("Cookware", "Frying Pans", "Frying Pan",
         ["skillet", "nonstick", "cast", "iron", "fry", "saute", "induction",
          "ceramic"]),
        ("Utensils", "Spatulas", "Spatula",
         ["silicone", "turner", "flipper", "heat", "resistant", "slotted",
          "flexible", "utensil"]),
        ("Cookware", "Saucepans", "Saucepan",
         ["sauce", "pot", "lid", "triply", "simmer", "copper", "pour",
          "quart"]),
        ("Bakeware", "Baking Sheets", "Baking Sheet",
         ["cookie", "sheet", "pan", "rimmed", "aluminum", "half", "bake",
          "jellyroll"]),
        ("Storage", "Food Containers", "Food Container",
         ["airtight", "meal", "prep", "leakproof", "glass", "lids", "bento",
          "storage"]),
        ("Storage", "Spice Jars", "Spice Jar",
         ["spice", "jars", "shaker", "labels", "rack", "seasoning", "herb",
          "funnel"]),
    ]),
    ("Sports & Outdoors", ["outdoor", "sport", "lightweight", "portable",
                           "adventure"], [
        ("Camping", "Tents", "Tent",
         ["dome", "backpacking", "rainfly", "person", "popup", "poles",
          "shelter", "vestibule"]),
        ("Camping", "Sleeping Bags", "Sleeping Bag",
         ["mummy", "down", "insulated", "zipper", "degree", "compressible",
          "warm", "hood"]),
        ("Camping", "Camp Stoves", "Camp Stove",
         ["burner", "propane", "butane", "fuel", "ignition", "windscreen",
          "cooker", "flame"]),
        ("Camping", "Headlamps", "Headlamp",
         ["lumens", "LED", "rechargeable", "beam", "headband", "headlight",
          "red", "dimmable"]),
        ("Fitness", "Water Bottles", "Water Bottle",
         ["vacuum", "BPA", "straw", "flip", "sip", "ounce", "leak",
          "hydration"]),
        ("Fitness", "Yoga Mats", "Yoga Mat",
         ["yoga", "mat", "nonslip", "thick", "cushion", "pilates",
          "alignment", "eco"]),
        ("Fitness", "Resistance Bands", "Resistance Band",
         ["resistance", "loop", "band", "stretch", "latex", "strength",
          "workout", "tension"]),
        ("Fitness", "Dumbbells", "Dumbbell",
         ["dumbbell", "weight", "adjustable", "hex", "rubber", "neoprene",
          "pair", "pound"]),
    ]),
    ("Electronics", ["digital", "compatible", "tech", "smart", "universal"], [
        ("Computer Accessories", "Laptop Sleeves", "Laptop Sleeve",
         ["laptop", "sleeve", "case", "padded", "inch", "notebook",
          "shockproof", "carrying"]),
        ("Computer Accessories", "Keyboards", "Keyboard",
         ["mechanical", "keys", "backlit", "switches", "typing", "keycaps",
          "ergonomic", "numeric"]),
        ("Computer Accessories", "Mice", "Mouse",
         ["optical", "DPI", "scroll", "wheel", "click", "gaming", "cursor",
          "receiver"]),
        ("Computer Accessories", "USB Hubs", "USB Hub",
         ["hub", "port", "USB", "adapter", "dongle", "HDMI", "thunderbolt",
          "splitter"]),
        ("Power", "Cables", "Cable",
         ["braided", "cord", "lightning", "sync", "feet", "tangle",
          "connector", "USBC"]),
        ("Power", "Chargers", "Charger",
         ["fast", "charging", "watt", "wall", "plug", "GaN", "dual",
          "power"]),
        ("Audio", "Headphones", "Headphones",
         ["over", "ear", "noise", "cancelling", "bluetooth", "bass",
          "earcups", "foldable"]),
        ("Audio", "Speakers", "Speaker",
         ["boombox", "stereo", "subwoofer", "loud", "party", "sound",
          "surround", "waterproof"]),
    ]),
    ("Pet Supplies", ["pet", "natural", "healthy", "vet", "happy"], [
        ("Dogs", "Dog Food", "Dog Food",
         ["kibble", "dog", "grain", "chicken", "recipe", "protein", "adult",
          "puppy"]),
        ("Dogs", "Dog Treats", "Dog Treat",
         ["chew", "treats", "jerky", "dental", "biscuits", "training", "bites",
          "rawhide"]),
        ("Dogs", "Dog Leashes", "Dog Leash",
         ["leash", "collar", "harness", "reflective", "nylon", "lead", "clip",
          "walking"]),
        ("Dogs", "Dog Beds", "Dog Bed",
         ["orthopedic", "bed", "bolster", "plush", "memory", "foam", "calming",
          "crate"]),
        ("Cats", "Cat Food", "Cat Food",
         ["cat", "salmon", "tuna", "pate", "wet", "kitten", "indoor",
          "formula"]),
        ("Cats", "Cat Litter", "Cat Litter",
         ["litter", "clumping", "unscented", "odor", "clay", "dust", "scoop",
          "box"]),
        ("Cats", "Cat Toys", "Cat Toy",
         ["catnip", "teaser", "feather", "interactive", "ball", "laser",
          "crinkle", "wand"]),
        ("Cats", "Scratching Posts", "Scratching Post",
         ["scratching", "sisal", "post", "tower", "condo", "perch", "climbing",
          "scratcher"]),
    ]),
]

# Shared by every item: they carry no category signal.
FILLER_WORDS = ["premium", "classic", "essential", "original", "deluxe",
                "everyday", "value", "new", "pro", "plus", "ultra", "select"]
VARIANTS = ["Pack of 2", "Pack of 3", "Set of 4", "Large", "Small",
            "Travel Size", "Family Size", "Mini", "Twin Pack", "Value Pack",
            "Single", "Bundle"]

CRITIQUE_TEMPLATES = [
    "something in {leaf} instead",
    "show me {leaf} instead",
    "I'd rather look at {leaf} now",
    "can you suggest some {leaf} instead?",
]

_ONSETS = ["b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v",
           "z", "br", "cl", "dr", "fl", "gr", "pr", "st", "tr", "qu", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "x", "m", "nd", "rt", "ll"]


def pseudo_word(rng: random.Random, syllables: int) -> str:
  """A pronounceable made-up word (lower case)."""
  return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                 for _ in range(syllables))


def _readable(word: str) -> bool:
  return 4 <= len(word) <= 10 and not re.search(r"(.)\1\1", word)


def unique_pseudo_words(rng: random.Random, n: int, syllables: Sequence[int],
                        taken: set) -> List[str]:
  """n made-up words, none in `taken` (which is updated)."""
  out = []
  while len(out) < n:
    w = pseudo_word(rng, rng.choice(list(syllables)))
    if _readable(w) and w not in taken:
      taken.add(w)
      out.append(w)
  return out


def build_taxonomy(num_top: int, leaves_per_top: Sequence[int],
                   rng: random.Random) -> List[Dict]:
  """Top categories with their leaves, named ones first, made-up ones after.

  Args:
    num_top: number of top categories.
    leaves_per_top: number of leaf sub-categories of each top category.
    rng: draws the made-up names and words.

  Returns:
    One dict per top category: name, words, leaves (list of dicts with mid,
    name, head, words), in routine (chain) order.
  """
  taken = {w.lower() for _, words, leaves in TAXONOMY for w in words}
  taken |= {w.lower() for _, _, leaves in TAXONOMY for l in leaves
            for w in l[3]}
  tops = []
  for t in range(num_top):
    if t < len(TAXONOMY):
      name, words, named = TAXONOMY[t]
      words = list(words)
    else:
      name = unique_pseudo_words(rng, 1, (2, 3), taken)[0].title() + " Goods"
      words, named = unique_pseudo_words(rng, 5, (2,), taken), []
    leaves = [dict(mid=m, name=n, head=h, words=list(w))
              for m, n, h, w in named[:leaves_per_top[t]]]
    while len(leaves) < leaves_per_top[t]:
      head = unique_pseudo_words(rng, 1, (2, 3), taken)[0].title()
      leaves.append(dict(mid=f"More {name}", name=head + "s", head=head,
                         words=unique_pseudo_words(rng, 8, (1, 2, 3), taken)))
    tops.append(dict(name=name, words=words, leaves=leaves))
  return tops


def brand_names(n: int, rng: random.Random) -> List[str]:
  """n distinct made-up brand names."""
  taken, out = set(), []
  while len(out) < n:
    w = pseudo_word(rng, rng.choice((2, 2, 3)))
    suffix = rng.choice(["", "", "", " Labs", " & Co", " Studio", " Works"])
    name = w.title() + suffix
    if _readable(w) and w not in taken:
      taken.add(w)
      out.append(name)
  return out


def _article(word: str) -> str:
  return "an" if word[:1].lower() in "aeiou" else "a"


def item_title_and_description(rng: random.Random, top: Dict, leaf: Dict,
                               brand: str) -> Tuple[str, str]:
  """Title and description drawn from the leaf's, top's and shared words."""
  head_words = set(leaf["head"].lower().split())
  # Words repeating the head noun would only stutter ("Hub USB Hub").
  w = rng.sample([x for x in leaf["words"] if x.lower() not in head_words], 4)
  parts = [brand]
  if rng.random() < 0.5:
    parts.append(rng.choice(FILLER_WORDS).title())
  if rng.random() < 0.4:
    parts.append(rng.choice(top["words"]).title())
  parts += [w[0].capitalize(), w[1].capitalize(), leaf["head"]]
  title = " ".join(parts) + ", " + rng.choice(VARIANTS)
  filler = rng.sample(FILLER_WORDS, 2)
  top_word = rng.choice(top["words"])
  description = (
      f"{_article(filler[0]).title()} {filler[0]} {leaf['head'].lower()} "
      f"from {brand} with {w[2]} and "
      f"{w[3]} features. Made for {top_word} {top['name'].lower()} use, "
      f"{filler[1]} quality.")
  return title, description


def display_name(name: str) -> str:
  """Category name as used inside a sentence: "Dog Food" -> "dog food"."""
  return " ".join(w if w.isupper() else w.lower() for w in name.split())


def _and_join(words: Sequence[str]) -> str:
  words = list(words)
  if len(words) <= 1:
    return "".join(words)
  return ", ".join(words[:-1]) + " and " + words[-1]


def critique(rng: random.Random, leaf_name: str) -> str:
  """A steering request towards `leaf_name`, as shown before the purchase."""
  return rng.choice(CRITIQUE_TEMPLATES).format(leaf=display_name(leaf_name))


def user_summary(top_leaves: Sequence[str], top_tops: Sequence[str],
                 top_brands: Sequence[str]) -> str:
  """Summary of a user's true tastes (favourite categories first)."""
  leaves = _and_join([display_name(l) for l in top_leaves])
  tops = _and_join([display_name(t) for t in dict.fromkeys(top_tops)])
  return (f"This shopper mostly buys {leaves} ({tops}) and tends to choose "
          f"{_and_join(top_brands)}.")


# Why the last item was bought, one sentence per generative cause.
REASONS = {
    "routine": "After the {prev_head} they bought before, {leaf} are the usual "
               "next step.",
    "complement": "{Leaf} go well with the {prev_head} they bought before.",
    "same": "They were still shopping for {leaf} after their previous "
            "{prev_head}.",
    "preference": "{Leaf} are one of their favourite categories.",
    "browse": "They were browsing {leaf} and this is a popular pick there.",
}


def purchase_reason(cause: str, leaf_name: str, prev_head: str, brand: str,
                    loyal: bool) -> str:
  """Explains the last purchase from its true cause and brand loyalty."""
  leaf = display_name(leaf_name)
  text = REASONS[cause].format(leaf=leaf, Leaf=leaf[:1].upper() + leaf[1:],
                               prev_head=display_name(prev_head))
  if loyal:
    text += f" They are loyal to {brand}."
  return text


def endorsement(title: str, leaf_name: str, brand: str) -> str:
  """A short recommendation sentence quoting the item's title."""
  core = title.split(", ")[0]
  return (f"Recommended: the {core}, a {brand} favourite among "
          f"{display_name(leaf_name)}.")
