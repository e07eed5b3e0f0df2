"""WorthBuying-mini: a synthetic e-commerce retrieval + QA data set, generated deterministically.

A small English stand-in for the paper's WorthBuying set, sized for a tiny model on a CPU:

- products in 10 categories, each with a brand, a model code (``"Zorvia AX-320"``), category
  specs, a price, a stock count, a colour, a warranty and what ships in the box;
- 3 or 4 documents per product: a spec sheet, a user review, a Q&A page and sometimes a
  long-term review;
- near-duplicate products: a family shares brand, series, colour, warranty and box contents,
  and its members differ in one spec (and in price), so their documents are natural hard
  negatives for each other;
- long-tail brands that make a single product (they appear in 3-4 documents only);
- questions whose short answers (a price, a spec value, a colour...) sit in one document;
- an update stream of price and stock changes to a product's spec sheet.

    paths = generate_worthbuying("data/wb", seed=0, size="quick")
    data = bsharedrag_fast.data.load_beir(paths.root, split="test")

Files (same seed and size -> byte-identical files):
    corpus.jsonl, queries.jsonl, qrels/{train,test}.tsv    BEIR format
    qa_train.jsonl, qa_test.jsonl   {"question", "answer", "doc_ids", "query_id"}
    domain.jsonl                    {"text"}: the corpus documents plus buying guides and notes
    general.jsonl                   {"text"}: everyday sentences, no product entities
    updates.jsonl                   {"doc_id", "title", "text", "metadata", "change",
                                     "question", "old_answer", "new_answer"}
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Union

from ..rag.data import write_jsonl

# per size: products per category, single-product (long-tail) brands per category,
# extra domain texts, general texts, updates
SIZES = {
    "full": dict(products=48, rare=5, domain_extra=1200, general=3000, updates=24),
    "quick": dict(products=12, rare=2, domain_extra=300, general=800, updates=8),
    "mini": dict(products=6, rare=1, domain_extra=150, general=400, updates=8),  # `demo --quick` on a 30-layer model
}
TEST_FRACTION = 1 / 6
LONGTERM_SHARE = 0.5  # products that also get a long-term review


def _r(lo: int, hi: int, step: int, fmt: str) -> list:
    return [fmt.format(v) for v in range(lo, hi + 1, step)]


# noun: how documents name the category (one: with its article, when not a/an + noun);
# price: (low, high) in dollars; specs: label -> values
CATEGORIES = {
    "headphones": dict(
        noun="headphones", one="a pair of headphones", price=(39, 399),
        specs={"battery life": _r(20, 60, 5, "{} hours"), "weight": _r(180, 320, 10, "{} g"),
               "driver size": ["30 mm", "32 mm", "40 mm", "45 mm", "50 mm"],
               "connection": ["bluetooth 5.0", "bluetooth 5.2", "bluetooth 5.3", "a usb-c cable"]},
        pros=["clear sound", "deep bass", "soft ear cushions", "quick pairing", "a light frame"],
        cons=["a short cable", "a tight headband", "a weak microphone", "slow charging", "a bulky case"],
        box=["a travel case", "a charging cable", "an audio cable", "a flight adapter"]),
    "laptops": dict(
        noun="laptop", price=(399, 2499),
        specs={"screen size": ["13 inch", "14 inch", "15 inch", "16 inch", "17 inch"],
               "memory": ["8 GB", "16 GB", "32 GB", "64 GB"], "storage": ["256 GB", "512 GB", "1 TB", "2 TB"],
               "battery life": _r(6, 20, 1, "{} hours")},
        pros=["a sharp screen", "a quiet fan", "a comfortable keyboard", "fast startup", "a solid hinge"],
        cons=["a dim screen", "a loud fan", "a small touchpad", "few ports", "a heavy charger"],
        box=["a power adapter", "a laptop sleeve", "a usb-c hub", "a cleaning cloth"]),
    "phones": dict(
        noun="phone", price=(149, 1299),
        specs={"screen size": ["5.8 inch", "6.1 inch", "6.4 inch", "6.7 inch"],
               "storage": ["64 GB", "128 GB", "256 GB", "512 GB"], "camera": _r(12, 108, 12, "{} MP"),
               "battery": _r(3000, 5500, 250, "{} mAh")},
        pros=["a bright screen", "sharp photos", "a long battery", "a slim body", "fast charging"],
        cons=["a slippery back", "a weak speaker", "slow updates", "a dim camera at night", "no headphone jack"],
        box=["a charging cable", "a clear case", "a sim tool", "a screen protector"]),
    "cameras": dict(
        noun="camera", price=(299, 2999),
        specs={"sensor": _r(16, 61, 3, "{} MP"), "zoom": ["3x", "5x", "10x", "20x", "30x"],
               "weight": _r(300, 900, 50, "{} g"), "video mode": ["1080p video", "4K video", "6K video", "8K video"]},
        pros=["sharp lenses", "fast autofocus", "a sturdy grip", "true colours", "a clear viewfinder"],
        cons=["a short battery", "a noisy shutter", "a confusing menu", "a small grip", "slow startup"],
        box=["a neck strap", "a lens cap", "a spare battery", "a camera bag"]),
    "blenders": dict(
        noun="blender", price=(29, 499),
        specs={"power": _r(300, 1500, 100, "{} W"), "jar size": ["1 L", "1.5 L", "1.8 L", "2 L"],
               "speed count": _r(2, 10, 1, "{} speeds"), "noise": _r(70, 95, 5, "{} dB")},
        pros=["smooth smoothies", "easy cleaning", "a strong motor", "a sturdy jar", "quiet running"],
        cons=["a loud motor", "a leaky lid", "a short cord", "dull blades", "a heavy base"],
        box=["a travel cup", "a tamper", "a recipe book", "a spare lid"]),
    "running shoes": dict(
        noun="running shoes", one="a pair of running shoes", price=(59, 249),
        specs={"weight": _r(180, 340, 10, "{} g"), "drop": ["0 mm", "4 mm", "6 mm", "8 mm", "10 mm", "12 mm"],
               "cushioning": ["soft cushioning", "medium cushioning", "firm cushioning"],
               "upper": ["a mesh upper", "a knit upper", "a leather upper"]},
        pros=["a soft ride", "a good grip", "a roomy toe box", "a light feel", "strong laces"],
        cons=["a narrow fit", "a stiff heel", "slippery soles", "thin padding", "short laces"],
        box=["spare laces", "a shoe bag", "extra insoles", "a size card"]),
    "backpacks": dict(
        noun="backpack", price=(29, 299),
        specs={"volume": _r(15, 45, 5, "{} L"), "weight": _r(500, 1500, 100, "{} g"),
               "material": ["nylon", "polyester", "canvas", "recycled fabric"],
               "laptop sleeve": ["13 inch sleeve", "15 inch sleeve", "17 inch sleeve"]},
        pros=["many pockets", "soft straps", "a waterproof shell", "a strong zipper", "a slim shape"],
        cons=["a stiff back panel", "thin straps", "a small bottle pocket", "a weak zipper", "a heavy frame"],
        box=["a rain cover", "a key clip", "a pouch", "a name tag"]),
    "coffee makers": dict(
        noun="coffee maker", price=(39, 899),
        specs={"capacity": _r(2, 12, 2, "{} cups"), "power": _r(800, 1600, 100, "{} W"),
               "pressure": ["9 bar", "12 bar", "15 bar", "19 bar", "20 bar"],
               "brew type": ["drip brewing", "espresso brewing", "pod brewing", "cold brewing"]},
        pros=["hot coffee", "a fast brew", "easy descaling", "a compact body", "a strong crema"],
        cons=["a loud pump", "a small water tank", "a drippy spout", "a slow warm up", "a flimsy carafe"],
        box=["a coffee scoop", "a milk jug", "a descaling kit", "a paper filter pack"]),
    "smart watches": dict(
        noun="smart watch", price=(49, 799),
        specs={"battery life": _r(1, 14, 1, "{} days"), "display": ["1.2 inch", "1.4 inch", "1.6 inch", "1.9 inch"],
               "water resistance": ["30 m", "50 m", "100 m"],
               "sensor": ["a heart rate sensor", "a blood oxygen sensor", "a temperature sensor"]},
        pros=["a bright display", "exact step counts", "a light strap", "quick sync", "a long battery"],
        cons=["a slow app", "a loose strap", "few watch faces", "a dim display", "a short battery"],
        box=["a charging dock", "a spare strap", "a charging cable", "a screen film"]),
    "vacuum cleaners": dict(
        noun="vacuum cleaner", price=(79, 999),
        specs={"suction": _r(8000, 26000, 2000, "{} Pa"), "runtime": _r(20, 90, 10, "{} minutes"),
               "bin size": ["0.4 L", "0.6 L", "0.8 L", "1 L"], "weight": ["1.5 kg", "2 kg", "2.5 kg", "3 kg"]},
        pros=["strong suction", "a light body", "easy emptying", "a long runtime", "quiet cleaning"],
        cons=["a small bin", "a loud motor", "a short runtime", "a clumsy brush", "a weak battery"],
        box=["a crevice tool", "a wall mount", "a pet brush", "a spare filter"]),
}

COMMON_BRANDS = ["Novatek", "Zorvia", "Kelvo", "Ambrix", "Lumora", "Quenta", "Taviro", "Brixel",
                 "Orvane", "Sylphon", "Dextra", "Halvorn"]
BRANDS_PER_CATEGORY = 5
_SYLLABLES = ["bra", "dun", "fel", "gor", "hix", "jal", "kip", "lor", "mex", "nib", "pol", "quor",
              "ras", "sov", "tem", "ulm", "vek", "wyn", "yar", "zet"]
_SERIES_LETTERS = "ABCDEFGHJKLMNPRSTVWXZ"
COLOURS = ["black", "white", "silver", "navy blue", "forest green", "dark red", "sand beige", "slate grey"]
WARRANTIES = ["1 year", "2 years", "3 years", "5 years"]
VERDICTS = ["it still works like new", "the battery lasts a little less than before", "the finish got scratched",
            "one button started to stick", "it became my daily favourite", "the cover started to peel",
            "it needed one repair under warranty", "it still looks and feels solid"]

# question type -> (document type that holds the answer, templates); {name} is the product
QUESTIONS = {
    "price": ("spec", ["What is the price of the {name}?", "How much does the {name} cost?",
                       "How much is the {name} {noun}?"]),
    "stock": ("spec", ["How many units of the {name} are in stock?", "How many {name} {noun} are left in stock?"]),
    "spec": ("spec", ["What is the {label} of the {name}?", "What {label} does the {name} have?",
                      "Tell me the {label} of the {name} {noun}."]),
    "pro": ("review", ["What does the review praise about the {name}?",
                       "What is the best thing about the {name} according to its review?"]),
    "con": ("review", ["What is the main complaint about the {name}?",
                       "What does the reviewer dislike about the {name}?"]),
    "rating": ("review", ["What rating did the reviewer give the {name}?",
                          "How many points out of 5 did the {name} get?"]),
    "warranty": ("qa", ["How long is the warranty on the {name}?", "What warranty comes with the {name}?"]),
    "box": ("qa", ["What comes in the box with the {name}?", "What accessory ships with the {name}?"]),
    "colour": ("qa", ["Which colour does the {name} come in?", "What colour is the {name}?"]),
    "longterm": ("longterm", ["How did the {name} hold up after months of use?",
                              "What happened to the {name} after long use?"]),
}

_GENERAL = dict(
    name=["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Lena", "Mark",
          "Nora", "Oscar", "Paula", "Sam"],
    place=["park", "market", "library", "school", "beach", "station", "garden", "museum", "river", "bakery"],
    day=["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    food=["bread", "apples", "soup", "rice", "cheese", "pasta", "oranges", "tea", "cake", "fish"],
    weather=["sunny", "rainy", "windy", "cold", "warm", "cloudy", "foggy"],
    season=["spring", "summer", "autumn", "winter"],
    animal=["dog", "cat", "horse", "rabbit", "bird", "duck", "goat", "fox"],
    verb=["read a book", "played football", "painted a picture", "cooked dinner", "wrote a letter",
          "planted flowers", "sang a song", "visited a friend", "went for a walk", "cleaned the house"],
    feeling=["happy", "tired", "calm", "excited", "hungry", "proud"],
)
_GENERAL_TEMPLATES = [
    "{name} went to the {place} on {day} to buy {food}.",
    "The weather was {weather} in {season}, so {name} stayed near the {place}.",
    "On {day} {name} {verb} and felt {feeling}.",
    "A small {animal} was sleeping next to the {place}.",
    "In {season} the children like to eat {food} after school.",
    "{name} and {name2} {verb} at the {place}.",
    "It was {weather} on {day}, and the {animal} ran across the field.",
    "After lunch {name} {verb}, then had some {food}.",
    "Every {season} the town holds a festival by the {place}.",
    "{name} told {name2} a story about a clever {animal}.",
]
_GUIDE_TEMPLATES = [
    "When you shop for {one}, compare the {label1} and the {label2} before the price.",
    "Many buyers of {one} care most about {pro}, and the most common complaint is {con}.",
    "A good {noun} in the middle of the market costs about ${price}.",
    "Reviews of {noun} products often mention {pro} as a reason to buy.",
]


@dataclass
class WorthBuyingPaths:
    """Paths of the files generate_worthbuying writes (root is the BEIR directory)."""
    root: str
    corpus: str
    queries: str
    qrels_train: str
    qrels_test: str
    qa_train: str
    qa_test: str
    domain: str
    general: str
    updates: str


def _paths(root: str) -> WorthBuyingPaths:
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    return WorthBuyingPaths(root, j("corpus.jsonl"), j("queries.jsonl"), j("qrels", "train.tsv"),
                            j("qrels", "test.tsv"), j("qa_train.jsonl"), j("qa_test.jsonl"), j("domain.jsonl"),
                            j("general.jsonl"), j("updates.jsonl"))


# -- catalogue --------------------------------------------------------------------------------


def _rare_brands(rng: random.Random, n: int) -> list:
    """n distinct invented brand names that are not common brands."""
    names: list = []
    while len(names) < n:
        name = (rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(["a", "o", "is", "ex", "on"])).capitalize()
        if name not in names and name not in COMMON_BRANDS:
            names.append(name)
    return names


def _catalogue(rng: random.Random, cfg: dict) -> list:
    """Products as dicts, grouped in families of near-duplicates; ids are p0001, p0002, ..."""
    rare = _rare_brands(rng, cfg["rare"] * len(CATEGORIES))
    products: list = []
    used_series: dict = {}
    used_models: list = []  # model codes are unique across brands: a code alone names one product
    for c_i, (cat, spec) in enumerate(CATEGORIES.items()):
        brands = rng.sample(COMMON_BRANDS, BRANDS_PER_CATEGORY)
        weights = [1.0 / (r + 1) for r in range(len(brands))]  # Zipf-like: a few big brands
        cat_rare = rare[c_i * cfg["rare"]:(c_i + 1) * cfg["rare"]]
        count = 0
        while count < cfg["products"]:
            if cat_rare and rng.random() < 0.3:
                brand, size = cat_rare.pop(), 1
            else:
                brand, size = rng.choices(brands, weights)[0], rng.choice([1, 2, 2, 3])
            size = min(size, cfg["products"] - count)
            series = _new_series(rng, used_series.setdefault(brand, []))
            labels = list(spec["specs"])
            base = {label: rng.choice(spec["specs"][label]) for label in labels}
            vary = rng.choice(labels)  # the one spec the family's members differ in
            values = rng.sample(spec["specs"][vary], size)
            numbers = _new_numbers(rng, series, size, used_models)
            lo, hi = spec["price"]
            prices = sorted(rng.sample(range(lo, hi + 1, 10), size))
            family = dict(brand=brand, series=series, category=cat, colour=rng.choice(COLOURS),
                          warranty=rng.choice(WARRANTIES), box=rng.choice(spec["box"]),
                          family=f"f{len(used_series[brand]):02d}-{brand.lower()}-{series.lower()}")
            for k in range(size):
                products.append(dict(
                    family, product_id=f"p{len(products) + 1:04d}", model=f"{series}-{numbers[k]}",
                    specs=dict(base, **{vary: values[k]}), price=prices[k], stock=rng.randint(0, 60),
                    pro=rng.choice(spec["pros"]), con=rng.choice(spec["cons"]), rating=rng.randint(2, 5),
                    weeks=rng.randint(2, 12), months=rng.randint(3, 18),
                    verdict=rng.choice(VERDICTS) if rng.random() < LONGTERM_SHARE else None))
            count += size
    return products


def _new_numbers(rng: random.Random, series: str, size: int, taken: list) -> list:
    while True:
        numbers = sorted(rng.sample(range(100, 1000, 10), size))
        if not any(f"{series}-{n}" in taken for n in numbers):
            taken.extend(f"{series}-{n}" for n in numbers)
            return numbers


def _new_series(rng: random.Random, taken: list) -> str:
    while True:
        s = rng.choice(_SERIES_LETTERS) + rng.choice(_SERIES_LETTERS)
        if s not in taken:
            taken.append(s)
            return s


# -- documents --------------------------------------------------------------------------------


def _one(category: str) -> str:
    spec = CATEGORIES[category]
    return spec.get("one") or ("an " if spec["noun"][0] in "aeiou" else "a ") + spec["noun"]


def _name(p: dict) -> str:
    return f"{p['brand']} {p['model']}"


def _spec_text(p: dict) -> str:
    # the labels are worded as the questions word them ("the battery life is ...")
    specs = " ".join(f"The {label} is {value}." for label, value in p["specs"].items())
    return (f"The {_name(p)} is {_one(p['category'])} from the {p['brand']} {p['series']} series. "
            f"The price is ${p['price']}. {specs} There are {p['stock']} units in stock.")


def _documents(p: dict) -> list:
    """(doc type, doc id, title, text) of a product's documents."""
    name, pid = _name(p), p["product_id"]
    docs = [
        ("spec", f"{pid}-spec", f"{name} {CATEGORIES[p['category']]['noun']} specifications", _spec_text(p)),
        ("review", f"{pid}-review", f"{name} review",
         f"I bought the {name} {p['weeks']} weeks ago and use it every day. The best thing about it is {p['pro']}. "
         f"The main problem is {p['con']}. Overall I give it {p['rating']} out of 5."),
        ("qa", f"{pid}-qa", f"Questions about the {name}",
         f"Q: How long is the warranty? A: The {name} comes with {p['warranty']} of warranty. "
         f"Q: What is in the box? A: It ships with {p['box']}. "
         f"Q: Which colours are there? A: It comes in {p['colour']}."),
    ]
    if p["verdict"]:
        docs.append(("longterm", f"{pid}-longterm", f"{name} after {p['months']} months",
                     f"After {p['months']} months with the {name}, {p['verdict']}. "
                     f"I use it about {p['weeks']} hours a week."))
    return docs


