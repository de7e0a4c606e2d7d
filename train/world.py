"""A small synthetic world: the embedded offline default of `python -m train.squad`.

A fresh machine cannot reach the Hugging Face hub, so the project ships its own task: short
biographies of invented people (home city, job, employer, birth year, pet, colour, friend,
instrument) with SQuAD v1.1 questions whose answers are spans of the context, plus a plain-text
"encyclopedia" corpus about the same kind of world for pretraining a tiny GPT-2 (see
`train/pretrain_world.py`). Everything is generated from one seed with `random.Random`, so the
same config gives the same bytes.

Entity names are built from syllables and split into disjoint pools: the validation people,
cities, companies and pets never occur in the training questions, the pretraining corpus or the
tokenizer's training text, so validation EM measures reading the context, not memory. The corpus
restates facts later in the same passage (summaries, fact boxes, lists of residents), which
teaches the pretrained model to copy spans seen earlier: the skill LoRA then points at questions.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ASSETS_DIR = Path(__file__).parent / "assets"
WORLD_DATA_DIR = ASSETS_DIR / "world"  # train.json, validation.json (SQuAD v1.1)
WORLD_V2_DIR = ASSETS_DIR / "world_v2"  # the same plus one unanswerable question per context (SQuAD v2.0)
WORLD_MODEL_DIR = ASSETS_DIR / "world_model"  # tokenizer (+ model.safetensors, config.json)
EOS = "<|endoftext|>"

JOBS = ("baker", "carpenter", "nurse", "pilot", "teacher", "farmer", "painter", "lawyer", "chemist",
        "tailor", "plumber", "librarian", "dentist", "engineer", "fisherman", "architect", "butcher",
        "gardener", "jeweller", "mechanic", "potter", "sailor", "surgeon", "weaver", "translator",
        "photographer", "blacksmith", "cook", "miner", "banker")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink",
           "brown", "silver", "gold", "turquoise", "violet", "crimson")
SPECIES = ("cat", "dog", "parrot", "rabbit", "hamster", "tortoise", "goat", "horse", "ferret", "owl",
           "goldfish", "lizard", "pony", "duck")
INSTRUMENTS = ("piano", "violin", "flute", "guitar", "cello", "trumpet", "drums", "harp", "clarinet",
               "accordion", "banjo", "oboe", "saxophone", "harmonica")
COMPANY_KINDS = ("Mills", "Works", "Labs", "Foods", "Shipping", "Motors", "Textiles", "Press",
                 "Bank", "Brewery", "Logistics", "Studios", "Systems", "Pharmacy", "Bakeries")
CITY_ENDINGS = ("", "", "ton", "ford", "burg", "holm", "wick", "port", "stad", "field", "mouth", "vale")

_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "dr", "fl", "gr", "kl", "pr", "st", "tr", "sh", "th", "ch", "sk")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk", "x", "sh", "lt")


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the generated world. Defaults give ~3000 train and ~200 validation questions."""

    seed: int = 20240604
    train_contexts: int = 1000
    validation_contexts: int = 70
    questions_per_context: int = 3
    corpus_documents: int = 12000
    vocab_size: int = 3000


@dataclass(frozen=True)
class Pools:
    """Proper names of one split; pools of different splits are disjoint."""

    first: tuple[str, ...]
    last: tuple[str, ...]
    cities: tuple[str, ...]
    companies: tuple[str, ...]
    pets: tuple[str, ...]


@dataclass(frozen=True)
class Person:
    """An invented person and their facts (every field is a string as it appears in text)."""

    first: str
    last: str
    city: str
    job: str
    company: str
    year: str
    species: str
    pet: str
    colour: str
    instrument: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


# ----------------------------------------------------------------------------- entities


def _syllable_word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (word + rng.choice(_CODAS)).capitalize()


def make_pools(rng: random.Random, sizes: dict[str, dict[str, int]]) -> dict[str, Pools]:
    """Disjoint name pools per split: no string is ever reused across pools or splits.

    Args:
        rng: the world's random source.
        sizes: split -> {"first", "last", "cities", "companies", "pets"} -> count.
    """
    used: set[str] = set()  # membership only: iterating a set of str is not deterministic

    def fresh(make) -> str:
        while True:
            s = make()
            if len(s) >= 3 and s not in used and s.lower() not in _COMMON_WORDS:
                used.add(s)
                return s

    out = {}
    for split, n in sizes.items():
        out[split] = Pools(
            first=tuple(fresh(lambda: _syllable_word(rng, rng.choice((1, 2, 2)))) for _ in range(n["first"])),
            last=tuple(fresh(lambda: _syllable_word(rng, rng.choice((2, 2, 3)))) for _ in range(n["last"])),
            cities=tuple(fresh(lambda: _syllable_word(rng, rng.choice((1, 2))) + rng.choice(CITY_ENDINGS))
                         for _ in range(n["cities"])),
            companies=tuple(fresh(lambda: f"{_syllable_word(rng, 2)} {rng.choice(COMPANY_KINDS)}")
                            for _ in range(n["companies"])),
            pets=tuple(fresh(lambda: _syllable_word(rng, rng.choice((1, 2)))) for _ in range(n["pets"])),
        )
    return out


