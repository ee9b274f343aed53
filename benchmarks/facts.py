"""Facts for the knowledge benchmarks of ``benchmarks/llm_adapters.py``.

* **Fictitious facts** the base model cannot know: seeded invented countries (capital, currency)
  and people (profession, birthplace), e.g. "The capital of Veloria is Drassen". Every relation
  has three disjoint sets of question phrasings: ``train`` (what fine-tuning sees), ``val``
  (learning-rate selection) and ``test`` (the paraphrases the table scores, never trained on,
  never used for selection).
* **Real facts** the base model may know (capitals, chemical symbols, continents, currencies,
  languages, planets, authors), each asked with two phrasings: the benchmark keeps the items the
  base model answers correctly before training and measures how many it still answers after.

Every question becomes a multiple-choice item: the gold answer plus distractors drawn (seeded)
from the values of the same relation, so each option is of the right type (a city for a
capital, a symbol for an element). Answers are short ("Drassen"), which is also what training
teaches, so exact match is meaningful.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

#: the system turn of every fact conversation (training, multiple choice and generation alike)
SYSTEM = "Answer in a few words."


@dataclass(frozen=True)
class Relation:
    name: str
    kind: str  # the subject kind: "country" or "person"
    value_type: str  # "city", "currency", ...: distractors share it
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def templates(self, split: str) -> tuple[str, ...]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)


SPLITS = ("train", "val", "test")

RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "capital", "country", "city",
            train=("What is the capital of {s}?", "Which city is the capital of {s}?",
                   "Name the capital city of {s}.", "{s} has its capital in which city?"),
            val=("What city serves as the capital of {s}?", "Where is the seat of government of {s}?"),
            test=("Which city is {s}'s capital?", "In which city is the government of {s} based?"),
        ),
        Relation(
            "currency", "country", "currency",
            train=("What is the currency of {s}?", "Which currency is used in {s}?",
                   "What money do people use in {s}?", "Name the official currency of {s}."),
            val=("What do shoppers in {s} pay with?", "What is {s}'s national currency called?"),
            test=("In {s}, prices are given in which currency?", "What is the name of the money of {s}?"),
        ),
        Relation(
            "profession", "person", "profession",
            train=("What is the profession of {s}?", "What does {s} do for a living?",
                   "What job does {s} have?", "Name the occupation of {s}."),
            val=("How does {s} earn a living?", "What kind of work does {s} do?"),
            test=("What is {s}'s occupation?", "{s} works as what?"),
        ),
        Relation(
            "birthplace", "person", "city",
            train=("Where was {s} born?", "What is the birthplace of {s}?",
                   "In which city was {s} born?", "Name the city where {s} was born."),
            val=("Which city is {s} originally from?", "What is {s}'s home town?"),
            test=("{s} was born in which city?", "What city did {s} come into the world in?"),
        ),
    )
}

#: real values for the person relations (the people are invented, their jobs are not)
PROFESSIONS = (
    "architect", "beekeeper", "cartographer", "chemist", "dentist", "florist", "geologist", "jeweller",
    "librarian", "locksmith", "pharmacist", "sculptor", "surgeon", "tailor", "veterinarian", "astronomer",
    "blacksmith", "carpenter", "economist", "glassblower", "historian", "lawyer", "midwife", "novelist",
    "photographer", "plumber", "potter", "shoemaker", "translator", "watchmaker", "zoologist", "baker",
)

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "nd")
_SUFFIX = {
    "country": ("ia", "ora", "and", "esh", "ovia", "aria"),
    "city": ("en", "holm", "ar", "ith", "ova", "burg", "mont"),
    "currency": ("el", "ar", "ind", "ot", "ic"),
    "given": ("an", "a", "o", "is", "et", "en"),
    "family": ("ary", "ez", "ovic", "berg", "ton", "ard"),
}


def invented_word(rng: random.Random, kind: str, syllables: tuple[int, int] = (1, 2)) -> str:
    """A pronounceable invented name of ``kind`` (its suffix marks the kind: Veloria, Drassen)."""
    n = rng.randint(*syllables)
    stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n))
    return (stem + rng.choice(_SUFFIX[kind])).capitalize()


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    value: str


@dataclass(frozen=True)
class Question:
    """One phrasing of one fact: ``text`` is the user turn, ``answer`` the expected reply."""

    text: str
    answer: str
    relation: str
    split: str
    subject: str = ""


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice item: ``options[label]`` is the gold answer, the rest are distractors of its type."""

    question: Question
    options: tuple[str, ...]
    label: int


