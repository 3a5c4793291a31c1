"""Seeded request generators with gold answers, for measuring whether reuse changes a real model's answers.

Every passage states facts about an invented entity (a company, a person, a town: made-up names, so a
model can only know the facts from the prompt), and every request asks about one passage in it.  The
assistant turn is primed with the answer's first words ("Velmor Systems was founded in"), so a greedy
completion of ~12 tokens holds the answer; `Request.gold` is the fact it must contain.

Workloads (`WORKLOADS`), each with its own passage pool and system prompt so that no two share text:
  rag         4 of 12 passages in random order, joined by blank lines, then the question: one chat message
  agent_raw   a sliding window over an observation history (4 observations, moving by one each request),
              raw text (no chat template)
  agent_chat  the same window as chat, each observation its own message
  reorder     sets of 4 passages, each set asked 4 times in new orders
  interleave  2 of 6 recurring passages with 2 never-seen passages interleaved among them
  multiturn   4-turn chats, one new passage per turn, earlier turns (with gold replies) resent
  zipf        4 passages of a 200-passage corpus drawn by a Zipf law (most passages recur rarely)

A request is chat (`messages`) or raw text (`text`); `render` turns it into the `/v1/completions`
prompt: the tokenizer's chat template with the generation prompt, or the raw text, then the primer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

SYLLABLES = ["zor", "vex", "quil", "lan", "mar", "dov", "tes", "kin", "bra", "vel", "nor", "thi", "gal", "ond",
             "rix", "pel", "sar", "mu", "fen", "dra", "lo", "cas", "tor", "ven", "ish", "ka", "rem", "bel", "os",
             "un", "ya", "gri", "hol", "zu", "per", "wen"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Dublin", "Krakow", "Hanoi", "Quito", "Tunis", "Perth",
          "Bergen", "Cairo", "Porto", "Seville", "Tallinn", "Busan", "Cordoba", "Zurich", "Accra", "Leeds",
          "Dakar", "Lyon", "Manila"]
INDUSTRIES = ["shipping", "software", "textile", "mining", "furniture", "robotics", "bakery", "paint", "toy",
              "bicycle", "glass", "fishing"]
PRODUCTS = ["solar kettle", "folding ladder", "glass violin", "paper drone", "copper lantern", "wool helmet",
            "silent blender", "floating clock", "rubber compass", "steel umbrella", "cedar piano", "salt lamp"]
PROFESSIONS = ["baker", "surgeon", "pilot", "carpenter", "librarian", "plumber", "chemist", "gardener",
               "lawyer", "sculptor", "dentist", "translator", "geologist", "jeweller"]
INSTRUMENTS = ["cello", "banjo", "trumpet", "harp", "accordion", "flute", "drums", "oboe", "ukulele", "violin"]
PETS = ["parrot", "tortoise", "ferret", "goat", "hamster", "rabbit", "donkey", "goldfish"]
FOODS = ["cheese", "honey", "mushroom", "plum", "oyster", "pumpkin", "chestnut", "pepper", "apple", "bread"]
MONTHS = ["January", "March", "April", "May", "June", "July", "August", "September", "October", "November"]
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
SUFFIXES = ["Industries", "Systems", "Holdings", "Works", "Labs", "Group", "Company", "Trading"]


@dataclass(frozen=True)
class Question:
    text: str   # "In what year was Velmor Systems founded?"
    prime: str  # the answer's first words: "Velmor Systems was founded in " (a number's leading space is a
                # token of its own here, so a year's primer ends with it and the first generated token is a digit)
    gold: str   # what a correct completion contains: "1987"


@dataclass(frozen=True)
class Passage:
    text: str
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class Request:
    """One request: chat `messages` or raw `text`, the primer appended to either, and its gold answer."""

    workload: str
    index: int
    prime: str
    gold: str
    messages: tuple[dict, ...] = ()
    text: str = ""

    def correct(self, completion: str) -> bool:
        """Whether a completion (the text after the primer) states the gold fact."""
        return self.gold.lower() in completion.lower()


def render(req: Request, tokenizer) -> str:
    """The `/v1/completions` prompt of `req`: chat template with the generation prompt, or the raw text,
    then the primer (so the model continues the answer rather than opening one)."""
    if req.messages:
        head = tokenizer.apply_chat_template(list(req.messages), add_generation_prompt=True, tokenize=False)
    else:
        head = req.text
    return head + req.prime


class Facts:
    """Invented entities and their fact passages; names never repeat within one `Facts`."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._used: set[str] = set()

    def name(self) -> str:
        while True:
            n = "".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(2, 3))).capitalize()
            if n not in self._used and len(n) >= 5:
                self._used.add(n)
                return n

    def passage(self) -> Passage:
        return self.rng.choice((self.company, self.person, self.town))()

    def company(self) -> Passage:
        r = self.rng
        c = f"{self.name()} {r.choice(SUFFIXES)}"
        year, city, product = str(r.randint(1850, 2015)), r.choice(CITIES), r.choice(PRODUCTS)
        first, last = self.name(), self.name()
        text = (f"{c} is a {r.choice(INDUSTRIES)} company. It was founded in {year} in {city}. Its best-known "
                f"product is the {product}, and its chief executive is {first} {last}. Its head office has "
                f"{r.randint(3, 40)} floors and a {r.choice(COLOURS)} roof.")
        return Passage(text, (Question(f"In what year was {c} founded?", f"{c} was founded in ", year),
                              Question(f"In which city was {c} founded?", f"{c} was founded in the city of", city),
                              Question(f"What is the best-known product of {c}?",
                                       f"The best-known product of {c} is the", product),
                              Question(f"Who is the chief executive of {c}?", f"The chief executive of {c} is", last)))

    def person(self) -> Passage:
        r = self.rng
        first, last = self.name(), self.name()
        p = f"{first} {last}"
        job, city = r.choice(PROFESSIONS), r.choice(CITIES)
        year, inst = str(r.randint(1930, 2004)), r.choice(INSTRUMENTS)
        text = (f"{p} is a {job} who lives in {city}. Born in {year}, {first} plays the {inst} on weekends "
                f"and keeps a {r.choice(PETS)} named {self.name()}. {first}'s favourite colour is "
                f"{r.choice(COLOURS)}.")
        return Passage(text, (Question(f"What is {p}'s profession?", f"{p} works as a", job),
                              Question(f"In which city does {p} live?", f"{p} lives in", city),
                              Question(f"In what year was {p} born?", f"{p} was born in ", year),
                              Question(f"Which instrument does {p} play?", f"{p} plays the", inst)))

    def town(self) -> Passage:
        r = self.rng
        t, river, food, month = self.name(), self.name(), r.choice(FOODS), r.choice(MONTHS)
        first, last = self.name(), self.name()
        text = (f"The town of {t} lies on the {river} River, {r.randint(5, 300)} kilometres from {r.choice(CITIES)}. "
                f"It is famous for its {food} festival, held every {month}, and its mayor is {first} {last}. "
                f"About {r.randint(2, 90)} thousand people live there.")
        return Passage(text, (Question(f"On which river does {t} lie?", f"{t} lies on the", river),
                              Question(f"Which festival is {t} famous for?", f"{t} is famous for its", food),
                              Question(f"In which month is the festival of {t} held?",
                                       f"The {food} festival of {t} is held every", month),
                              Question(f"Who is the mayor of {t}?", f"The mayor of {t} is", last)))


