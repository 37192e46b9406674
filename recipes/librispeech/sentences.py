"""A small English grammar over word lists, producing LibriSpeech-style sentences.

Sentences are built from templates (statements, questions, reported speech, numbers,
imperatives...) over nouns, verbs with tenses, adjectives, adverbs and phrases, and are
normalised like LibriSpeech transcripts: uppercase A-Z, apostrophes, single spaces.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

MIN_WORDS = 4
MAX_WORDS = 16

# --------------------------------------------------------------------------------------------
# Word lists: data, in lexicon.yaml (order matters: the generator draws by index)
# --------------------------------------------------------------------------------------------
LEXICON_FILE = Path(__file__).with_name("lexicon.yaml")


def _load_lexicon(path: Path = LEXICON_FILE) -> dict:
    data = yaml.safe_load(path.read_text())
    for key in ("doubling", "a_before_vowel", "an_before_consonant"):  # membership only
        data[key] = set(data[key])
    for key in ("irregular_verbs",):  # (past, participle)
        data[key] = {word: tuple(forms) for word, forms in data[key].items()}
    return data


_LEXICON = _load_lexicon()
MALE_NAMES = _LEXICON["male_names"]
FEMALE_NAMES = _LEXICON["female_names"]
SURNAMES = _LEXICON["surnames"]
TITLES = _LEXICON["titles"]
PLACE_NAMES = _LEXICON["place_names"]
DAYS = _LEXICON["days"]
MONTHS = _LEXICON["months"]
SEASONS = _LEXICON["seasons"]
COUNT_NOUNS = _LEXICON["count_nouns"]
MASS_NOUNS = _LEXICON["mass_nouns"]
NATURE_NOUNS = _LEXICON["nature_nouns"]
IRREGULAR_PLURALS = _LEXICON["irregular_plurals"]
IRREGULAR_VERBS = _LEXICON["irregular_verbs"]
DOUBLING = _LEXICON["doubling"]
TRANSITIVE = _LEXICON["transitive"]
INTRANSITIVE = _LEXICON["intransitive"]
ANIMAL_INTRANSITIVE = _LEXICON["animal_intransitive"]
ANIMAL_TRANSITIVE = _LEXICON["animal_transitive"]
SAY_VERBS = _LEXICON["say_verbs"]
TO_VERBS = _LEXICON["to_verbs"]
GIVE_VERBS = _LEXICON["give_verbs"]
ADJECTIVES = _LEXICON["adjectives"]
DEGREE = _LEXICON["degree"]
MANNER_ADVERBS = _LEXICON["manner_adverbs"]
FREQUENCY = _LEXICON["frequency"]
TIME_PHRASES = _LEXICON["time_phrases"]
PLACE_PREPOSITIONS = _LEXICON["place_prepositions"]
MOTION_PREPOSITIONS = _LEXICON["motion_prepositions"]
SURFACES = _LEXICON["surfaces"]
CONTAINERS = _LEXICON["containers"]
CONJUNCTIONS = _LEXICON["conjunctions"]
WH_WORDS = _LEXICON["wh_words"]
MODALS = _LEXICON["modals"]
DETERMINERS_SG = _LEXICON["determiners_sg"]
DETERMINERS_PL = _LEXICON["determiners_pl"]
POSSESSIVES = _LEXICON["possessives"]
NUMBER_WORDS = _LEXICON["number_words"]
TENS_WORDS = _LEXICON["tens_words"]
ORDINALS = _LEXICON["ordinals"]
UNITS = _LEXICON["units"]
WEATHER = _LEXICON["weather"]
A_BEFORE_VOWEL = _LEXICON["a_before_vowel"]
AN_BEFORE_CONSONANT = _LEXICON["an_before_consonant"]

FEMALE_SUBJECTS = set(FEMALE_NAMES) | {"woman", "girl", "mother", "sister", "aunt", "daughter",
                                       "wife", "grandmother", "queen", "princess", "lady", "maid",
                                       "miss"}


# --------------------------------------------------------------------------------------------
# Morphology
# --------------------------------------------------------------------------------------------
def plural(noun: str) -> str:
    """English plural of a singular noun."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if re.search(r"(s|x|z|ch|sh)$", noun):
        return noun + "es"
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return noun + "s"


@dataclass(frozen=True)
class Verb:
    """All forms of a (possibly phrasal) verb, particle included in every form."""

    base: str
    third: str
    past: str
    participle: str
    ing: str