@dataclass
class FactSet:
    facts: list[Fact]
    #: value type -> every value of that type (the facts' own values plus unused ones): the distractor pool
    pools: dict[str, list[str]] = field(default_factory=dict)

    def questions(self, split: str) -> list[Question]:
        """Every fact asked with every phrasing of ``split``."""
        out = []
        for f in self.facts:
            for t in RELATIONS[f.relation].templates(split):
                out.append(Question(t.format(s=f.subject), f.value, f.relation, split, f.subject))
        return out


def fictitious_facts(n_countries: int = 24, n_people: int = 24, seed: int = 0, spare_values: int = 16) -> FactSet:
    """Invented countries (capital, currency) and people (profession, birthplace), all names distinct.

    ``spare_values`` extra invented cities and currencies join the distractor pools, so a
    distractor is not always another trained fact's answer.
    """
    rng = random.Random(f"fictitious-facts/{seed}")
    used: set[str] = set()

    def fresh(kind: str, syllables: tuple[int, int] = (1, 2)) -> str:
        for _ in range(10_000):
            w = invented_word(rng, kind, syllables)
            if w.lower() not in used and len(w) >= 4:
                used.add(w.lower())
                return w
        raise RuntimeError(f"could not draw another distinct {kind} name")

    facts: list[Fact] = []
    cities = [fresh("city") for _ in range(n_countries + n_people + spare_values)]
    currencies = [fresh("currency") for _ in range(n_countries + spare_values)]
    for i in range(n_countries):
        country = fresh("country")
        facts += [Fact(country, "capital", cities[i]), Fact(country, "currency", currencies[i])]
    if n_people > len(PROFESSIONS):
        raise ValueError(f"n_people={n_people} but only {len(PROFESSIONS)} professions exist to draw from")
    jobs = rng.sample(PROFESSIONS, n_people)
    for i in range(n_people):
        person = f"{fresh('given')} {fresh('family')}"
        facts += [Fact(person, "profession", jobs[i]), Fact(person, "birthplace", cities[n_countries + i])]
    pools = {"city": cities, "currency": currencies, "profession": list(PROFESSIONS)}
    return FactSet(facts, pools)


def training_conversations(facts: FactSet, system: str = SYSTEM) -> list[dict]:
    """Chat items (``{"messages": [...]}``) for every fact and every training phrasing."""
    return [
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q.text},
                      {"role": "assistant", "content": q.answer}], "relation": q.relation}
        for q in facts.questions("train")
    ]


def multiple_choice(questions: list[Question], pools: dict[str, list[str]], relation_type: dict[str, str],
                    n_options: int = 4, seed: int = 0) -> list[MCItem]:
    """Each question with ``n_options - 1`` distractors from its value type's pool (seeded per question)."""
    items = []
    for q in questions:
        pool = sorted({v for v in pools[relation_type[q.relation]] if v.lower() != q.answer.lower()})
        if len(pool) < n_options - 1:
            raise ValueError(f"relation {q.relation!r}: {len(pool)} distractors available, {n_options - 1} needed")
        rng = random.Random(f"{seed}/{q.split}/{q.text}")
        options = rng.sample(pool, n_options - 1) + [q.answer]
        rng.shuffle(options)
        items.append(MCItem(q, tuple(options), options.index(q.answer)))
    return items


def fictitious_mc(facts: FactSet, split: str, n_options: int = 4, seed: int = 0) -> list[MCItem]:
    return multiple_choice(facts.questions(split), facts.pools, {r.name: r.value_type for r in RELATIONS.values()},
                           n_options, seed)


# --- real, checkable facts ------------------------------------------------------------------------
def _pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(p.split(":")) for p in text.split("|")]  # type: ignore[misc]