_COMMON_WORDS = frozenset(  # real words that syllables can spell; names must not look like them
    "the who what when where which his her its has had born work best kind name city home job year pet "
    "owns my me we you they them our your may can day way say see bed bad big bag bar bat but cut hat "
    "hot let lot man men met net not now old one out own put red run sat set sit sun ten top two use "
    "was yes yet bark walt taste still made make more most much must near next nice only over same some "
    "such than that then there these this those very want well were with year also back been both came "
    "come does done down each even ever from gave give good have here high hold into just keep kept "
    "know last late left less like line live long look many mean mind miss move name need none note "
    "open part pass past plan play pull push read rest ride ring rise road rock role room rose rule "
    "safe sale sand save seal seat seem seen self sell send ship shop shot show shut side sign sing "
    "size skin slow snow soft soil sold sole song soon sort soul spot star stay step stop such suit "
    "sure take tale talk tall task team tell tend term test text thin tone took tool tour town tree "
    "trip true turn type unit vast vote wait walk wall warm wash wave weak wear week west wide wild "
    "will wind wine wing wise wish wood word wore yard zone".split()
) | frozenset(w.lower() for w in JOBS + COLOURS + SPECIES + INSTRUMENTS + COMPANY_KINDS)


def make_person(rng: random.Random, pools: Pools) -> Person:
    """A person with random facts drawn from one split's pools."""
    return Person(
        first=rng.choice(pools.first), last=rng.choice(pools.last), city=rng.choice(pools.cities),
        job=rng.choice(JOBS), company=rng.choice(pools.companies), year=str(rng.randint(1920, 2005)),
        species=rng.choice(SPECIES), pet=rng.choice(pools.pets), colour=rng.choice(COLOURS),
        instrument=rng.choice(INSTRUMENTS),
    )


# ----------------------------------------------------------------------------- QA contexts

# fact -> sentence templates. Fields: P (full name), F (first name), Q (friend's full name)
# and the Person fields. The answer field of each question is marked in QUESTIONS.
SENTENCES: dict[str, tuple[str, ...]] = {
    "city": ("{P} lives in {city}.", "{F} has made a home in {city}.", "Home for {F} is the city of {city}.",
             "These days {F} lives in {city}."),
    "job": ("{P} works as {a_job} {job}.", "{F} earns a living as {a_job} {job}.", "By trade, {F} is {a_job} {job}.",
            "{F} has worked as {a_job} {job} for many years."),
    "company": ("{F} works for {company}.", "{P} is employed by {company}.", "{company} employs {F}.",
                "Every weekday {F} goes to work at {company}."),
    "year": ("{P} was born in {year}.", "{F} was born in the year {year}.", "The year {F} was born was {year}."),
    "pet": ("{F} has {a_species} {species} named {pet}.", "{pet} is the {species} that belongs to {F}.",
            "{F} owns {a_species} {species} called {pet}."),
    "colour": ("{F}'s favourite colour is {colour}.", "{F} loves the colour {colour}.",
               "Of all colours, {F} likes {colour} best."),
    "friend": ("{F}'s best friend is {Q}.", "The best friend of {F} is {Q}."),
    "instrument": ("{F} plays the {instrument}.", "In the evenings {F} practises the {instrument}.",
                   "{F} learned to play the {instrument} as a child."),
}
# (fact, question template, answer field); "{P}" in questions is always the full name.
QUESTIONS: tuple[tuple[str, str, str], ...] = (
    ("city", "Where does {P} live?", "city"), ("city", "In which city does {P} live?", "city"),
    ("city", "Who lives in {city}?", "PERSON"),
    ("job", "What is {P}'s job?", "job"), ("job", "What does {P} do for a living?", "job"),
    ("company", "Which company does {P} work for?", "company"), ("company", "Who employs {P}?", "company"),
    ("year", "When was {P} born?", "year"), ("year", "In what year was {P} born?", "year"),
    ("pet", "What is the name of {P}'s {species}?", "pet"), ("pet", "What kind of animal is {pet}?", "species"),
    ("pet", "Who owns {pet}?", "PERSON"),
    ("colour", "What is {P}'s favourite colour?", "colour"), ("colour", "Which colour does {P} like best?", "colour"),
    ("friend", "Who is {P}'s best friend?", "Q"),
    ("instrument", "Which instrument does {P} play?", "instrument"),
    ("instrument", "What instrument does {P} practise?", "instrument"),
)
# Facts a second (distractor) person may get; questions about them name them in full.
FRIEND_FACTS = ("city", "job", "company", "year", "instrument")