def _system(role: str) -> str:
    return f"You are {role}. Answer the question using only the passages given."


def _chat(name: str, i: int, system: str, passages: list[Passage], q: Question) -> Request:
    user = "\n\n".join(p.text for p in passages) + f"\n\nQuestion: {q.text}"
    return Request(name, i, q.prime, q.gold, messages=({"role": "system", "content": system},
                                                       {"role": "user", "content": user}))


def _ask(rng: random.Random, passages: list[Passage]) -> Question:
    return rng.choice(rng.choice(passages).questions)


def _rng(name: str, seed: int) -> random.Random:
    """The stream of a workload's choices (which passages, which question)."""
    return random.Random(f"kvreuse-fidelity:{name}:{seed}")


def _facts(name: str, seed: int) -> Facts:
    """The stream of a workload's passages, apart from its choices: the first n requests of a workload are
    the same whatever n is."""
    return Facts(random.Random(f"kvreuse-fidelity:{name}:{seed}:passages"))


def rag(n: int, seed: int = 0) -> list[Request]:
    rng, facts = _rng("rag", seed), _facts("rag", seed)
    pool = [facts.passage() for _ in range(12)]
    system = _system("a research assistant at the Halvard company registry")
    out = []
    for i in range(n):
        chosen = rng.sample(pool, 4)
        out.append(_chat("rag", i, system, chosen, _ask(rng, chosen)))
    return out


def _window(name: str, n: int, seed: int) -> tuple[random.Random, list[Passage], list[str]]:
    rng, facts = _rng(name, seed), _facts(name, seed)
    passages = [facts.passage() for _ in range(n + 3)]
    return rng, passages, [f"Observation {k + 1}: {p.text}" for k, p in enumerate(passages)]