_CAPITALS = _pairs(
    "France:Paris|Germany:Berlin|Italy:Rome|Spain:Madrid|Portugal:Lisbon|the United Kingdom:London|Ireland:Dublin|"
    "the Netherlands:Amsterdam|Belgium:Brussels|Austria:Vienna|Switzerland:Bern|Sweden:Stockholm|Norway:Oslo|"
    "Denmark:Copenhagen|Finland:Helsinki|Poland:Warsaw|Greece:Athens|Hungary:Budapest|the Czech Republic:Prague|"
    "Russia:Moscow|Turkey:Ankara|Egypt:Cairo|Kenya:Nairobi|Nigeria:Abuja|Ethiopia:Addis Ababa|Morocco:Rabat|"
    "Japan:Tokyo|China:Beijing|India:New Delhi|South Korea:Seoul|Thailand:Bangkok|Vietnam:Hanoi|Indonesia:Jakarta|"
    "the Philippines:Manila|Pakistan:Islamabad|Iran:Tehran|Iraq:Baghdad|Saudi Arabia:Riyadh|Afghanistan:Kabul|"
    "Australia:Canberra|New Zealand:Wellington|Canada:Ottawa|Mexico:Mexico City|Argentina:Buenos Aires|"
    "Chile:Santiago|Peru:Lima|Venezuela:Caracas|Cuba:Havana|Romania:Bucharest|Bulgaria:Sofia|Serbia:Belgrade|"
    "Croatia:Zagreb|Iceland:Reykjavik|Nepal:Kathmandu|Bangladesh:Dhaka|Malaysia:Kuala Lumpur|Syria:Damascus|"
    "Lebanon:Beirut|Jordan:Amman|Qatar:Doha|Tunisia:Tunis|Ghana:Accra|Senegal:Dakar|Uganda:Kampala|Zimbabwe:Harare"
)
_SYMBOLS = _pairs(
    "hydrogen:H|helium:He|lithium:Li|carbon:C|nitrogen:N|oxygen:O|fluorine:F|neon:Ne|sodium:Na|magnesium:Mg|"
    "aluminium:Al|silicon:Si|phosphorus:P|sulfur:S|chlorine:Cl|argon:Ar|potassium:K|calcium:Ca|iron:Fe|copper:Cu|"
    "zinc:Zn|silver:Ag|gold:Au|mercury:Hg|lead:Pb|tin:Sn|uranium:U|nickel:Ni|cobalt:Co|platinum:Pt|iodine:I|"
    "titanium:Ti|chromium:Cr|manganese:Mn|boron:B|beryllium:Be|krypton:Kr|xenon:Xe|radon:Rn|tungsten:W|"
    "plutonium:Pu|bromine:Br|arsenic:As|barium:Ba|radium:Ra"
)
_CONTINENTS = _pairs(
    "France:Europe|Germany:Europe|Italy:Europe|Spain:Europe|Poland:Europe|Sweden:Europe|Greece:Europe|"
    "Portugal:Europe|Norway:Europe|Ireland:Europe|Japan:Asia|China:Asia|India:Asia|Thailand:Asia|Vietnam:Asia|"
    "Nepal:Asia|Mongolia:Asia|South Korea:Asia|Pakistan:Asia|Bangladesh:Asia|Kenya:Africa|Nigeria:Africa|"
    "Ghana:Africa|Ethiopia:Africa|Senegal:Africa|Uganda:Africa|Zimbabwe:Africa|Morocco:Africa|Madagascar:Africa|"
    "Tanzania:Africa|Canada:North America|Mexico:North America|Cuba:North America|Guatemala:North America|"
    "Honduras:North America|Jamaica:North America|Brazil:South America|Argentina:South America|Chile:South America|"
    "Peru:South America|Colombia:South America|Bolivia:South America|Uruguay:South America|Paraguay:South America|"
    "Ecuador:South America"
)
_CURRENCIES = _pairs(
    "Japan:yen|the United Kingdom:pound sterling|the United States:dollar|India:rupee|China:yuan|Russia:ruble|"
    "Mexico:peso|Brazil:real|South Africa:rand|Switzerland:franc|Sweden:krona|South Korea:won|Turkey:lira|"
    "Thailand:baht|Poland:zloty|Israel:shekel|Vietnam:dong|Indonesia:rupiah|Nigeria:naira|Germany:euro|"
    "France:euro|Italy:euro"
)
_LANGUAGES = _pairs(
    "Brazil:Portuguese|Mexico:Spanish|Germany:German|France:French|Japan:Japanese|Russia:Russian|Italy:Italian|"
    "the Netherlands:Dutch|Greece:Greek|Turkey:Turkish|Poland:Polish|Sweden:Swedish|Iran:Persian|Israel:Hebrew|"
    "Egypt:Arabic|Thailand:Thai|Vietnam:Vietnamese|South Korea:Korean|Portugal:Portuguese|Argentina:Spanish|"
    "Hungary:Hungarian|Finland:Finnish|Norway:Norwegian|Denmark:Danish|the Czech Republic:Czech|"
    "Indonesia:Indonesian|Pakistan:Urdu|Bangladesh:Bengali|Ethiopia:Amharic|China:Chinese"
)
_AUTHORS = _pairs(
    "Hamlet:William Shakespeare|Pride and Prejudice:Jane Austen|Nineteen Eighty-Four:George Orwell|"
    "War and Peace:Leo Tolstoy|Don Quixote:Miguel de Cervantes|On the Origin of Species:Charles Darwin|"
    "Oliver Twist:Charles Dickens|The Odyssey:Homer|Les Miserables:Victor Hugo|"
    "The Adventures of Tom Sawyer:Mark Twain|Frankenstein:Mary Shelley|Moby-Dick:Herman Melville|"
    "The Divine Comedy:Dante Alighieri|Crime and Punishment:Fyodor Dostoevsky|"
    "The Great Gatsby:F. Scott Fitzgerald|The Hobbit:J. R. R. Tolkien|The Old Man and the Sea:Ernest Hemingway|"
    "Dracula:Bram Stoker|Alice's Adventures in Wonderland:Lewis Carroll|Treasure Island:Robert Louis Stevenson|"
    "Macbeth:William Shakespeare|Animal Farm:George Orwell|A Christmas Carol:Charles Dickens|Anna Karenina:Leo Tolstoy|"
    "The Iliad:Homer|Faust:Johann Wolfgang von Goethe|Jane Eyre:Charlotte Bronte|Wuthering Heights:Emily Bronte"
)
_PLANETS = [
    ("closest to the Sun", "Mercury"), ("second from the Sun", "Venus"), ("third from the Sun", "Earth"),
    ("fourth from the Sun", "Mars"), ("fifth from the Sun", "Jupiter"), ("sixth from the Sun", "Saturn"),
    ("seventh from the Sun", "Uranus"), ("eighth from the Sun", "Neptune"), ("the largest in the Solar System", "Jupiter"),
    ("known as the Red Planet", "Mars"), ("famous for its bright rings", "Saturn"),
    ("the hottest in the Solar System", "Venus"), ("the one we live on", "Earth"),
    ("the smallest in the Solar System", "Mercury"),
]