def _third_person(base: str) -> str:
    if base == "have":
        return "has"
    if re.search(r"(s|x|z|ch|sh|o)$", base):
        return base + "es"
    if re.search(r"[^aeiou]y$", base):
        return base[:-1] + "ies"
    return base + "s"


def _ing(base: str) -> str:
    if base.endswith("ie"):
        return base[:-2] + "ying"
    if base in DOUBLING:
        return base + base[-1] + "ing"
    if base.endswith("e") and not base.endswith(("ee", "ye", "oe")) and base != "be":
        return base[:-1] + "ing"
    return base + "ing"


def _regular_past(base: str) -> str:
    if base.endswith("e"):
        return base + "d"
    if re.search(r"[^aeiou]y$", base):
        return base[:-1] + "ied"
    if base in DOUBLING:
        return base + base[-1] + "ed"
    if base.endswith("c"):
        return base + "ked"
    return base + "ed"


@lru_cache(maxsize=None)
def verb(phrase: str) -> Verb:
    """Inflect a verb phrase such as 'eat' or 'look for' (the first word is the verb)."""
    head, _, rest = phrase.partition(" ")
    tail = " " + rest if rest else ""
    if phrase in IRREGULAR_VERBS:
        past, part = IRREGULAR_VERBS[phrase]
        return Verb(phrase, _third_person(head) + tail, past, part, _ing(head) + tail)
    past, part = IRREGULAR_VERBS.get(head, (_regular_past(head), _regular_past(head)))
    return Verb(phrase, _third_person(head) + tail, past + tail, part + tail, _ing(head) + tail)