def _render(template: str, fields: dict[str, str], target: str | None) -> tuple[str, int | None]:
    """Fill `template`; also return where field `target` starts in the result."""
    out, at = [], None
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if field is not None:
            if field == target and at is None:
                at = sum(map(len, out))
            out.append(fields[field])
    return "".join(out), at


def _person_fields(p: Person, first_mention: bool) -> dict[str, str]:
    fields = {k: getattr(p, k) for k in Person.__dataclass_fields__}
    fields["P"] = p.name
    fields["F"] = p.name if first_mention else p.first
    fields["a_job"], fields["a_species"] = _article(p.job), _article(p.species)
    return fields


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_context(rng: random.Random, pools: Pools, qa_id: str, n_questions: int,
                 unanswerable: random.Random | None = None) -> tuple[str, dict[str, Any]]:
    """One SQuAD paragraph `{"context", "qas"}` about a person and maybe a friend, with its title.

    Every answer is a span of the context at its `answer_start`; questions name their subject in
    full, so each has one right answer. "Who" answers list the mention in the asked sentence
    first and the full name (at its first occurrence) as a second gold answer. With
    `unanswerable` (its own generator, so the rest is unchanged), one more question asks about a
    fact of the person that the context does not state (SQuAD v2.0's `is_impossible`).
    """
    main = make_person(rng, pools)
    friend = make_person(rng, pools)
    while friend.first == main.first or friend.city == main.city or friend.pet == main.pet:
        friend = make_person(rng, pools)
    facts = rng.sample(list(SENTENCES), rng.randint(3, 4))
    extra = rng.sample(FRIEND_FACTS, rng.randint(0, 1)) if "friend" in facts else []

    sentences, spans_of, offset = [], {}, 0  # spans_of: (who, fact) -> {answer field: (text, start)}
    mentioned: set[str] = set()
    for who, fact in [("main", f) for f in facts] + [("friend", f) for f in extra]:
        p = main if who == "main" else friend
        fields = _person_fields(p, first_mention=who not in mentioned)  # first mention: full name
        fields["Q"] = friend.name
        mentioned.add(who)
        if fact == "friend":
            mentioned.add("friend")
        template = rng.choice(SENTENCES[fact])
        spans = {}
        for field in ("city", "job", "company", "year", "pet", "species", "colour", "instrument", "Q"):
            if "{" + field + "}" in template:
                _, at = _render(template, fields, field)
                spans[field] = (fields[field], offset + at)
        person_field = "P" if "{P}" in template else "F"
        text, at = _render(template, fields, person_field)
        spans["PERSON"] = (fields[person_field], offset + at)
        spans_of[(who, fact)] = spans
        sentences.append(text)
        offset += len(text) + 1
    context = " ".join(sentences)

    asked = rng.sample(list(spans_of), min(n_questions, len(spans_of)))  # one question per fact
    qas = []
    for k, (who, fact) in enumerate(asked):
        p = main if who == "main" else friend
        options = [(q, field) for f, q, field in QUESTIONS if f == fact and field in spans_of[(who, fact)]]
        qtemplate, field = rng.choice(options)
        text, start = spans_of[(who, fact)][field]
        golds = [(text, start)]
        if field == "PERSON" and text != p.name:
            golds.append((p.name, context.index(p.name)))
        for t, s in golds:
            assert context[s : s + len(t)] == t, (context, t, s)
        qas.append({"id": f"{qa_id}-{k}", "question": qtemplate.format(**_person_fields(p, False)),
                    "answers": [{"text": t, "answer_start": s} for t, s in golds]})
    if unanswerable is not None:  # the main person has 8 facts and the context states 3 or 4
        fact = unanswerable.choice([f for f in SENTENCES if f not in facts])
        qtemplate = unanswerable.choice([q for f, q, _ in QUESTIONS if f == fact])
        qas.append({"id": f"{qa_id}-u", "question": qtemplate.format(**_person_fields(main, False)),
                    "answers": [], "is_impossible": True})
    return main.name, {"context": context, "qas": qas}