#: relation -> (facts, two phrasings); "{s}" is the subject
REAL_RELATIONS: dict[str, tuple[list[tuple[str, str]], tuple[str, str]]] = {
    "capital": (_CAPITALS, ("What is the capital of {s}?", "Which city is the capital of {s}?")),
    "chemical symbol": (_SYMBOLS, ("What is the chemical symbol of {s}?", "Which symbol stands for {s} in chemistry?")),
    "continent": (_CONTINENTS, ("On which continent is {s}?", "{s} is a country on which continent?")),
    "currency": (_CURRENCIES, ("What is the currency of {s}?", "Which currency is used in {s}?")),
    "language": (_LANGUAGES, ("What language is mainly spoken in {s}?", "What is the main language of {s}?")),
    "author": (_AUTHORS, ("Who wrote {s}?", "Who is the author of {s}?")),
    "planet": (_PLANETS, ("Which planet is {s}?", "What is the name of the planet that is {s}?")),
}


def real_fact_questions() -> list[Question]:
    """Every real fact with both of its phrasings (the split is "real")."""
    out = []
    for rel, (pairs, templates) in REAL_RELATIONS.items():
        for subject, value in pairs:
            for t in templates:
                text = t.format(s=subject)
                out.append(Question(text[0].upper() + text[1:], value, rel, "real", subject))
    return out


def real_fact_mc(n_options: int = 4, seed: int = 0) -> list[MCItem]:
    """Real-fact multiple-choice items; distractors are other values of the same relation."""
    pools = {rel: sorted({v for _, v in pairs}) for rel, (pairs, _) in REAL_RELATIONS.items()}
    return multiple_choice(real_fact_questions(), pools, {r: r for r in REAL_RELATIONS}, n_options, seed)


def fingerprint(items: list[MCItem]) -> str:
    """A short hash of the items (questions, options, labels), recorded in the table header."""
    h = hashlib.sha256()
    for it in items:
        h.update(repr((it.question.text, it.options, it.label)).encode())
    return h.hexdigest()[:12]
