"""A small English grammar over word lists, producing LibriSpeech-style sentences.

Sentences are built from templates (statements, questions, reported speech, numbers,
imperatives...) over nouns, verbs with tenses, adjectives, adverbs and phrases, and are
normalised like LibriSpeech transcripts: uppercase A-Z, apostrophes, single spaces.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MIN_WORDS = 4
MAX_WORDS = 16

# --------------------------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------------------------
MALE_NAMES = """john james robert michael william david richard joseph thomas charles daniel matthew
anthony mark paul steven andrew kenneth kevin brian george edward ronald timothy jason jeffrey ryan
jacob gary nicholas eric jonathan stephen larry justin scott benjamin samuel frank gregory raymond
alexander patrick jack dennis jerry tyler aaron henry peter arthur walter harold albert oliver harry
philip martin simon victor hugh ralph francis louis""".split()
FEMALE_NAMES = """mary patricia jennifer linda elizabeth barbara susan jessica sarah karen nancy lisa
margaret betty sandra ashley dorothy emily donna michelle carol amanda melissa deborah stephanie
rebecca laura sharon cynthia kathleen amy shirley angela helen anna brenda pamela nicole emma
samantha katherine christine rachel catherine janet ruth maria heather diane virginia julie joyce
victoria olivia kelly christina lauren joan evelyn judith alice grace rose clara lucy""".split()
SURNAMES = """smith johnson williams jones miller davis wilson anderson taylor moore jackson thompson
harris clark lewis robinson walker young allen wright scott baker adams nelson hill campbell mitchell
roberts carter phillips evans turner parker collins edwards stewart morris murphy rogers morgan cooper
peterson reed bailey howard ward richardson watson brooks bennett hughes sanders fisher""".split()
TITLES = "mister doctor captain professor miss uncle aunt father mother".split()
PLACE_NAMES = """london paris rome berlin madrid vienna dublin boston chicago denver seattle toronto
sydney tokyo cairo athens lisbon moscow texas florida california canada france spain italy england
scotland ireland china india egypt mexico brazil germany japan africa europe america""".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = """january february march april may june july august september october november
december""".split()
SEASONS = "spring summer autumn winter".split()

# Countable nouns by class (singular); plurals follow the rules in `plural`.
COUNT_NOUNS = {
    "person": """man woman child boy girl friend neighbor teacher doctor farmer driver soldier
        sailor baker student worker nurse king queen prince princess father mother brother sister
        uncle aunt cousin son daughter husband wife grandmother grandfather baby captain officer
        stranger guest visitor traveler merchant artist writer singer player pilot lawyer judge
        priest servant guard hunter fisherman carpenter painter musician engineer scientist
        professor clerk manager owner customer passenger shepherd tailor policeman gentleman lady
        thief hero knight queen maid cook waiter poet""".split(),
    "animal": """dog cat horse cow sheep pig goat chicken duck goose bird eagle owl crow rabbit mouse
        rat fox wolf bear deer lion tiger elephant monkey snake frog fish whale dolphin bee
        butterfly spider donkey camel squirrel turtle parrot pigeon swan lamb calf puppy kitten
        bull ox hen pony""".split(),
    "food": """apple orange banana pear peach plum grape lemon cherry strawberry potato tomato carrot
        onion cabbage bean egg cake pie cookie biscuit sandwich sausage salad pizza pancake muffin
        melon nut loaf cucumber pumpkin""".split(),
    "thing": """book letter box bag bottle cup glass plate bowl spoon knife fork chair table bed lamp
        clock window door key ring watch coin map picture photograph card pen pencil brush basket
        blanket pillow candle mirror bucket rope ladder hammer nail shovel umbrella hat coat shirt
        dress shoe boot sock glove scarf jacket button camera radio telephone computer newspaper
        magazine ticket envelope package parcel present gift toy ball kite doll drum guitar piano
        violin bicycle car truck bus wagon cart engine wheel tent flag sword shield bell stone
        stick feather leaf flower seed shell umbrella purse wallet notebook jar barrel sack
        suitcase pot kettle towel necklace""".split(),
    "place": """house school church kitchen garden room hall library hospital market shop store
        station office bank farm field forest river lake mountain hill valley village town city
        street road bridge harbor beach island castle palace tower museum theater restaurant hotel
        park yard barn cottage cabin cave desert meadow pond shore coast kingdom prison factory
        camp court bakery stable cellar attic chapel tavern inn orchard""".split(),
    "idea": """idea story question answer plan problem secret promise dream lesson message reason
        mistake truth song poem joke game word name rule law choice decision chance speech
        language trip journey adventure meeting party holiday birthday wedding dinner breakfast
        lunch supper concert letter report lecture prayer riddle puzzle legend""".split(),
}
MASS_NOUNS = {
    "food": """bread cheese butter soup rice meat beef coffee tea milk juice water wine honey
        sugar salt pepper cream jam fruit chocolate corn flour""".split(),
    "thing": "furniture money paper wood gold silver cloth wool glass".split(),
    "idea": "news advice music history science work homework".split(),
}
NATURE_NOUNS = """sun moon sky wind rain snow storm fog thunder sea ocean grass air ice""".split()

IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "child": "children", "mouse": "mice", "goose": "geese",
    "sheep": "sheep", "deer": "deer", "fish": "fish", "ox": "oxen", "fisherman": "fishermen",
    "policeman": "policemen", "gentleman": "gentlemen", "knife": "knives", "leaf": "leaves",
    "wolf": "wolves", "scarf": "scarves", "calf": "calves", "loaf": "loaves", "thief": "thieves",
    "wife": "wives", "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes",
}

# Verbs that form their past tense and participle irregularly: base -> (past, participle).
IRREGULAR_VERBS = {
    "eat": ("ate", "eaten"), "buy": ("bought", "bought"), "sell": ("sold", "sold"),
    "cut": ("cut", "cut"), "bring": ("brought", "brought"), "find": ("found", "found"),
    "lose": ("lost", "lost"), "hold": ("held", "held"), "break": ("broke", "broken"),
    "make": ("made", "made"), "lend": ("lent", "lent"), "keep": ("kept", "kept"),
    "hide": ("hid", "hidden"), "throw": ("threw", "thrown"), "catch": ("caught", "caught"),
    "take": ("took", "taken"), "give": ("gave", "given"), "send": ("sent", "sent"),
    "show": ("showed", "shown"), "steal": ("stole", "stolen"), "forget": ("forgot", "forgotten"),
    "leave": ("left", "left"), "hang": ("hung", "hung"), "meet": ("met", "met"),
    "see": ("saw", "seen"), "teach": ("taught", "taught"), "tell": ("told", "told"),
    "pay": ("paid", "paid"), "hear": ("heard", "heard"), "wake": ("woke", "woken"),
    "forgive": ("forgave", "forgiven"), "feed": ("fed", "fed"), "ride": ("rode", "ridden"),
    "build": ("built", "built"), "understand": ("understood", "understood"),
    "read": ("read", "read"), "write": ("wrote", "written"), "begin": ("began", "begun"),
    "run": ("ran", "run"), "sleep": ("slept", "slept"), "sing": ("sang", "sung"),
    "swim": ("swam", "swum"), "fly": ("flew", "flown"), "sit": ("sat", "sat"),
    "stand": ("stood", "stood"), "speak": ("spoke", "spoken"), "fall": ("fell", "fallen"),
    "shake": ("shook", "shaken"), "drink": ("drank", "drunk"), "draw": ("drew", "drawn"),
    "win": ("won", "won"), "choose": ("chose", "chosen"), "sweep": ("swept", "swept"),
    "wear": ("wore", "worn"), "bite": ("bit", "bitten"), "dig": ("dug", "dug"),
    "grow": ("grew", "grown"), "know": ("knew", "known"), "think": ("thought", "thought"),
    "feel": ("felt", "felt"), "put": ("put", "put"), "shut": ("shut", "shut"),
    "spend": ("spent", "spent"), "lead": ("led", "led"), "freeze": ("froze", "frozen"),
    "hit": ("hit", "hit"), "seek": ("sought", "sought"), "fight": ("fought", "fought"),
    "light": ("lit", "lit"), "say": ("said", "said"), "go": ("went", "gone"),
    "come": ("came", "come"), "get": ("got", "gotten"), "do": ("did", "done"),
    "have": ("had", "had"), "drive": ("drove", "driven"), "wash": ("washed", "washed"),
    "sweep up": ("swept up", "swept up"), "forbid": ("forbade", "forbidden"),
    "lie": ("lay", "lain"), "weep": ("wept", "wept"), "creep": ("crept", "crept"),
    "kneel": ("knelt", "knelt"), "shine": ("shone", "shone"), "ring": ("rang", "rung"),
    "blow": ("blew", "blown"), "tear": ("tore", "torn"), "swing": ("swung", "swung"),
}
# Regular or irregular verbs that double their final consonant before -ed / -ing.
DOUBLING = set("""stop plan drop chop shop hug rob beg nod skip clap grab jog pat rub slip trip
    ship tap swim run sit begin forget get put cut hit shut dig win step admit prefer wrap
    knit stir""".split())

# Transitive verbs by the class of their object; phrasal particles follow the verb.
TRANSITIVE = {
    "food": [
        "eat", "cook", "buy", "sell", "bake", "taste", "cut", "share", "bring", "carry", "order",
        "serve", "want", "like", "prefer", "find", "wash", "drop", "peel", "slice", "boil",
        "steal", "hide", "offer", "smell", "pick up", "look for", "save", "fry", "chop", "roast",
        "weigh", "deliver", "pack", "grow"],
    "thing": [
        "buy", "sell", "find", "lose", "carry", "bring", "hold", "open", "close", "break", "fix",
        "clean", "wash", "paint", "build", "make", "borrow", "lend", "keep", "hide", "drop",
        "throw", "catch", "move", "push", "pull", "drag", "lift", "take", "send", "show", "use",
        "need", "want", "steal", "forget", "leave", "check", "count", "collect", "fill", "empty",
        "fold", "hang", "wrap", "mend", "polish", "repair", "pick up", "look at", "look for",
        "search for", "put down", "examine", "notice", "admire", "describe", "return", "deliver",
        "pack", "sweep", "drive", "ride", "shake", "touch", "guard", "hang up", "throw away",
        "give away", "hand over", "point at", "tear", "ring", "swing", "weigh", "draw"],
    "person": [
        "meet", "help", "visit", "call", "see", "watch", "follow", "ask", "thank", "invite",
        "greet", "marry", "teach", "remember", "forget", "love", "like", "hate", "trust",
        "believe", "miss", "find", "warn", "tell", "pay", "answer", "join", "admire", "rescue",
        "chase", "hear", "wake", "introduce", "kiss", "hug", "blame", "forgive", "wait for",
        "look for", "talk to", "listen to", "laugh at", "smile at", "shout at", "write to",
        "care for", "think about", "worry about", "agree with", "argue with", "dance with",
        "play with", "travel with", "lead", "seek", "fight", "protect", "praise", "obey",
        "comfort", "surprise", "frighten", "amuse", "disturb", "encourage", "recognize",
        "understand", "punish", "carry", "lose", "hire", "ignore", "defend", "beg", "rob",
        "nod at", "wave to", "point at", "bow to", "kneel beside", "weep for", "pray for"],
    "animal": [
        "feed", "chase", "catch", "watch", "see", "hear", "follow", "find", "lose", "wash",
        "train", "ride", "keep", "hunt", "frighten", "sell", "buy", "carry", "love", "hate",
        "look for", "search for", "call", "count", "draw", "photograph", "rescue", "protect",
        "save", "notice", "tie up", "lead", "pat", "brush", "milk", "shoot", "trap", "tame",
        "release", "observe"],
    "place": [
        "visit", "leave", "reach", "clean", "build", "paint", "find", "enter", "explore",
        "cross", "search", "pass", "approach", "guard", "sweep", "describe", "remember",
        "forget", "love", "hate", "prefer", "show", "sell", "buy", "own", "rent", "repair",
        "decorate", "destroy", "defend", "attack", "photograph", "draw", "discover", "choose",
        "walk through", "run through", "look at", "look for", "return to", "arrive at",
        "hurry to", "drive to", "travel to", "walk to", "run to", "escape from", "move to",
        "dream about", "write about", "sing about", "think about", "lead", "watch", "seek",
        "light", "shut"],
    "idea": [
        "explain", "understand", "remember", "forget", "discuss", "describe", "consider",
        "accept", "refuse", "hear", "tell", "read", "write", "learn", "teach", "share", "change",
        "finish", "begin", "start", "plan", "follow", "answer", "ask", "solve", "keep", "break",
        "make", "love", "enjoy", "hate", "like", "prefer", "repeat", "ignore", "believe",
        "doubt", "imagine", "mention", "invent", "announce", "suggest", "choose", "notice",
        "think about", "talk about", "laugh at", "wonder about", "argue about", "agree with",
        "write down", "work on", "listen to", "dream about", "sing", "reveal", "whisper",
        "record", "publish", "copy", "translate", "print", "memorize", "practice", "review",
        "correct", "avoid", "postpone", "celebrate", "attend", "miss", "organize", "prepare"],
}

INTRANSITIVE = [
    "walk", "run", "sleep", "laugh", "smile", "cry", "sing", "dance", "jump", "swim", "sit",
    "stand", "wait", "arrive", "leave", "return", "travel", "work", "play", "rest", "listen",
    "speak", "shout", "whisper", "fall", "climb", "hurry", "wander", "breathe", "cough", "knock",
    "pray", "study", "live", "stay", "agree", "complain", "dream", "hide", "shake", "tremble",
    "sigh", "yawn", "kneel", "weep", "shiver", "blush", "nod", "wave", "bow", "paint", "cook",
    "read", "write", "draw", "drive", "ride", "fight", "win", "lose", "grow", "think", "wake up",
    "sit down", "stand up", "look up", "look around", "go home", "go out", "come back",
    "get up", "calm down", "slow down", "hurry home", "set off", "give up", "fall asleep",
    "step forward", "lie down", "creep away", "stop", "listen carefully", "begin"]
ANIMAL_INTRANSITIVE = [
    "run", "sleep", "jump", "swim", "sit", "wait", "hide", "rest", "play", "climb", "eat",
    "drink", "wander", "shake", "shiver", "creep away", "lie down", "fall asleep", "grow",
    "escape", "return", "stop"]
# Animal subjects only take these transitive verbs (object class -> verbs).
ANIMAL_TRANSITIVE = {
    "food": ["eat", "find", "smell", "steal", "drop", "hide", "look for"],
    "person": ["follow", "chase", "watch", "bite", "frighten", "wake", "find", "ignore",
               "wait for", "trust", "obey"],
    "animal": ["chase", "follow", "watch", "frighten", "find", "catch", "ignore", "fight"],
    "thing": ["find", "carry", "drop", "hide", "break", "steal", "chew", "pull", "bite"],
    "place": ["leave", "reach", "enter", "explore", "cross", "guard", "return to", "escape from"],
}
SAY_VERBS = ["say", "think", "know", "believe", "hope", "feel", "remember", "explain",
             "promise", "admit", "suspect", "notice", "dream", "understand", "hear", "learn"]
TO_VERBS = ["want", "try", "decide", "hope", "plan", "promise", "refuse", "forget", "need",
            "begin", "agree", "offer", "like", "prefer", "wish", "expect", "intend", "fail",
            "pretend", "manage", "learn", "choose", "hesitate", "attempt"]
GIVE_VERBS = ["give", "send", "show", "hand", "lend", "bring", "offer", "sell", "throw", "pass",
              "mail", "owe", "promise", "read", "teach", "buy", "make", "cook", "write"]

ADJECTIVES = {
    "general": """big small large little old new young long short tall wide narrow heavy light
        dark bright clean dirty dry wet warm cold hot cool soft hard smooth rough quiet loud
        empty full strange beautiful pretty ugly lovely fine good bad great poor rich cheap
        expensive simple plain famous ordinary wonderful terrible perfect curious peculiar
        remarkable splendid pleasant dreadful""".split(),
    "color": "red blue green yellow white black brown gray orange purple pink golden silver".split(),
    "person": """kind clever tall brave tired hungry happy sad angry honest friendly lonely polite
        rude quiet shy proud wise foolish gentle busy poor rich strong weak sick healthy cheerful
        careful careless anxious calm nervous patient jealous generous stubborn grateful
        frightened worried excited handsome elderly thoughtful cruel wicked noble humble
        serious funny lazy""".split(),
    "animal": """wild hungry tame fat thin lazy clever friendly fierce playful noisy spotted
        striped gentle dangerous frightened sleepy tiny huge""".split(),
    "food": """fresh ripe sweet sour bitter delicious tasty spicy salty juicy stale rotten crisp
        warm cold hot frozen raw roasted boiled""".split(),
    "thing": """broken heavy light expensive cheap wooden shiny dusty useful strange tiny huge
        beautiful precious valuable ancient modern enormous leather woolen fragile rusty
        useless""".split(),
    "place": """quiet busy empty crowded dark small large beautiful famous ancient distant
        lonely peaceful noisy warm cold narrow muddy sunny shady gloomy cozy abandoned
        magnificent""".split(),
    "idea": """good bad simple strange important interesting difficult easy clever serious sad
        funny long short secret wonderful terrible surprising silly brilliant foolish strict
        clear curious mysterious""".split(),
}
DEGREE = ["very", "rather", "quite", "too", "so", "extremely", "really", "a little", "terribly",
          "perfectly", "unusually", "fairly"]
MANNER_ADVERBS = """quickly slowly quietly loudly carefully gently suddenly happily sadly angrily
    patiently eagerly softly silently politely proudly nervously calmly bravely easily finally
    immediately secretly proudly carelessly gladly warmly kindly rudely boldly anxiously
    cheerfully willingly reluctantly honestly foolishly wisely hastily steadily firmly
    together alone again""".split()
FREQUENCY = ["always", "never", "often", "sometimes", "usually", "rarely", "seldom", "often"]
TIME_PHRASES = [
    "yesterday", "today", "tomorrow", "tonight", "later", "soon", "early", "last night",
    "last week", "last year", "last summer", "next week", "next month", "this morning",
    "this evening", "every day", "every morning", "every evening", "in the morning",
    "in the afternoon", "in the evening", "at night", "at noon", "at midnight", "at dawn",
    "after dinner", "before breakfast", "after school", "after the war", "long ago",
    "an hour later", "a moment later", "the next day", "the day before", "once again",
    "at last", "at once", "for a while", "all day", "all night", "every sunday"]
PLACE_PREPOSITIONS = ["in", "near", "behind", "outside", "beside", "at", "across", "toward",
                      "by", "inside", "around", "past", "along", "beyond", "opposite"]
MOTION_PREPOSITIONS = ["to", "toward", "into", "out of", "across", "through", "around",
                       "past", "along", "from", "up", "down"]
SURFACES = ["table", "shelf", "desk", "floor", "chair", "bed", "bench", "roof", "step",
            "counter", "windowsill", "wall", "ground", "grass"]
CONTAINERS = ["box", "bag", "drawer", "basket", "cupboard", "pocket", "chest", "barrel", "sack",
              "jar", "trunk", "corner", "closet"]
CONJUNCTIONS = ["and", "but", "because", "so", "while", "although", "when", "before", "after",
                "until", "since", "as soon as", "as", "and then"]
WH_WORDS = ["where", "when", "why", "how"]
MODALS = ["could", "should", "might", "must", "would", "can", "will", "may"]
DETERMINERS_SG = ["the", "the", "the", "a", "this", "that", "every", "each", "one", "another"]
DETERMINERS_PL = ["the", "the", "some", "these", "those", "many", "several", "a few", "all the",
                  "both", "no", "most of the", "two of the"]
POSSESSIVES = ["my", "your", "his", "her", "our", "their"]
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINALS = """first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth
    thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth""".split()
UNITS = ["miles", "pounds", "dollars", "days", "weeks", "years", "hours", "minutes", "feet",
         "yards", "acres", "shillings", "steps", "pages", "letters", "horses", "sheep"]
WEATHER = ["raining", "snowing", "freezing", "blowing hard", "getting dark", "getting late",
           "very hot", "very cold", "warm and sunny", "cloudy", "foggy", "windy", "quiet"]

# Articles: words starting with a vowel letter that take "a", and consonant ones taking "an".
A_BEFORE_VOWEL = {"useful", "useless", "unusually", "one", "university", "european", "unique"}
AN_BEFORE_CONSONANT = {"hour", "honest", "heir", "honor"}

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