def make_split(rng: random.Random, pools: Pools, split: str, n_contexts: int, n_questions: int,
               unanswerable: random.Random | None = None) -> dict[str, Any]:
    """A SQuAD v1.1 document: one article per context, titled by its subject; with `unanswerable`,
    the SQuAD v2.0 document of the same contexts and questions plus one unanswerable each."""
    data = []
    for i in range(n_contexts):
        title, para = make_context(rng, pools, f"world-{split}-{i:05d}", n_questions, unanswerable)
        data.append({"title": title, "paragraphs": [para]})
    return {"version": "v2.0" if unanswerable else "1.1", "data": data}


# ----------------------------------------------------------------------------- corpus


# Rhetorical questions a passage may end with, answered by copying a fact it stated: prose
# ("Where does Ada live? In Rome."), not the CONTEXT/QUESTION/ANSWER format of the QA task.
FAQ: dict[str, tuple[str, ...]] = {
    "city": ("Where does {N} live? In {city}.", "Who lives in {city}? {N} does."),
    "job": ("What does {N} do for a living? {N} is {a_job} {job}.", "What is {N}'s job? {N} works as {a_job} {job}."),
    "company": ("Who employs {N}? {company} does.", "Which company does {N} work for? {N} works for {company}."),
    "year": ("When was {N} born? In {year}.", "In what year was {N} born? {N} was born in {year}."),
    "pet": ("What is the name of {N}'s {species}? It is called {pet}.", "Who owns {pet}? {N} does.",
            "What kind of animal is {pet}? {pet} is {a_species} {species}."),
    "colour": ("What is {N}'s favourite colour? It is {colour}.",),
    "friend": ("Who is {N}'s best friend? It is {Q}.",),
    "instrument": ("Which instrument does {N} play? {N} plays the {instrument}.",),
}


def _bio(rng: random.Random, p: Person, friend: Person) -> str:
    """A biography paragraph followed by a restatement (questions, summary, fact box or friend)."""
    facts = list(SENTENCES)
    rng.shuffle(facts)
    facts = facts[: rng.randint(3, 7)]
    fields = _person_fields(p, first_mention=False)
    fields["Q"] = friend.name
    body = [f"{p.name} is {_article(p.job)} {p.job} from {p.city}."]
    body += [rng.choice(SENTENCES[f]).format(**fields) for f in facts]
    style = rng.random()
    if style < 0.5:  # rhetorical questions about facts stated above, answered by copying them
        known = sorted(set(facts) | {"city", "job"}, key=list(SENTENCES).index)
        tail = [rng.choice(FAQ[f]).format(N=rng.choice((p.name, p.first)), **fields)
                for f in rng.sample(known, min(len(known), rng.randint(2, 4)))]
    elif style < 0.65:  # a summary sentence that copies earlier spans
        employer = f" and works for {p.company}" if "company" in facts else ""
        tail = [f"In short, {p.name} is {_article(p.job)} {p.job} who lives in {p.city}{employer}."]
    elif style < 0.8:  # a fact box of stated facts: values start lines, as answers do after "ANSWER\n"
        box = {"city": ("Home", p.city), "job": ("Occupation", p.job), "company": ("Employer", p.company),
               "year": ("Born", p.year), "pet": ("Pet", f"{p.pet} ({p.species})"), "colour": ("Colour", p.colour),
               "instrument": ("Instrument", p.instrument), "friend": ("Best friend", friend.name)}
        keys = [("Name", p.name)] + [box[f] for f in ["city", "job"] + facts if f in box]
        keys = list(dict.fromkeys(keys))
        box_text = "\n\n".join(f"{k}\n{v}" for k, v in rng.sample(keys, min(4, len(keys))))
        return " ".join(body) + "\n\n" + box_text
    else:  # a second mention of the friend with their own facts
        tail = [f"{friend.name} lives in {friend.city} and works as {_article(friend.job)} {friend.job}.",
                f"{p.first} and {friend.first} met in {p.city}."]
    return " ".join(body + tail)


def _city_article(rng: random.Random, city: str, people: list[Person]) -> str:
    names = [p.name for p in people]
    text = (f"{city} is a town known for its {rng.choice(COLOURS)} roofs. Notable residents of {city} "
            f"include {', '.join(names[:-1])} and {names[-1]}.")
    if rng.random() < 0.6:
        text += f"\n\nResidents of {city}\n" + "\n".join(names)
    return text


def _company_article(rng: random.Random, company: str, founder: Person, city: str) -> str:
    year = rng.randint(1850, 2010)
    return (f"{company} was founded in {year} by {founder.name}, {_article(founder.job)} {founder.job} from {founder.city}. "
            f"The company is based in {city}. {founder.first} ran {company} for many years. "
            f"Today {company} is still based in {city}.")