def _metadata(p: dict, doc_type: str) -> dict:
    return dict(category=p["category"], product_id=p["product_id"], brand=p["brand"], series=p["series"],
                model=p["model"], family=p["family"], doc_type=doc_type, price=p["price"], stock=p["stock"],
                specs=dict(p["specs"]))


def _answer(p: dict, qtype: str, label: str = "") -> str:
    return {"price": f"${p['price']}", "stock": f"{p['stock']} units", "spec": p["specs"].get(label, ""),
            "pro": p["pro"], "con": p["con"], "rating": f"{p['rating']} out of 5", "warranty": p["warranty"],
            "box": p["box"], "colour": p["colour"], "longterm": p["verdict"]}[qtype]


def _question(rng: random.Random, p: dict, qtype: str, label: str = "", template: int = -1) -> str:
    templates = QUESTIONS[qtype][1]
    t = templates[template] if template >= 0 else rng.choice(templates)
    # most questions name brand + model; some only the model code, as shoppers do
    name = _name(p) if template >= 0 or rng.random() < 0.8 else p["model"]
    return t.format(name=name, noun=CATEGORIES[p["category"]]["noun"], label=label)


def _questions(rng: random.Random, products: list, doc_ids: dict) -> list:
    """QA records (without query ids), 2-3 per product, each answered by one document."""
    out = []
    for p in products:
        types = [t for t in QUESTIONS if t != "longterm" or p["verdict"]]
        for qtype in rng.sample(types, rng.choice([2, 3, 3])):
            label = rng.choice(list(p["specs"])) if qtype == "spec" else ""
            doc_type = QUESTIONS[qtype][0]
            out.append({"question": _question(rng, p, qtype, label), "answer": _answer(p, qtype, label),
                        "doc_ids": [doc_ids[(p["product_id"], doc_type)]]})
    return out