def number_words(n: int) -> str:
    """Spell out 0 <= n < 10000 the way LibriSpeech transcripts do (with 'and')."""
    if not 0 <= n < 10000:
        raise ValueError(f"number out of range for spelling: {n}")
    if n < 20:
        return NUMBER_WORDS[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS_WORDS[tens - 2] + ("" if ones == 0 else " " + NUMBER_WORDS[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = NUMBER_WORDS[hundreds] + " hundred"
        return head if rest == 0 else head + " and " + number_words(rest)
    thousands, rest = divmod(n, 1000)
    head = number_words(thousands) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else " ") + number_words(rest)


def year_words(year: int) -> str:
    """Spell a year 1100-1999 as LibriSpeech does ('eighteen ninety two')."""
    century, rest = divmod(year, 100)
    if rest == 0:
        return number_words(century) + " hundred"
    if rest < 10:
        return number_words(century) + " o " + number_words(rest)
    return number_words(century) + " " + number_words(rest)


def normalise(text: str) -> str:
    """LibriSpeech normalisation: uppercase A-Z and apostrophes, single spaces."""
    text = re.sub(r"[^A-Z' ]+", " ", text.upper())
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Phrase builders
# --------------------------------------------------------------------------------------------
@dataclass
class Subject:
    """A subject noun phrase with what verb agreement needs."""

    words: str
    person: int  # 1, 2 or 3
    plural: bool
    kind: str  # "person" or "animal"
    female: bool = False

    @property
    def third_singular(self) -> bool:
        return self.person == 3 and not self.plural


class Grammar:
    """Sentence generator; all randomness comes from the numpy Generator given to `sentence`."""

    def __init__(self, rng: np.random.Generator, lexicon: int | None = None, max_words: int = MAX_WORDS):
        """`lexicon`: use only the first `lexicon` entries of every word list (None: all of them), a
        closed vocabulary of a few hundred words instead of about 2,700; `max_words`: longest sentence."""
        if lexicon is not None and lexicon < 1:
            raise ValueError(f"lexicon must be a positive number of words per list, got {lexicon}")
        if max_words < MIN_WORDS:
            raise ValueError(f"max_words must be at least {MIN_WORDS}, got {max_words}")
        self.rng = rng
        self.lexicon = lexicon
        self.max_words = max_words
        weights = np.array([w for _, w in self.TEMPLATES], dtype=float)
        self.template_p = weights / weights.sum()

    # -- random helpers ------------------------------------------------------------------------
    def pick(self, items):
        """One uniformly chosen element of a sequence (of its first `lexicon` elements, if set)."""
        if self.lexicon is not None and len(items) > self.lexicon:
            items = items[:self.lexicon]
        return items[int(self.rng.integers(len(items)))]

    def chance(self, p: float) -> bool:
        """True with probability p."""
        return bool(self.rng.random() < p)

    # -- noun phrases --------------------------------------------------------------------------
    def article(self, next_word: str) -> str:
        """'a' or 'an' for the following word."""
        vowel = next_word[0] in "aeiou"
        if next_word in A_BEFORE_VOWEL:
            vowel = False
        if next_word in AN_BEFORE_CONSONANT:
            vowel = True
        return "an" if vowel else "a"

    def adjective(self, kind: str) -> str:
        """An adjective suitable for nouns of `kind`, sometimes a colour or a general one."""
        roll = self.rng.random()
        if roll < 0.5 and kind in ADJECTIVES:
            return self.pick(ADJECTIVES[kind])
        if roll < 0.65 and kind in ("thing", "animal", "food"):
            return self.pick(ADJECTIVES["color"])
        return self.pick(ADJECTIVES["general"])

    def noun_phrase(self, kind: str, allow_plural: bool = True, allow_mass: bool = True):
        """A determiner + optional adjective + noun phrase; returns (words, plural, head noun)."""
        mass = allow_mass and kind in MASS_NOUNS and self.chance(0.2)
        if mass:
            noun, is_plural = self.pick(MASS_NOUNS[kind]), False
        else:
            noun = self.pick(COUNT_NOUNS[kind])
            is_plural = allow_plural and self.chance(0.3)
            noun = plural(noun) if is_plural else noun
        words = [noun]
        if self.chance(0.45):
            words.insert(0, self.adjective(kind))
            if self.chance(0.1):
                words.insert(0, self.pick(["very", "rather", "quite"]))
        det = self.determiner(is_plural, mass, words[0])
        if det:
            words.insert(0, det)
        return " ".join(words), is_plural, noun

    def determiner(self, is_plural: bool, mass: bool, next_word: str) -> str:
        """A determiner agreeing with number and countability."""
        roll = self.rng.random()
        if roll < 0.2:
            return self.pick(POSSESSIVES)
        if roll < 0.27:
            return self.pick(MALE_NAMES + FEMALE_NAMES) + "'s"
        if mass:
            return self.pick(["the", "the", "some", "no", "more", "enough", "all the", ""])
        if is_plural:
            if self.chance(0.25):
                return number_words(int(self.rng.integers(2, 30)))
            return self.pick(DETERMINERS_PL)
        det = self.pick(DETERMINERS_SG)
        return self.article(next_word) if det == "a" else det

    def object_phrase(self, kind: str) -> str:
        """An object noun phrase; people may also be names or object pronouns."""
        if kind == "person":
            roll = self.rng.random()
            if roll < 0.25:
                return self.pick(["me", "him", "her", "us", "them", "you"])
            if roll < 0.45:
                return self.name()
        return self.noun_phrase(kind)[0]

    def name(self) -> str:
        """A first name, a full name, or a title with a surname."""
        roll = self.rng.random()
        first = self.pick(MALE_NAMES if self.chance(0.5) else FEMALE_NAMES)
        if roll < 0.6:
            return first
        if roll < 0.8:
            return first + " " + self.pick(SURNAMES)
        return self.pick(TITLES) + " " + self.pick(SURNAMES)

    def subject(self, allow_animal: bool = True) -> Subject:
        """A subject: pronoun, name, or person/animal noun phrase."""
        roll = self.rng.random()
        if roll < 0.3:
            pron = self.pick(["i", "you", "he", "she", "we", "they", "he", "she"])
            person = {"i": 1, "we": 1, "you": 2}.get(pron, 3)
            return Subject(pron, person, pron in ("we", "they", "you"), "person", pron == "she")
        if roll < 0.55:
            name = self.name()
            first = name.split()[0]
            female = first in FEMALE_SUBJECTS or first in ("miss", "aunt", "mother")
            return Subject(name, 3, False, "person", female)
        kind = "animal" if allow_animal and self.chance(0.25) else "person"
        words, is_plural, noun = self.noun_phrase(kind, allow_mass=False)
        return Subject(words, 3, is_plural, kind, noun in FEMALE_SUBJECTS)

    def place_phrase(self) -> str:
        """A locative prepositional phrase ('near the old mill', 'in london')."""
        if self.chance(0.15):
            return self.pick(["in", "near", "to", "from"]) + " " + self.pick(PLACE_NAMES)
        return self.pick(PLACE_PREPOSITIONS) + " " + self.noun_phrase("place", allow_mass=False)[0]

    def thing_location(self) -> str:
        """Where an object lies ('on the shelf', 'in her pocket', 'under the bed')."""
        roll = self.rng.random()
        if roll < 0.4:
            return "on " + self.pick(["the", "the", "my", "his", "her", "a"]) + " " + \
                self.pick(SURFACES)
        if roll < 0.8:
            return "in " + self.pick(["the", "the", "my", "his", "her", "their"]) + " " + \
                self.pick(CONTAINERS)
        return self.pick(["under", "behind", "beside", "near"]) + " the " + \
            self.pick(SURFACES + CONTAINERS)

    def modifier(self) -> str:
        """An optional trailing adverbial: manner, time or place (or nothing)."""
        roll = self.rng.random()
        if roll < 0.25:
            return self.pick(MANNER_ADVERBS)
        if roll < 0.5:
            return self.pick(TIME_PHRASES)
        if roll < 0.7:
            return self.place_phrase()
        return ""

    # -- verb phrases --------------------------------------------------------------------------
    def be(self, subj: Subject, tense: str) -> str:
        """A form of 'to be' agreeing with the subject."""
        if tense == "past":
            return "were" if subj.plural or subj.person == 2 else "was"
        if subj.person == 1 and not subj.plural:
            return "am"
        return "is" if subj.third_singular else "are"

    def conjugate(self, subj: Subject, v: Verb, negative: bool = False) -> str:
        """The verb in a random tense/aspect/modality agreeing with the subject."""
        tense = self.pick(["past"] * 6 + ["present"] * 2 + ["progressive", "past_progressive",
                                                            "future", "perfect", "past_perfect",
                                                            "modal", "going_to"])
        if negative:
            return self.negative(subj, v, tense)
        if tense == "past":
            return v.past
        if tense == "present":
            return v.third if subj.third_singular else v.base
        if tense == "progressive":
            return self.be(subj, "present") + " " + v.ing
        if tense == "past_progressive":
            return self.be(subj, "past") + " " + v.ing
        if tense == "future":
            return "will " + v.base
        if tense == "perfect":
            return ("has " if subj.third_singular else "have ") + v.participle
        if tense == "past_perfect":
            return "had " + v.participle
        if tense == "going_to":
            return self.be(subj, self.pick(["present", "past"])) + " going to " + v.base
        return self.pick(MODALS) + " " + v.base

    def negative(self, subj: Subject, v: Verb, tense: str) -> str:
        """A negated verb group, contracted half of the time."""
        short = self.chance(0.5)
        if tense in ("present", "progressive") and not subj.third_singular:
            return ("don't " if short else "do not ") + v.base
        if tense in ("present", "progressive"):
            return ("doesn't " if short else "does not ") + v.base
        if tense == "future":
            return ("won't " if short else "will not ") + v.base
        if tense in ("perfect", "past_perfect"):
            aux = "had" if tense == "past_perfect" else ("has" if subj.third_singular else "have")
            return aux + ("n't " if short else " not ") + v.participle
        if tense == "modal":
            modal = self.pick(["could", "should", "would", "must"])
            return modal + ("n't " if short else " not ") + v.base
        return ("didn't " if short else "did not ") + v.base

    def predicate(self, subj: Subject) -> str:
        """A verb phrase: transitive with an object, or intransitive, with agreement."""
        negative = self.chance(0.12)
        adverb = self.pick(FREQUENCY) + " " if self.chance(0.08) and not negative else ""
        if subj.kind == "animal":
            if self.chance(0.5):
                kind = self.pick(list(ANIMAL_TRANSITIVE))
                v = verb(self.pick(ANIMAL_TRANSITIVE[kind]))
                return adverb + self.conjugate(subj, v, negative) + " " + self.object_phrase(kind)
            return adverb + self.conjugate(subj, verb(self.pick(ANIMAL_INTRANSITIVE)), negative)
        if self.chance(0.7):
            kind = self.pick(["food", "thing", "thing", "person", "person", "animal", "place",
                              "idea", "idea"])
            v = verb(self.pick(TRANSITIVE[kind]))
            phrase = self.conjugate(subj, v, negative) + " " + self.object_phrase(kind)
            if kind in ("thing", "food") and self.chance(0.25):
                phrase += " " + self.thing_location()
            return adverb + phrase
        return adverb + self.conjugate(subj, verb(self.pick(INTRANSITIVE)), negative)

    def clause(self, allow_animal: bool = True) -> str:
        """A simple declarative clause with an optional adverbial."""
        subj = self.subject(allow_animal)
        parts = [subj.words, self.predicate(subj), self.modifier()]
        return " ".join(p for p in parts if p)

    # -- sentence templates -------------------------------------------------------------------
    def t_statement(self) -> str:
        return self.clause()

    def t_compound(self) -> str:
        return self.clause() + " " + self.pick(CONJUNCTIONS) + " " + self.clause()

    def t_fronted_time(self) -> str:
        return self.pick(TIME_PHRASES + ["when " + self.clause(False)]) + " " + self.clause()

    def t_copula(self) -> str:
        kind = self.pick(["person", "animal", "food", "thing", "place", "idea"])
        words, is_plural, _ = self.noun_phrase(kind, allow_mass=True)
        subj = Subject(words, 3, is_plural, kind)
        deg = self.pick(DEGREE) + " " if self.chance(0.5) else ""
        tense = self.pick(["past", "past", "present"])
        tail = " " + self.modifier() if self.chance(0.4) else ""
        return f"{words} {self.be(subj, tense)} {deg}{self.adjective(kind)}{tail}"

    def t_there_is(self) -> str:
        kind = self.pick(["person", "animal", "food", "thing"])
        n = int(self.rng.integers(2, 100)) if self.chance(0.5) else 1
        noun = self.pick(COUNT_NOUNS[kind])
        adj = self.adjective(kind) + " " if self.chance(0.4) else ""
        if n == 1:
            np_ = f"{self.article(adj or noun)} {adj}{noun}"
            be = self.pick(["was", "is"])
        else:
            np_ = f"{number_words(n)} {adj}{plural(noun)}"
            be = self.pick(["were", "are"])
        where = self.thing_location() if kind in ("thing", "food") else self.place_phrase()
        return f"there {be} {np_} {where}"

    def t_reported(self) -> str:
        subj = self.subject(False)
        v = verb(self.pick(SAY_VERBS))
        head = v.past if self.chance(0.8) else (v.third if subj.third_singular else v.base)
        that = "that " if self.chance(0.5) else ""
        return f"{subj.words} {head} {that}{self.clause()}"

    def t_told(self) -> str:
        subj = self.subject(False)
        return f"{subj.words} told {self.object_phrase('person')} that {self.clause()}"

    def t_infinitive(self) -> str:
        subj = self.subject(False)
        v = verb(self.pick(TO_VERBS))
        kind = self.pick(list(TRANSITIVE))
        obj_v = self.pick(TRANSITIVE[kind])
        head = self.conjugate(subj, v, self.chance(0.1))
        tail = " " + self.modifier() if self.chance(0.5) else ""
        return f"{subj.words} {head} to {obj_v} {self.object_phrase(kind)}{tail}"

    def t_ditransitive(self) -> str:
        subj = self.subject(False)
        v = verb(self.pick(GIVE_VERBS))
        kind = self.pick(["thing", "food", "thing"])
        return (f"{subj.words} {self.conjugate(subj, v)} {self.object_phrase('person')} "
                f"{self.noun_phrase(kind)[0]}")

    def t_yes_no_question(self) -> str:
        subj = self.subject()
        aux = self.pick(["did", "will", "can", "could", "should", "would"])
        if aux == "did" and self.chance(0.3):
            aux = "does" if subj.third_singular else "do"
        kinds = ANIMAL_TRANSITIVE if subj.kind == "animal" else TRANSITIVE
        kind = self.pick(list(kinds))
        v = self.pick(kinds[kind])
        return f"{aux} {subj.words} {v} {self.object_phrase(kind)}"

    def t_wh_question(self) -> str:
        subj = self.subject()
        wh = self.pick(WH_WORDS)
        aux = self.pick(["did", "will", "can", "could", "should", "would"])
        verbs = ANIMAL_INTRANSITIVE if subj.kind == "animal" else INTRANSITIVE
        tail = " " + self.pick(TIME_PHRASES) if self.chance(0.4) else ""
        if self.chance(0.5):
            return f"{wh} {aux} {subj.words} {self.pick(verbs)}{tail}"
        kind = self.pick(["thing", "food", "person", "place", "idea"])
        if subj.kind == "animal":
            kind = self.pick(list(ANIMAL_TRANSITIVE))
            return f"{wh} {aux} {subj.words} {self.pick(ANIMAL_TRANSITIVE[kind])} " \
                   f"{self.object_phrase(kind)}"
        return f"{wh} {aux} {subj.words} {self.pick(TRANSITIVE[kind])} {self.object_phrase(kind)}"

    def t_who_question(self) -> str:
        kind = self.pick(list(TRANSITIVE))
        v = verb(self.pick(TRANSITIVE[kind]))
        return f"{self.pick(['who', 'which of them'])} {v.past} {self.object_phrase(kind)}" + (
            " " + self.modifier() if self.chance(0.6) else "")

    def t_imperative(self) -> str:
        kind = self.pick(["thing", "food", "person", "place", "idea", "animal"])
        v = self.pick(TRANSITIVE[kind])
        head = self.pick(["please ", "don't ", "do not ", "now ", "", "", ""])
        tail = " " + self.pick(MANNER_ADVERBS + TIME_PHRASES) if self.chance(0.5) else ""
        return f"{head}{v} {self.object_phrase(kind)}{tail}"

    def t_numbers(self) -> str:
        subj = self.subject(False)
        roll = self.rng.random()
        if roll < 0.35:
            kind = self.pick(["food", "thing", "animal"])
            noun = plural(self.pick(COUNT_NOUNS[kind]))
            v = verb(self.pick(["buy", "sell", "count", "find", "carry", "bring", "need",
                                "want", "see", "lose"]))
            verb_group = self.conjugate(subj, v)
            return f"{subj.words} {verb_group} {number_words(int(self.rng.integers(2, 1000)))} {noun}"
        if roll < 0.55:
            unit = self.pick(UNITS)
            v = verb(self.pick(["walk", "travel", "pay", "wait", "work", "spend", "save", "ride"]))
            verb_group = self.conjugate(subj, v)
            return f"{subj.words} {verb_group} {number_words(int(self.rng.integers(2, 200)))} {unit}"
        if roll < 0.7:
            return (f"{subj.words} {self.pick(['was born', 'arrived', 'left', 'died', 'married'])}"
                    f" in {year_words(int(self.rng.integers(1700, 1950)))}")
        if roll < 0.85:
            return (f"it was {self.pick(NUMBER_WORDS[1:13])} o'clock when "
                    f"{self.clause()}")
        return (f"on the {self.pick(ORDINALS)} of {self.pick(MONTHS)} {self.clause(False)}")

    def t_weather(self) -> str:
        tense = self.pick(["it was", "it is", "it had been", "it will be"])
        when = self.pick(TIME_PHRASES + [f"on {self.pick(DAYS)}", f"in {self.pick(MONTHS)}",
                                         f"in the {self.pick(SEASONS)}",
                                         f"{self.pick(['in', 'near'])} {self.pick(PLACE_NAMES)}"])
        tail = " " + self.pick(["and ", "so ", "but "]) + self.clause() if self.chance(0.6) else ""
        return f"{tense} {self.pick(WEATHER)} {when}{tail}"

    def t_nature(self) -> str:
        noun = self.pick(NATURE_NOUNS)
        v = verb(self.pick(["shine", "rise", "fall", "blow", "move", "roar", "disappear",
                            "appear", "grow", "change", "return"]))
        return f"the {noun} {self.conjugate(Subject('the ' + noun, 3, False, 'thing'), v)} " + \
            self.pick(MANNER_ADVERBS + TIME_PHRASES) + " " + self.place_phrase()

    TEMPLATES = [
        ("t_statement", 20), ("t_compound", 10), ("t_fronted_time", 6), ("t_copula", 8),
        ("t_there_is", 5), ("t_reported", 6), ("t_told", 3), ("t_infinitive", 8),
        ("t_ditransitive", 5), ("t_yes_no_question", 5), ("t_wh_question", 5),
        ("t_who_question", 3), ("t_imperative", 4), ("t_numbers", 6), ("t_weather", 3),
        ("t_nature", 3),
    ]

    def sentence(self) -> str:
        """One normalised sentence of MIN_WORDS..max_words words."""
        while True:
            index = int(self.rng.choice(len(self.TEMPLATES), p=self.template_p))
            text = normalise(getattr(self, self.TEMPLATES[index][0])())
            if MIN_WORDS <= len(text.split()) <= self.max_words:
                return text


def sentences(rng: np.random.Generator, count: int, exclude: set[str] | None = None,
              lexicon: int | None = None, max_words: int = MAX_WORDS) -> list[str]:
    """`count` distinct sentences, none of them in `exclude` (which is updated in place); `lexicon` and
    `max_words` as in `Grammar`."""
    grammar = Grammar(rng, lexicon=lexicon, max_words=max_words)
    seen = exclude if exclude is not None else set()
    out = []
    while len(out) < count:
        text = grammar.sentence()
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out