def _pet_story(rng: random.Random, p: Person) -> str:
    return (f"{p.pet} is {_article(p.species)} {p.species} who lives with {p.name} in {p.city}. Every morning {p.pet} waits by the door "
            f"for {p.first}. The {p.species} {p.pet} likes the colour {p.colour}, or so {p.first} says.")


def _register(rng: random.Random, pool: Pools) -> str:
    """A list of names given twice in the same order: its second half is pure copying."""
    city = rng.choice(pool.cities)
    names = [f"{rng.choice(pool.first)} {rng.choice(pool.last)}" for _ in range(rng.randint(6, 14))]
    listing = ", ".join(names)
    return f"Register of {city}: {listing}. The register of {city} was read aloud: {listing}."


def make_corpus(rng: random.Random, pools: list[Pools], n_documents: int) -> list[str]:
    """Encyclopedia-like documents (not QA format) drawn from the given pools only.

    15% of the documents use `pools[0]` (the QA training names), the rest the other pools.
    A quarter of them are stored twice in a row, as duplicated pages are in web corpora, and
    some are registers that list the same names twice: the repeats are predictable only by
    copying from earlier context, which is what makes a small model form induction (copy)
    heads within a few thousand steps instead of settling for n-gram statistics.
    """
    docs = []
    for _ in range(n_documents):
        pool = pools[0] if len(pools) == 1 or rng.random() < 0.15 else rng.choice(pools[1:])
        kind = rng.random()
        if kind < 0.15:
            doc = _register(rng, pool)
        elif kind < 0.6:
            doc = _bio(rng, make_person(rng, pool), make_person(rng, pool))
        elif kind < 0.75:
            doc = _city_article(rng, rng.choice(pool.cities), [make_person(rng, pool) for _ in range(rng.randint(2, 5))])
        elif kind < 0.87:
            doc = _company_article(rng, rng.choice(pool.companies), make_person(rng, pool), rng.choice(pool.cities))
        else:
            doc = _pet_story(rng, make_person(rng, pool))
        docs.append(doc + "\n\n" + doc if rng.random() < 0.25 else doc)
    return docs


# ----------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class World:
    """The generated splits (SQuAD v1.1 dicts, and their v2.0 versions), pretraining corpus and the
    pools behind them."""

    train: dict[str, Any]
    validation: dict[str, Any]
    corpus: tuple[str, ...]
    pools: dict[str, Pools]
    train_v2: dict[str, Any]
    validation_v2: dict[str, Any]


_POOL_SIZES = {
    "train": {"first": 300, "last": 300, "cities": 150, "companies": 120, "pets": 150},
    "validation": {"first": 60, "last": 60, "cities": 40, "companies": 30, "pets": 40},
    # Large, so that most corpus names are rare: predicting a name's second mention then needs
    # copying it from earlier in the passage, not remembering it (the skill QA needs).
    "corpus": {"first": 8000, "last": 8000, "cities": 5000, "companies": 4000, "pets": 5000},
}


def make_world(config: WorldConfig = WorldConfig()) -> World:
    """Generate the whole world deterministically from `config.seed`."""
    rng = random.Random(config.seed)
    pools = make_pools(rng, _POOL_SIZES)
    splits = {}
    for split, n in (("train", config.train_contexts), ("validation", config.validation_contexts)):
        # The unanswerable questions come from a generator of their own: without them, the v1.1 split
        splits[split, True] = make_split(random.Random(f"{config.seed}-{split}"), pools[split], split, n,
                                         config.questions_per_context, random.Random(f"{config.seed}-{split}-v2"))
        splits[split, False] = _answerable(splits[split, True])
    corpus = make_corpus(random.Random(f"{config.seed}-corpus"), [pools["train"], pools["corpus"]],
                         config.corpus_documents)
    return World(splits["train", False], splits["validation", False], tuple(corpus), pools,
                 splits["train", True], splits["validation", True])


def _answerable(doc: dict[str, Any]) -> dict[str, Any]:
    """The SQuAD v1.1 document of a v2.0 one: its answerable questions alone."""
    return {"version": "1.1", "data": [
        {**art, "paragraphs": [{**para, "qas": [qa for qa in para["qas"] if not qa.get("is_impossible")]}
                               for para in art["paragraphs"]]} for art in doc["data"]]}


def dumps_squad(doc: dict[str, Any]) -> str:
    """Stable JSON text for a SQuAD document (byte-identical across runs)."""
    return json.dumps(doc, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n"