def _fill(rng: random.Random, template: str, pools: dict) -> str:
    keys = [k for k in pools if "{" + k + "}" in template]
    values = {k: rng.choice(pools[k]) for k in keys}
    if "{name2}" in template:
        values["name2"] = rng.choice([n for n in pools["name"] if n != values["name"]])
    return template.format(**values)


def _general_texts(rng: random.Random, n: int) -> list:
    """Everyday sentences (no products, brands or model codes): the general pre-training text."""
    return [" ".join(_fill(rng, rng.choice(_GENERAL_TEMPLATES), _GENERAL) for _ in range(rng.randint(2, 4)))
            for _ in range(n)]


def _domain_extra(rng: random.Random, products: list, n: int) -> list:
    """Buying guides and shopper notes consistent with the catalogue (the same facts, new wording)."""
    out = []
    for _ in range(n):
        p = rng.choice(products)
        spec = CATEGORIES[p["category"]]
        if rng.random() < 0.3:
            label1, label2 = rng.sample(list(spec["specs"]), 2)
            lo, hi = spec["price"]
            out.append(rng.choice(_GUIDE_TEMPLATES).format(
                noun=spec["noun"], one=_one(p["category"]), label1=label1, label2=label2, pro=rng.choice(spec["pros"]),
                con=rng.choice(spec["cons"]), price=(lo + hi) // 20 * 10 - 1))
            continue
        label = rng.choice(list(p["specs"]))
        out.append(rng.choice([
            f"A shopper found the {_name(p)} for ${p['price']} and liked {p['pro']}.",
            f"The {p['brand']} {p['series']} series includes the {p['model']}, {_one(p['category'])} with "
            f"{label} {p['specs'][label]}.",
            f"Owners of the {_name(p)} say its {label} is {p['specs'][label]} and mention {p['con']}.",
            f"The {_name(p)} comes in {p['colour']} and ships with {p['box']}.",
        ]))
    return out


def _updates(rng: random.Random, products: list, n: int) -> list:
    """Price or stock changes to n distinct products' spec sheets, with the question they change."""
    out = []
    for i, p in enumerate(rng.sample(products, n)):
        change = "price" if i % 2 == 0 else "stock"
        new = dict(p)
        if change == "price":
            lo, hi = CATEGORIES[p["category"]]["price"]
            new["price"] = rng.choice([v for v in range(lo, hi + 1, 10) if v != p["price"]])
        else:
            new["stock"] = rng.choice([v for v in range(0, 61) if v != p["stock"]])
        _, doc_id, title, text = _documents(new)[0]
        out.append({"doc_id": doc_id, "title": title, "text": text, "metadata": _metadata(new, "spec"),
                    "change": change, "question": _question(rng, p, change, template=0),
                    "old_answer": _answer(p, change), "new_answer": _answer(new, change)})
    return out


# -- writing ----------------------------------------------------------------------------------


def _write_qrels(path: str, records: list) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for rec in records:
            for doc_id in rec["doc_ids"]:
                f.write(f"{rec['query_id']}\t{doc_id}\t1\n")


def generate_worthbuying(out_dir: Union[str, os.PathLike], seed: int = 0, size: str = "full") -> WorthBuyingPaths:
    """Write WorthBuying-mini to out_dir (created if needed; files there are overwritten).
    size "full": 480 products, ~1700 documents, ~1000 train + ~200 test questions;
    "quick": about a quarter of that. The same seed and size give byte-identical files."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    cfg = SIZES[size]
    rng = random.Random(seed)
    products = _catalogue(rng, cfg)

    corpus, doc_ids = [], {}
    for p in products:
        for doc_type, doc_id, title, text in _documents(p):
            doc_ids[(p["product_id"], doc_type)] = doc_id
            corpus.append({"_id": doc_id, "title": title, "text": text, "metadata": _metadata(p, doc_type)})

    qa = _questions(rng, products, doc_ids)
    rng.shuffle(qa)
    for i, rec in enumerate(qa):
        rec["query_id"] = f"q{i + 1:05d}"
    n_test = round(len(qa) * TEST_FRACTION)
    qa_test, qa_train = qa[:n_test], qa[n_test:]

    domain = [{"text": f"{d['title']}. {d['text']}"} for d in corpus]
    domain += [{"text": t} for t in _domain_extra(rng, products, cfg["domain_extra"])]
    rng.shuffle(domain)
    general = [{"text": t} for t in _general_texts(rng, cfg["general"])]
    updates = _updates(rng, products, cfg["updates"])

    paths = _paths(os.fspath(out_dir))
    os.makedirs(os.path.dirname(paths.qrels_train), exist_ok=True)
    write_jsonl(paths.corpus, corpus)
    write_jsonl(paths.queries, [{"_id": r["query_id"], "text": r["question"]} for r in qa])
    _write_qrels(paths.qrels_train, qa_train)
    _write_qrels(paths.qrels_test, qa_test)
    write_jsonl(paths.qa_train, qa_train)
    write_jsonl(paths.qa_test, qa_test)
    write_jsonl(paths.domain, domain)
    write_jsonl(paths.general, general)
    write_jsonl(paths.updates, updates)
    return paths