def agent_raw(n: int, seed: int = 0) -> list[Request]:
    rng, passages, obs = _window("agent_raw", n, seed)
    system = _system("a field agent keeping a log of what you observe")
    out = []
    for i in range(n):
        q = _ask(rng, passages[i:i + 4])
        text = system + "\n\n" + "\n\n".join(obs[i:i + 4]) + f"\n\nQuestion: {q.text}\nAnswer: "
        out.append(Request("agent_raw", i, q.prime, q.gold, text=text))
    return out


def agent_chat(n: int, seed: int = 0) -> list[Request]:
    rng, passages, obs = _window("agent_chat", n, seed)
    system = _system("a survey agent reading its observation history")
    out = []
    for i in range(n):
        q = _ask(rng, passages[i:i + 4])
        msgs = ({"role": "system", "content": system}, *({"role": "user", "content": o} for o in obs[i:i + 4]),
                {"role": "user", "content": f"Question: {q.text}"})
        out.append(Request("agent_chat", i, q.prime, q.gold, messages=msgs))
    return out


def reorder(n: int, seed: int = 0) -> list[Request]:
    rng, facts = _rng("reorder", seed), _facts("reorder", seed)
    system = _system("a librarian answering from catalogue cards")
    out: list[Request] = []
    while len(out) < n:
        cards = [facts.passage() for _ in range(4)]
        for _ in range(min(4, n - len(out))):
            rng.shuffle(cards)
            out.append(_chat("reorder", len(out), system, list(cards), _ask(rng, cards)))
    return out


def interleave(n: int, seed: int = 0) -> list[Request]:
    rng, facts = _rng("interleave", seed), _facts("interleave", seed)
    stored = [facts.passage() for _ in range(6)]
    system = _system("a news desk assistant reading wire reports")
    out = []
    for i in range(n):
        old, new = rng.sample(stored, 2), [facts.passage(), facts.passage()]
        chosen = [old[0], new[0], old[1], new[1]] if rng.random() < 0.5 else [new[0], old[0], new[1], old[1]]
        out.append(_chat("interleave", i, system, chosen, _ask(rng, chosen)))
    return out


def multiturn(n: int, seed: int = 0, turns: int = 4) -> list[Request]:
    rng, facts = _rng("multiturn", seed), _facts("multiturn", seed)
    system = _system("a tutor helping a student revise a set of notes")
    out: list[Request] = []
    while len(out) < n:
        msgs: list[dict] = [{"role": "system", "content": system}]
        seen: list[Passage] = []
        for t in range(min(turns, n - len(out))):
            new = [facts.passage() for _ in range(2 if t == 0 else 1)]
            seen += new
            q = _ask(rng, seen)
            msgs.append({"role": "user", "content": "\n\n".join(p.text for p in new) + f"\n\nQuestion: {q.text}"})
            out.append(Request("multiturn", len(out), q.prime, q.gold, messages=tuple(msgs)))
            # the next turn resends this one with its gold reply, the same for every arm
            msgs.append({"role": "assistant", "content": f"{q.prime} {q.gold}."})
    return out


def zipf(n: int, seed: int = 0, corpus: int = 200, s: float = 1.0) -> list[Request]:
    rng, facts = _rng("zipf", seed), _facts("zipf", seed)
    pool = [facts.passage() for _ in range(corpus)]
    weights = [1.0 / (k + 1) ** s for k in range(corpus)]
    system = _system("an encyclopedia assistant answering from retrieved articles")
    out = []
    for i in range(n):
        picked: list[int] = []
        while len(picked) < 4:
            k = rng.choices(range(corpus), weights)[0]
            if k not in picked:
                picked.append(k)
        chosen = [pool[k] for k in picked]
        out.append(_chat("zipf", i, system, chosen, _ask(rng, chosen)))
    return out


WORKLOADS: dict[str, Callable[..., list[Request]]] = {
    "rag": rag, "agent_raw": agent_raw, "agent_chat": agent_chat, "reorder": reorder,
    "interleave": interleave, "multiturn": multiturn, "zipf": zipf}


def warmup(seed: int = 0, n: int = 2) -> list[Request]:
    """Requests on a pool and system prompt of their own, to take a server's first-request costs."""
    rng, facts = _rng("warmup", seed), _facts("warmup", seed)
    out = []
    for i in range(n):
        chosen = [facts.passage() for _ in range(4)]
        out.append(_chat("warmup", i, _system("a warm-up assistant"), chosen, _ask(rng, chosen)))
    return out
